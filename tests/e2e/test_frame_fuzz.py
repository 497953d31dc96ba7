"""Frame fuzzing through Nginx: more than 10,000 generated frames over live sockets (hypothesis).

Every generated frame is bad in a way the test knows: not JSON, not an object,
an unknown type, a missing field, a field of the wrong type or out of range,
huge and deeply nested values, lone UTF-16 surrogates, binary frames,
oversized frames. Each must be answered by exactly one ``error`` frame in the
contract's shape, with the expected code and ``ref``, in the order sent, on a
socket that stays open. The few that the protocol itself ends (invalid UTF-8 in
a text frame: 1007; a frame over the gateway's 1 MiB read limit: 1009) must
close the socket with that code and nothing else. Valid messages sent between
the fuzz frames must be acknowledged, delivered and in the history exactly as
sent, and nothing else may be stored. No answer may be a 5xx and no service may
log an error or a traceback meanwhile.

Frames are paced below GATEWAY_RATE_PER_SOCKET on each socket of a pool, so no
fuzz frame is answered ``rate_limited``; floods, which are, have their own test.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import websocket
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from helper.stack import Stack
from tests.support import User, WsClient, dm_id, eventually, new_user

#: Sockets of the sender in the pool, and the pace on each: half the gateway's default limit
#: (GATEWAY_RATE_PER_SOCKET=50/s, bursts of 100), so no fuzz frame is ever rate limited.
POOL = 20
PACE_PER_S = 25.0
PACE_BURST = 40
#: Frames per hypothesis example, and examples: at least 10,000 fuzz frames in all.
BATCH = 100
EXAMPLES = 102
MAX_FRAME_BYTES = 64 * 1024
MAX_BODY_CHARS = 16 * 1024
#: The gateway reads frames up to this size (answering payload_too_large); beyond, it closes (1009).
READ_LIMIT = 1024 * 1024
ERROR_CODES = {
    "invalid_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "conflict",
    "payload_too_large",
    "rate_limited",
    "internal_error",
    "unavailable",
}
KNOWN_TYPES = ("message", "receipt", "typing", "ping")

FUZZ_SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    report_multiple_bugs=False,
)


# -- the parties -----------------------------------------------------------------------


@dataclass
class Paced:
    """One socket of the pool with a client-side token bucket below the gateway's."""

    ws: WsClient
    tokens: float = PACE_BURST
    at: float = field(default_factory=time.monotonic)

    def wait_token(self) -> float:
        """Seconds until this socket may send again (0: now)."""
        now = time.monotonic()
        self.tokens = min(PACE_BURST, self.tokens + (now - self.at) * PACE_PER_S)
        self.at = now
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / PACE_PER_S


@dataclass
class Party:
    """Alice fuzzes from a pool of sockets and sends valid messages to Bob between frames."""

    stack: Stack
    alice: User
    bob: User
    pool: list[Paced]
    bob_ws: WsClient
    #: client id -> (body, ack) of every valid message acknowledged
    acked: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    sent: int = 0
    log_marks: dict[Path, int] = field(default_factory=dict)


PARTY: dict[str, Party] = {}


def log_files(stack: Stack) -> list[Path]:
    return [*sorted((stack.var / "log").glob("*.log")), stack.var / "nginx" / "log" / "access.log"]


@pytest.fixture(scope="module")
def party(stack: Stack) -> Iterator[Party]:
    marks = {p: p.stat().st_size if p.exists() else 0 for p in log_files(stack)}
    alice, bob = new_user(stack.base_url), new_user(stack.base_url)
    p = Party(stack, alice, bob, [Paced(alice.connect()) for _ in range(POOL)], bob.connect(), log_marks=marks)
    PARTY["p"] = p
    yield p
    for ws in [*alice.sockets, *bob.sockets]:
        ws.close()
    PARTY.clear()


def peer() -> str:
    return PARTY["p"].bob.user_id


def me() -> str:
    return PARTY["p"].alice.user_id


def dm() -> str:
    p = PARTY["p"]
    return dm_id(p.alice, p.bob)


# -- what is sent and what must come back ------------------------------------------------


@dataclass(frozen=True)
class Fuzz:
    """One frame and the one answer it must get: an error (code, ref) or a pong."""

    payload: str | bytes
    binary: bool = False
    code: str | None = "invalid_request"
    ref: str | None = None

    @property
    def pong(self) -> bool:
        return self.code is None

    def __repr__(self) -> str:
        # Hypothesis prints a failing example: a few hundred KiB of frames would hide it.
        shown = self.payload[:300]
        more = f" (+{len(self.payload) - 300})" if len(self.payload) > 300 else ""
        return f"Fuzz({shown!r}{more}, binary={self.binary}, code={self.code!r}, ref={self.ref!r})"


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10)
)
# Two levels of containers, built directly: st.recursive (and filters on it) made generating
# 10,000 frames take minutes.
json_shallow = (
    json_scalars | st.lists(json_scalars, max_size=3) | st.dictionaries(st.text(max_size=6), json_scalars, max_size=3)
)
json_values = (
    json_shallow | st.lists(json_shallow, max_size=3) | st.dictionaries(st.text(max_size=6), json_shallow, max_size=3)
)
client_ids = st.text(min_size=1, max_size=40)
bodies = st.text(min_size=1, max_size=120).filter(lambda s: s.strip() != "")


def message_template() -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(lambda cid, body: {"type": "message", "id": cid, "to": peer(), "body": body}, client_ids, bodies)


def receipt_template() -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(
        lambda status, seq: {"type": "receipt", "conversation": dm(), "status": status, "up_to_seq": seq},
        st.sampled_from(["delivered", "read"]),
        st.integers(0, 10**6),
    )


def typing_template() -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(
        lambda state: {"type": "typing", "conversation": dm(), "state": state}, st.sampled_from(["start", "stop"])
    )


templates = st.deferred(lambda: message_template() | receipt_template() | typing_template())


# Strategies the composites below draw from, built once: a strategy built inside a composite is
# validated again at every draw, which made generating 10,000 frames take minutes.
GARBAGE = st.text(max_size=200)
SHORT_TEXT = st.text(max_size=5)
BYTES = st.binary(max_size=300)
NOT_OBJECTS = json_scalars | st.lists(json_shallow, max_size=4)
SOME_FIELDS = st.dictionaries(st.text(max_size=8).filter(lambda k: k != "type"), json_scalars, max_size=3)
EXTRAS = st.dictionaries(st.text(max_size=10).filter(lambda k: k != "type"), json_shallow, max_size=2)
NOT_A_TYPE = json_shallow.filter(lambda v: not (isinstance(v, str) and v in KNOWN_TYPES))
ALMOST_A_TYPE = st.sampled_from(KNOWN_TYPES).map(lambda t: t.upper() if len(t) % 2 else t + " ")
ANY_ID = client_ids | json_scalars
TEMPLATES_OR_PING = templates | st.just({"type": "ping"})


def ref_of(frame: dict[str, Any]) -> str | None:
    cid = frame.get("id")
    return cid if isinstance(cid, str) else None


@st.composite
def not_json(draw: st.DrawFn) -> Fuzz:
    kind = draw(st.sampled_from(["garbage", "prefix", "fixed"]))
    if kind == "garbage":
        return Fuzz("#" + draw(GARBAGE))
    if kind == "prefix":
        text = dumps(draw(templates))
        return Fuzz(text[: draw(st.integers(0, len(text) - 1))])
    fixed = ['{"type": "ping",}', "{'type': 'ping'}", '{"type":"ping"}{}', "[1,]", "tru", '{"a" 1}', "\x00", " "]
    return Fuzz(draw(st.sampled_from(fixed)))


@st.composite
def not_an_object(draw: st.DrawFn) -> Fuzz:
    value = draw(NOT_OBJECTS)
    return Fuzz(dumps(value))


@st.composite
def unknown_type(draw: st.DrawFn) -> Fuzz:
    frame = draw(SOME_FIELDS)
    if draw(st.booleans()):
        frame["type"] = draw(NOT_A_TYPE)
    elif draw(st.booleans()):
        frame["type"] = draw(ALMOST_A_TYPE)
    if draw(st.booleans()):
        frame["id"] = draw(ANY_ID)
    return Fuzz(dumps(frame), ref=ref_of(frame))


@st.composite
def missing_field(draw: st.DrawFn) -> Fuzz:
    frame = draw(templates)
    gone = draw(st.sampled_from(sorted(k for k in frame if k != "type")))
    del frame[gone]
    return Fuzz(dumps(frame), ref=ref_of(frame))


not_str = st.integers() | st.floats(allow_nan=False) | st.booleans() | st.lists(json_scalars, max_size=3)
not_str = not_str | st.dictionaries(st.text(max_size=5), json_scalars, max_size=3)
WRONG: dict[str, st.SearchStrategy[Any]] = {
    "id": not_str | st.none() | st.just("") | st.text(min_size=129, max_size=140),
    "to": not_str | st.just("") | st.text(min_size=129, max_size=140),
    "body": not_str | st.none() | st.sampled_from(["", " ", "\n\t ", "\u3000"]),
    "conversation": not_str
    | st.none()
    | st.just("")
    | st.text(min_size=301, max_size=320)
    | st.text(max_size=30).map(lambda s: "?" + s)
    | st.sampled_from(["dm:a", "dm:b:a", "group:", "chan:x", "dm:x:y:z"]),
    "status": st.text(max_size=10).filter(lambda s: s not in ("delivered", "read")) | not_str | st.none(),
    "state": st.text(max_size=10).filter(lambda s: s not in ("start", "stop")) | not_str | st.none(),
    "up_to_seq": st.integers(max_value=-1)
    | st.integers(0, 10**6).map(lambda i: i + 0.5)
    | st.text(alphabet="abcxyz", max_size=5)
    | st.lists(st.integers(), max_size=2)
    | st.none(),
}


@st.composite
def wrong_field(draw: st.DrawFn) -> Fuzz:
    frame = draw(templates)
    name = draw(st.sampled_from(sorted(k for k in frame if k != "type")))
    frame[name] = draw(WRONG[name])
    return Fuzz(dumps(frame), ref=ref_of(frame))


@st.composite
def unacceptable(draw: st.DrawFn) -> Fuzz:
    """Well-formed frames the gateway refuses on their meaning."""
    kind = draw(st.sampled_from(["both", "self", "foreign-receipt", "foreign-typing"]))
    cid = draw(client_ids)
    if kind == "both":
        frame = {"type": "message", "id": cid, "to": peer(), "group": draw(client_ids), "body": "x"}
        return Fuzz(dumps(frame), ref=cid)
    if kind == "self":
        return Fuzz(dumps({"type": "message", "id": cid, "to": me(), "body": draw(bodies)}), ref=cid)
    foreign = "dm:" + ":".join(sorted([uuid.uuid4().hex, uuid.uuid4().hex]))
    if kind == "foreign-receipt":
        frame = {"type": "receipt", "conversation": foreign, "status": "read", "up_to_seq": 1}
    else:
        frame = {"type": "typing", "conversation": foreign, "state": "start"}
    return Fuzz(dumps(frame), code="forbidden")


@st.composite
def huge(draw: st.DrawFn) -> Fuzz:
    kind = draw(st.sampled_from(["body", "frame", "deep", "deep-inside", "digits"]))
    if kind == "body":
        # Over the body limit inside a frame under the frame limit: payload_too_large with ref.
        char = draw(st.sampled_from(["x", "é", "€"]))
        n = draw(st.integers(MAX_BODY_CHARS + 1, (MAX_FRAME_BYTES - 1000) // len(char.encode())))
        cid = draw(client_ids)
        return Fuzz(
            dumps({"type": "message", "id": cid, "to": peer(), "body": char * n}), code="payload_too_large", ref=cid
        )
    if kind == "frame":
        # Over the frame limit (no ref: the frame is not read): payload_too_large.
        n = draw(st.integers(MAX_FRAME_BYTES + 1, 3 * MAX_FRAME_BYTES))
        frame = {"type": "message", "id": draw(client_ids), "to": peer(), "body": "y" * n}
        return Fuzz(dumps(frame), code="payload_too_large")
    if kind == "deep":
        depth = draw(st.integers(3000, 30000))
        return Fuzz("[" * depth + "]" * depth)
    if kind == "deep-inside":
        depth = draw(st.integers(3000, 9000))
        frame = dumps({"type": "message", "id": draw(client_ids), "to": peer(), "body": "PLACE"})
        return Fuzz(frame.replace('"PLACE"', '{"a":' * depth + "1" + "}" * depth))
    # More digits than Python converts (4300): not a number the server can read.
    digits = draw(st.integers(4301, 20000))
    number = "1" + "0" * digits
    return Fuzz(f'{{"type": "receipt", "conversation": "{dm()}", "status": "read", "up_to_seq": {number}}}')


@st.composite
def lone_surrogate(draw: st.DrawFn) -> Fuzz:
    frame = dict(draw(TEMPLATES_OR_PING))  # a copy: st.just gives the same dict every time
    where = draw(st.sampled_from([*sorted(k for k in frame if k != "type"), "<key>"]))
    bad = chr(draw(st.integers(0xD800, 0xDFFF)))
    if where == "<key>":
        frame["x" + bad] = 1
    else:
        frame[where] = draw(SHORT_TEXT) + bad + draw(SHORT_TEXT)
    # ensure_ascii: the surrogate travels as a JSON escape, in a frame that is valid UTF-8.
    ref = frame.get("id") if isinstance(frame.get("id"), str) and where != "id" else None
    return Fuzz(json.dumps(frame), ref=ref)


@st.composite
def binary(draw: st.DrawFn) -> Fuzz:
    if draw(st.booleans()):
        return Fuzz(draw(BYTES), binary=True)
    return Fuzz(dumps(draw(TEMPLATES_OR_PING)).encode(), binary=True)


@st.composite
def ping_with_extras(draw: st.DrawFn) -> Fuzz:
    """Unknown fields are ignored (forward compatibility): a ping with any of them is a ping."""
    extras = draw(EXTRAS)
    kind = draw(st.sampled_from(["plain", "nested", "number"]))
    if kind == "nested":
        depth = draw(st.integers(1, 200))
        extras["deep"] = json.loads("[" * depth + "]" * depth)
    elif kind == "number":
        extras["n"] = 10 ** draw(st.integers(19, 4000))
    return Fuzz(dumps({**extras, "type": "ping"}), code=None)


#: The kinds of frame and their weights.
KINDS = [
    (not_json(), 10),
    (not_an_object(), 8),
    (unknown_type(), 10),
    (missing_field(), 12),
    (wrong_field(), 20),
    (unacceptable(), 6),
    (huge(), 4),
    (lone_surrogate(), 8),
    (binary(), 6),
    (ping_with_extras(), 6),
]
fuzz_frames = st.sampled_from([s for s, weight in KINDS for _ in range(weight)]).flatmap(lambda s: s)


# -- the checks ----------------------------------------------------------------------------


def next_reply(ws: WsClient, timeout: float = 30) -> dict[str, Any]:
    """The next error or pong of a socket, in arrival order; other frames are kept aside."""
    for i, f in enumerate(ws.backlog):
        if f.get("type") in ("error", "pong"):
            return ws.backlog.pop(i)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no answer within {timeout}s (socket closed: {ws.closed.is_set()}, code {ws.close_code})"
        try:
            f = ws.frames.get(timeout=min(left, 1))
        except Exception:
            continue
        if f.get("type") in ("error", "pong"):
            return f
        if f.get("type") == "ack":
            ws.backlog.append(f)


def check_reply(sent: Fuzz, got: dict[str, Any]) -> None:
    what = f"answer to {sent.payload[:200]!r}: {got}"
    if sent.pong:
        assert got == {"type": "pong"}, what
        return
    assert got["type"] == "error", what
    assert set(got) <= {"type", "code", "message", "ref", "details"}, what
    assert got["code"] == sent.code, what
    assert isinstance(got["message"], str) and got["message"], what
    assert got.get("ref") == sent.ref, what


def send(ws: WsClient, fuzz: Fuzz) -> None:
    if fuzz.binary:
        ws.ws.send_binary(fuzz.payload)
    else:
        ws.ws.send(fuzz.payload)


def pick(pool: list[Paced]) -> Paced:
    """A socket with a token, waiting for one if none has."""
    while True:
        waits = [(p.wait_token(), i) for i, p in enumerate(pool)]
        wait, i = min(waits)
        if wait <= 0:
            pool[i].tokens -= 1
            return pool[i]
        time.sleep(wait)


def problems_in_logs(p: Party) -> list[str]:
    """Service errors and tracebacks, and 5xx answers from Nginx, logged since the module began."""
    found = []
    for path, mark in p.log_marks.items():
        if not path.exists():
            continue
        with open(path, "rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        for line in text.splitlines():
            if path.name == "access.log":
                if re.search(r'" 5\d\d ', line):
                    found.append(f"{path.name}: {line}")
            elif "Traceback" in line or '"level": "ERROR"' in line or '"level": "CRITICAL"' in line:
                found.append(f"{path.name}: {line[:500]}")
    return found


# -- the tests ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_fuzzed_frame_gets_its_error_and_the_sockets_stay_open(party: Party) -> None:
    p = party

    @settings(FUZZ_SETTINGS, max_examples=EXAMPLES)
    @given(frames=st.lists(fuzz_frames, min_size=BATCH, max_size=BATCH), valid=st.lists(bodies, max_size=3))
    def batch(frames: list[Fuzz], valid: list[str]) -> None:
        sent: dict[int, list[Fuzz]] = {}
        messages: dict[str, tuple[Paced, str]] = {}
        # The valid messages go out among the fuzz frames.
        slots = {(i * 37) % BATCH: body for i, body in enumerate(valid)}
        for i, fuzz in enumerate(frames):
            if i in slots:
                sock = pick(p.pool)
                cid = sock.ws.send_message(to=p.bob.user_id, body=slots[i])
                messages[cid] = (sock, slots[i])
                p.sent += 1
            sock = pick(p.pool)
            send(sock.ws, fuzz)
            sent.setdefault(id(sock), []).append(fuzz)
            p.sent += 1
        for sock in p.pool:
            for fuzz in sent.get(id(sock), []):
                check_reply(fuzz, next_reply(sock.ws))
            assert not sock.ws.closed.is_set(), f"socket closed ({sock.ws.close_code} {sock.ws.close_reason})"
        for cid, (sock, body) in messages.items():
            p.acked[cid] = (body, sock.ws.expect("ack", id=cid, timeout=30))

    batch()
    assert p.sent >= 10_000, p.sent
    # Every valid message reached Bob, once, as sent.
    for cid, (body, ack) in p.acked.items():
        got = p.bob_ws.expect("message", id=cid, timeout=30)
        assert (got["body"], got["seq"], got["message_id"], got["from"]) == (
            body,
            ack["seq"],
            ack["message_id"],
            p.alice.user_id,
        )
    # The history holds exactly what was acknowledged: nothing fuzzed was stored, nothing changed.
    stored: dict[str, dict[str, Any]] = {}
    query = "?limit=100"
    while True:
        r = p.alice.api.get(f"/v1/conversations/{dm_id(p.alice, p.bob)}/messages{query}")
        assert r.status_code == 200, r.text
        page = r.json()
        stored.update({m["id"]: m for m in page["messages"]})
        if page["next_before_seq"] is None:
            break
        query = f"?limit=100&before_seq={page['next_before_seq']}"
    assert set(stored) == set(p.acked)
    for cid, (body, ack) in p.acked.items():
        m = stored[cid]
        assert (m["body"], m["seq"], m["message_id"]) == (body, ack["seq"], ack["message_id"])
    print(f"frame fuzzing: {p.sent} frames sent, {len(p.acked)} valid messages among them")


@pytest.mark.slow
def test_invalid_utf8_in_a_text_frame_closes_with_1007_and_nothing_else_breaks(party: Party) -> None:
    """RFC 6455 section 8.1: a text frame that is not UTF-8 fails the connection (1007)."""
    p = party

    @settings(FUZZ_SETTINGS, max_examples=12)
    @given(
        head=st.binary(max_size=40),
        bad=st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xf8\x88\x80\x80\x80", b"\x80"]),
        tail=st.binary(max_size=40).filter(lambda b: not b or b[0] < 0x80),
    )
    def one(head: bytes, bad: bytes, tail: bytes) -> None:
        payload = head + bad + tail
        try:
            payload.decode("utf-8")
            return  # the random head happened to complete the sequence: not what is tested here
        except UnicodeDecodeError:
            pass
        ws = p.alice.connect()
        ws.ws.send(payload, opcode=websocket.ABNF.OPCODE_TEXT)
        p.sent += 1
        closed.append(payload)
        assert ws.closed.wait(15), "socket not closed"
        assert ws.close_code == 1007, (ws.close_code, ws.close_reason)

    closed: list[bytes] = []
    one()
    assert len(closed) >= 6, closed
    # Only the offending sockets closed.
    for sock in p.pool[:3]:
        sock.ws.send({"type": "ping"})
        assert next_reply(sock.ws) == {"type": "pong"}


@pytest.mark.slow
def test_a_frame_over_the_read_limit_closes_with_1009(party: Party) -> None:
    p = party
    for extra in (1, 4096):
        ws = p.alice.connect()
        ws.ws.send(json.dumps({"type": "ping", "pad": "z" * (READ_LIMIT + extra)}))
        p.sent += 1
        assert ws.closed.wait(15), "socket not closed"
        assert ws.close_code == 1009, (ws.close_code, ws.close_reason)
    # The pool is untouched.
    for sock in p.pool[:3]:
        sock.ws.send({"type": "ping"})
        assert next_reply(sock.ws) == {"type": "pong"}


@pytest.mark.slow
def test_a_flood_of_fuzzed_frames_is_rate_limited_and_the_socket_stays_open(party: Party) -> None:
    """Sent without pacing: each frame gets its own error, or rate_limited beyond the limit."""
    p = party
    ws = p.alice.connect()

    @settings(FUZZ_SETTINGS, max_examples=3)
    @given(frames=st.lists(fuzz_frames, min_size=400, max_size=400))
    def flood(frames: list[Fuzz]) -> None:
        for fuzz in frames:
            send(ws, fuzz)
        p.sent += len(frames)
        limited = 0
        for fuzz in frames:
            got = next_reply(ws)
            if got.get("code") == "rate_limited":
                assert set(got) <= {"type", "code", "message", "ref", "details"}, got
                limited += 1
            else:
                check_reply(fuzz, got)
        assert limited > 0
        assert not ws.closed.is_set()
        # Tokens come back with time: then the frame is answered for what it is again.
        while True:
            ws.send({"type": "ping"})
            if next_reply(ws).get("type") == "pong":
                break
            time.sleep(0.2)

    flood()
    # A valid message goes through, sent again (same id) while the socket is still over its rate.
    cid = uuid.uuid4().hex
    deadline = time.monotonic() + 30
    ack: dict[str, Any] | None = None
    while ack is None:
        assert time.monotonic() < deadline, "the message was never acknowledged"
        ws.send_message(to=p.bob.user_id, body="after the flood", cid=cid)
        while True:  # its ack, or rate_limited (then it is sent again)
            f = ws.frames.get(timeout=30)
            if f.get("type") == "ack" and f.get("id") == cid:
                ack = f
                break
            if f.get("type") == "error":
                assert f["code"] == "rate_limited", f
                time.sleep(0.2)
                break
    assert p.bob_ws.expect("message", id=cid, timeout=30)["seq"] == ack["seq"]


def test_no_5xx_and_no_service_error_while_fuzzing(party: Party) -> None:
    """Last in the module: Nginx answered no 5xx and no service logged an error or a traceback."""
    for ws in party.alice.sockets:
        ws.close()
    eventually(lambda: all(ws.closed.is_set() for ws in party.alice.sockets), what="sockets closed")
    time.sleep(0.5)  # Nginx writes a WebSocket's access-log line once both of its ends are closed
    assert problems_in_logs(party) == []

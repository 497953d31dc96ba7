"""Pure rules of the gateway: no sockets, no Kafka, unit-testable.

- :class:`Sequencer`: the per-socket order keeper of the delivery protocol
  (docs: protocol point 4). Every frame that carries a ``seq`` passes through
  it; it decides what is written now, what waits, and which replays to ask for.
- :class:`TokenBucket`: the per-socket frame rate limit.
- :func:`origin_allowed`: the browser Origin check made before the upgrade.
- :func:`upgrade_problem`: what is wrong with a WebSocket upgrade request, if anything.
- :func:`frame_to_event`: a validated client frame to the Kafka event it becomes.
- :func:`primary_online`: the REQUIRE_PRIMARY_ONLINE device policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from chatlib.errors import ApiError, ErrorCode, forbidden, invalid
from chatlib.schemas import (
    ClientMessage,
    ClientReceipt,
    ClientTyping,
    Event,
    InboundMessage,
    InboundReceipt,
    TypingSignal,
    UserSessions,
    dm_conversation,
    group_conversation,
    parse_conversation,
)
from chatlib.topics import MESSAGES_IN, SIGNALS, Topic

#: Ask again for a replay that has not filled its gap after this long (protocol point 4).
REPLAY_RETRY_S = 3.0
#: The gateway waits this long before asking for a gap (GATEWAY_GAP_GRACE_MS). Most gaps
#: close by themselves within a hop: a sender's own ack (one hop) often overtakes the
#: peer's earlier message (two hops). Asking at once made every such overlap a replay,
#: and under load the replays slowed persistence until everything overlapped.
GAP_GRACE_S = 0.3
#: A socket whose initial sync has not come after this long announces itself again.
INITIAL_RETRY_S = 10.0
MAX_INITIAL_RETRY_S = 60.0
#: Frames one socket may hold back waiting for a gap to fill; beyond this the socket is closed
#: (the client reconnects and gets everything from the persistence replay).
MAX_BUFFERED = 5000

Frame = dict[str, Any]


# ---------------------------------------------------------------------------
# Sequencer
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayAsk:
    """Ask persistence for ``conversation`` messages with ``after_seq < seq <= up_to_seq``."""

    conversation: str
    after_seq: int
    up_to_seq: int


@dataclass
class SeqOutput:
    """What the socket must do: write ``frames`` in this order, produce ``asks``."""

    frames: list[Frame] = field(default_factory=list)
    asks: list[ReplayAsk] = field(default_factory=list)
    #: Too many frames held back: close the socket.
    overflow: bool = False
    #: The initial sync is overdue: announce the socket again (DeviceConnected).
    resync: bool = False


def frame_position(frame: Frame) -> tuple[str, int] | None:
    """``(conversation, seq)`` of a frame that must be ordered, else None."""
    seq = frame.get("seq")
    conv = frame.get("conversation")
    if isinstance(seq, int) and not isinstance(seq, bool) and isinstance(conv, str):
        return conv, seq
    return None


class Sequencer:
    """Per-socket ordering of seq-carrying frames (protocol point 4).

    ``hw[conv]`` is the highest seq written to the socket. Frames wait in a
    per-conversation buffer until they are next in line; a gap makes one
    ReplayRequest (asked again after :data:`REPLAY_RETRY_S` if still open).
    Nothing seq-carrying is written before the socket's initial sync.
    """

    def __init__(
        self,
        now: float = 0.0,
        retry_after_s: float = REPLAY_RETRY_S,
        initial_retry_s: float = INITIAL_RETRY_S,
        max_buffered: int = MAX_BUFFERED,
        gap_grace_s: float = 0.0,
    ):
        self.ready = False
        self.hw: dict[str, int] = {}
        self.buffer: dict[str, dict[int, Frame]] = {}
        #: conversation -> (up_to_seq asked for, when)
        self.asked: dict[str, tuple[int, float]] = {}
        self.retry_after_s = retry_after_s
        self.gap_grace_s = gap_grace_s
        #: conversation -> when its current gap was first seen (asked for after the grace)
        self.gaps: dict[str, float] = {}
        self.initial_retry_s = initial_retry_s
        self.max_buffered = max_buffered
        self._announced_at = now
        self._initial_wait = initial_retry_s
        self._count = 0

    @property
    def buffered(self) -> int:
        """How many frames are held back."""
        return self._count

    # -- entry points -------------------------------------------------------

    def deliver(
        self, frames: list[Frame], sync: dict[str, int] | None = None, initial: bool = False, now: float = 0.0
    ) -> SeqOutput:
        """One Deliver for this socket: frames in event order, then its sync map."""
        out = SeqOutput()
        if sync is None and initial:
            sync = {}
        if sync is None:
            for frame in frames:
                pos = frame_position(frame)
                if pos is None:
                    out.frames.append(frame)
                else:
                    self._offer(pos[0], pos[1], frame, now, out)
        else:
            touched: set[str] = set(sync)
            for frame in frames:
                pos = frame_position(frame)
                if pos is None:
                    out.frames.append(frame)
                else:
                    self._hold(pos[0], pos[1], frame)
                    touched.add(pos[0])
            for conv, up_to in sync.items():
                self._release_up_to(conv, up_to, out)
            if initial:
                self.ready = True
                touched |= set(self.buffer)
            for conv in sorted(touched):
                self._settle(conv, now, out)
        out.overflow = self._count > self.max_buffered
        return out

    def tick(self, now: float) -> SeqOutput:
        """Periodic check: re-ask replays that did not fill their gap, flag an overdue initial sync."""
        out = SeqOutput()
        if not self.ready:
            if now - self._announced_at >= self._initial_wait:
                self._announced_at = now
                # Back off: with persistence away, thousands of sockets must not keep re-announcing.
                self._initial_wait = min(self._initial_wait * 2, MAX_INITIAL_RETRY_S)
                out.resync = True
            return out
        for conv, seen in list(self.gaps.items()):
            if now - seen >= self.gap_grace_s:
                self._settle(conv, now, out)
        for conv, (_, at) in list(self.asked.items()):
            if now - at >= self.retry_after_s:
                buf = self.buffer.get(conv)
                if not buf:
                    del self.asked[conv]
                    continue
                ask = ReplayAsk(conv, self.hw.get(conv, 0), max(buf) - 1)
                self.asked[conv] = (ask.up_to_seq, now)
                out.asks.append(ask)
        return out

    # -- internals ----------------------------------------------------------

    def _hold(self, conv: str, seq: int, frame: Frame) -> None:
        # A seq already written is a duplicate; a seq already held keeps its first copy
        # (a held ack must not be replaced by the replayed message of the same seq).
        if seq <= self.hw.get(conv, 0):
            return
        buf = self.buffer.setdefault(conv, {})
        if seq not in buf:
            buf[seq] = frame
            self._count += 1

    def _write(self, conv: str, seq: int, frame: Frame, out: SeqOutput) -> None:
        out.frames.append(frame)
        self.hw[conv] = seq

    def _offer(self, conv: str, seq: int, frame: Frame, now: float, out: SeqOutput) -> None:
        hw = self.hw.get(conv, 0)
        if seq <= hw:
            return  # duplicate
        if not self.ready:
            self._hold(conv, seq, frame)
            return
        if seq == hw + 1:
            # A conversation unknown to hw starts at 0: seq 1 cannot have a gap before it.
            self._write(conv, seq, frame, out)
            self._settle(conv, now, out)
            return
        self._hold(conv, seq, frame)
        self._settle(conv, now, out)

    def _release_up_to(self, conv: str, up_to: int, out: SeqOutput) -> None:
        """Sync: everything of ``conv`` up to ``up_to`` is now written or not visible to this device."""
        hw = self.hw.get(conv, 0)
        buf = self.buffer.get(conv)
        if buf:
            for seq in sorted(s for s in buf if s <= up_to):
                frame = buf.pop(seq)
                self._count -= 1
                if seq > hw:
                    out.frames.append(frame)
                    hw = seq
            if not buf:
                del self.buffer[conv]
        self.hw[conv] = max(hw, up_to)

    def _settle(self, conv: str, now: float, out: SeqOutput) -> None:
        """Write what is now consecutive, drop what is stale, ask for what is missing."""
        if not self.ready and conv not in self.hw:
            return  # before the initial sync only a sync may release frames
        buf = self.buffer.get(conv)
        hw = self.hw.get(conv, 0)
        if buf:
            for seq in sorted(buf):
                if seq <= hw:
                    del buf[seq]
                    self._count -= 1
                elif seq == hw + 1:
                    self._write(conv, seq, buf.pop(seq), out)
                    self._count -= 1
                    hw = seq
                else:
                    break
            if not buf:
                del self.buffer[conv]
                buf = None
        asked = self.asked.get(conv)
        if asked is not None and (buf is None or hw >= asked[0]):
            del self.asked[conv]
            asked = None
        if not buf:
            self.gaps.pop(conv, None)
        if buf and self.ready:
            top = max(buf) - 1
            # Once per gap: ask only if this gap reaches beyond what is already asked for,
            # and only once it has stayed open for the grace period.
            if asked is None or asked[0] < top:
                first = self.gaps.setdefault(conv, now)
                if now - first < self.gap_grace_s:
                    return
                self.gaps.pop(conv, None)
                self.asked[conv] = (top, now)
                out.asks.append(ReplayAsk(conv, hw, top))


# ---------------------------------------------------------------------------
# Rate limit and origin
# ---------------------------------------------------------------------------


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` (default twice the rate) saved up."""

    def __init__(self, rate: float, burst: float | None = None, now: float = 0.0):
        self.rate = rate
        self.capacity = burst if burst is not None else 2 * rate
        self.tokens = self.capacity
        self.at = now

    def take(self, now: float) -> bool:
        """Spend one token; False when the socket is over its limit (a rate <= 0 is unlimited)."""
        if self.rate <= 0:
            return True
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def _tokens(value: str | None) -> set[str]:
    return {t.strip().lower() for t in (value or "").split(",") if t.strip()}


def upgrade_problem(headers: Mapping[str, str]) -> str | None:
    """Why a request is not a WebSocket upgrade this gateway accepts (RFC 6455, 4.2.1), or None.

    Only version 13 exists; the key must be 16 bytes in base64 (24 characters).
    Extensions a client offers (permessage-deflate) are never accepted.
    """
    if "websocket" not in _tokens(headers.get("Upgrade")):
        return "a WebSocket upgrade is required"
    if "upgrade" not in _tokens(headers.get("Connection")):
        return "a WebSocket upgrade is required (Connection: Upgrade)"
    if headers.get("Sec-WebSocket-Version", "").strip() != "13":
        return "Sec-WebSocket-Version must be 13"
    key = headers.get("Sec-WebSocket-Key", "").strip()
    if len(key) != 24 or not key.endswith("=="):
        return "Sec-WebSocket-Key is missing or malformed"
    return None


def _norm_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def parse_origins(raw: str) -> frozenset[str]:
    """GATEWAY_ALLOWED_ORIGINS: a comma list of origins, ``*`` for any."""
    return frozenset(_norm_origin(o) for o in raw.split(",") if o.strip())


def origin_allowed(origin: str | None, allowed: frozenset[str], host: str | None = None) -> bool:
    """A socket without Origin is a non-browser client (allowed); a browser's must be the
    page's own site (its host and port are the Host the browser asked for: the tester page
    served by the same Nginx, whatever port it was moved to) or listed."""
    if origin is None or origin == "":
        return True
    if "*" in allowed:
        return True
    norm = _norm_origin(origin)
    if host and norm.partition("://")[2] == _norm_host(host, norm.partition("://")[0]):
        return True
    return norm in allowed


def _norm_host(host: str, scheme: str) -> str:
    """A Host header as an origin's host[:port] (the scheme's default port left out)."""
    host = host.strip().lower()
    default = {"http": ":80", "https": ":443"}.get(scheme, "")
    return host.removesuffix(default) if default else host


# ---------------------------------------------------------------------------
# Client frames to events
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """The verified caller of one socket (from the Nginx identity headers)."""

    user_id: str
    device_id: str
    device_type: str = "mobile"
    primary: bool = False


def check_conversation(conversation: str, user_id: str) -> str:
    """A conversation id from a client: it must parse, and a dm must include the caller."""
    try:
        kind, ids = parse_conversation(conversation)
    except ValueError:
        raise invalid("unknown conversation id", field="conversation") from None
    if kind == "dm" and user_id not in ids:
        raise forbidden("not a participant of this conversation")
    return conversation


def message_conversation(frame: ClientMessage, user_id: str) -> str:
    """The conversation a message frame goes to."""
    if frame.group is not None:
        conv = group_conversation(frame.group)
    else:
        assert frame.to is not None
        if frame.to == user_id:
            raise invalid("cannot send a message to yourself", field="to")
        conv = dm_conversation(user_id, frame.to)
    try:
        parse_conversation(conv)
    except ValueError:
        raise invalid("invalid recipient", field="group" if frame.group is not None else "to") from None
    return conv


def frame_to_event(frame: Any, who: Identity, gateway: str, ts: int) -> tuple[Topic, str, Event]:
    """The Kafka (topic, key, event) a client frame becomes; identity comes from ``who``, never the frame.

    Raises ApiError (invalid_request, forbidden) for a frame that is well-formed but not acceptable.
    """
    if isinstance(frame, ClientMessage):
        conv = message_conversation(frame, who.user_id)
        ev: Event = InboundMessage(
            id=frame.id,
            conversation=conv,
            sender=who.user_id,
            sender_device=who.device_id,
            gateway=gateway,
            to=frame.to,
            group=frame.group,
            body=frame.body,
            received_ts=ts,
        )
        return MESSAGES_IN, conv, ev
    if isinstance(frame, ClientReceipt):
        conv = check_conversation(frame.conversation, who.user_id)
        ev = InboundReceipt(
            conversation=conv,
            user_id=who.user_id,
            device_id=who.device_id,
            gateway=gateway,
            status=frame.status,
            up_to_seq=frame.up_to_seq,
        )
        return MESSAGES_IN, conv, ev
    if isinstance(frame, ClientTyping):
        conv = check_conversation(frame.conversation, who.user_id)
        ev = TypingSignal(conversation=conv, user_id=who.user_id, device_id=who.device_id, state=frame.state)
        return SIGNALS, conv, ev
    raise ApiError(ErrorCode.INVALID_REQUEST, "unsupported frame type")


# ---------------------------------------------------------------------------
# Device policy
# ---------------------------------------------------------------------------

PRIMARY_OFFLINE = "primary device offline"


def primary_online(sessions: UserSessions | None, local_primary: bool) -> bool:
    """Is the user's primary device online (here, or anywhere per the session view)?"""
    if local_primary:
        return True
    return sessions is not None and any(d.primary for d in sessions.devices)

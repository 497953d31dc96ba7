"""A fault campaign with a history checker, as Jepsen does it.

Clients that behave like careful mobile apps (:class:`CarefulClient`:
reconnect with backoff, resend every unacknowledged message with the same id,
dedupe by ``message_id``, send ``delivered`` receipts) send open-loop 1-to-1
and group traffic while faults are injected one after another into a
supervised stack (``Stack.supervise``: a killed process is started again by
the supervisor, as under ``make run``). Each client records what it sent, what
was acknowledged and what it received; :func:`check` reads every record and
the stored histories and counts what went wrong. :class:`Summary` is the one
line the campaign prints.

The short campaign runs in ``make test`` (tests/e2e/test_faults.py); the long
one is ``make faults`` (``python -m tests.faults``), which writes its line to
docs/faults.md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from helper.stack import Stack
from tests.support import Api, User, WsClient, new_user

#: The services a campaign kills and stalls (gateways are added per instance).
#: How long a careful client holds its receipts back for a gap in a conversation's seqs.
GAP_WAIT_S = 15.0

SERVICE_KEYS = ["session", "persistence", "message-router", "group-router", "profile", "group", "push-notification"]


# ---------------------------------------------------------------------------
# The stack
# ---------------------------------------------------------------------------


@contextmanager
def supervised_stack(gateways: int = 2, say: Callable[[str], None] | None = None) -> Iterator[Stack]:
    """A stack of its own (the suite's shared one must not lose its broker), supervised as `make run` is."""
    var = Path(tempfile.mkdtemp(prefix="chat-faults-"))
    stack = Stack.for_tests(var, gateways=gateways)
    lines: list[str] = []
    try:
        stack.start_all()
        stack.supervise(say=lambda line: (lines.append(line), say(line) if say else None))
        stack.console = lines  # type: ignore[attr-defined]
        yield stack
    except BaseException:
        for log in sorted((var / "log").glob("*.log")):
            print(f"===== {log.name} =====\n{log.read_text(errors='replace')[-2500:]}")
        raise
    finally:
        stack.stop()
        if not os.environ.get("KEEP_TEST_VAR"):
            shutil.rmtree(var, ignore_errors=True)


def restarts(stack: Stack, key: str) -> int:
    assert stack.supervision is not None
    return stack.supervision.supervisor.watched[key].restarts


def is_up(stack: Stack, key: str) -> bool:
    assert stack.supervision is not None
    return stack.supervision.supervisor.watched[key].state == "up"


def ready_times(stack: Stack) -> dict[str, float]:
    """Per process, the longest time from a restart to serving, from the supervisor's console lines."""
    out: dict[str, float] = {}
    for line in getattr(stack, "console", []):
        m = re.match(r"(\S+) is back \(pid \d+, ready ([\d.]+) s after its start\)", line)
        if m:
            out[m[1]] = max(out.get(m[1], 0.0), float(m[2]))
    return out


def wait_back(stack: Stack, key: str, before: int, timeout: float) -> bool:
    """True once ``key`` was started again after a kill (restarts > ``before``) and serves."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if restarts(stack, key) > before and is_up(stack, key):
            return True
        time.sleep(0.1)
    return False


# ---------------------------------------------------------------------------
# A careful client
# ---------------------------------------------------------------------------


@dataclass
class Sent:
    cid: str
    to: str | None
    group: str | None
    body: str
    recipients: list[str]
    at: float
    last_try: float = 0.0


class CarefulClient:
    """One device of one user that behaves like a careful mobile app, and records everything.

    Its thread keeps a socket open (reconnecting with backoff, refreshing its
    token when it is refused), sends every unacknowledged message again with
    the same id after a reconnect or after ``resend_s`` without an ack, and
    answers every message with a ``delivered`` receipt. Nothing is deduped
    before it is recorded: the checker counts redeliveries and conflicts.
    """

    def __init__(self, user: User, ws_url: str, resend_s: float = 3.0):
        self.user = user
        self.ws_url = ws_url
        self.resend_s = resend_s
        self.lock = threading.Lock()
        self.sent: dict[str, Sent] = {}
        self.unacked: dict[str, Sent] = {}
        #: cid -> every ack received: (message_id, conversation, seq)
        self.acks: dict[str, list[tuple[str, str, int]]] = {}
        self.acked_at: dict[str, float] = {}
        #: message_id -> every delivery: (conversation, seq)
        self.received: dict[str, list[tuple[str, int]]] = {}
        #: conversation -> seqs in arrival order, first copy of each message only
        self.order: dict[str, list[int]] = {}
        #: conversation -> seqs this device knows (received, or its own acknowledged messages)
        self.known: dict[str, set[int]] = {}
        #: conversation -> (the seq confirmed with a delivered receipt, when a gap above it was first seen)
        self.receipted: dict[str, tuple[int, float]] = {}
        self.reconnects = 0
        self.errors: list[dict[str, Any]] = []
        self.ws: WsClient | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"client-{user.username}", daemon=True)

    @property
    def user_id(self) -> str:
        return self.user.user_id

    def start(self) -> CarefulClient:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        if self.ws is not None:
            self.ws.close()

    def send(self, recipients: list[str], to: str | None = None, group: str | None = None) -> str:
        """Queue one message (open loop: whether the socket is up or not) and try to send it now."""
        cid = uuid.uuid4().hex
        s = Sent(cid, to, group, f"m {cid[:8]}", recipients, time.monotonic())
        with self.lock:
            self.sent[cid] = s
            self.unacked[cid] = s
        self._try(s)
        return cid

    def _try(self, s: Sent) -> None:
        ws = self.ws
        if ws is None or ws.closed.is_set():
            return
        s.last_try = time.monotonic()
        try:
            ws.send_message(to=s.to, group=s.group, body=s.body, cid=s.cid)
        except Exception:
            pass

    def _connect(self) -> WsClient:
        try:
            return WsClient(self.ws_url, self.user.access_token, drop_duplicates=False, timeout=5)
        except Exception as exc:
            if "401" in str(exc):
                self._refresh()
            raise

    def _refresh(self) -> None:
        r = Api(self.user.base_url).post("/v1/auth/refresh", json={"refresh_token": self.user.refresh_token})
        if r.status_code == 200:
            body = r.json()
            self.user.access_token, self.user.refresh_token = body["access_token"], body["refresh_token"]

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            if self.ws is None or self.ws.closed.is_set():
                if self.ws is not None:
                    self.ws.close()
                    self.ws = None
                try:
                    self.ws = self._connect()
                except Exception:
                    self._stop.wait(min(2.0, 0.1 * 2**attempt) * random.uniform(0.5, 1.0))
                    attempt += 1
                    continue
                attempt = 0
                self.reconnects += 1
                with self.lock:
                    pending = sorted(self.unacked.values(), key=lambda s: s.at)
                for s in pending:  # everything unacked, again, with the same id
                    self._try(s)
            try:
                frame = self.ws.frames.get(timeout=0.1)
            except queue.Empty:
                frame = None
            if frame is not None:
                self._handle(frame)
            now = time.monotonic()
            with self.lock:
                stale = [s for s in self.unacked.values() if now - max(s.at, s.last_try) >= self.resend_s]
            for s in stale:
                self._try(s)

    def _handle(self, f: dict[str, Any]) -> None:
        kind = f.get("type")
        if kind == "ack":
            with self.lock:
                self.acks.setdefault(f["id"], []).append((f["message_id"], f["conversation"], f["seq"]))
                self.acked_at.setdefault(f["id"], time.monotonic())
                self.unacked.pop(f["id"], None)
                self.known.setdefault(f["conversation"], set()).add(f["seq"])
            self._receipt(f["conversation"])  # its own message may close a gap
        elif kind == "message":
            conv, seq = f["conversation"], f["seq"]
            with self.lock:
                copies = self.received.setdefault(f["message_id"], [])
                if not copies:
                    self.order.setdefault(conv, []).append(seq)
                copies.append((conv, seq))
                self.known.setdefault(conv, set()).add(seq)
            self._receipt(conv)
        elif kind == "error":
            self.errors.append(f)

    def _receipt(self, conv: str) -> None:
        """Confirm delivery up to the last seq below which this device knows every seq.

        A gap (a message not received yet) holds the receipt back, so a reconnect
        replays it; a gap that lasts GAP_WAIT_S is given up on (the checker counts
        the message as lost) so the receipts of the rest are not held for ever.
        """
        with self.lock:
            known = self.known.get(conv, set())
            done, gap_since = self.receipted.get(conv, (0, 0.0))
            upto = done
            while upto + 1 in known:
                upto += 1
            top = max(known, default=0)
            now = time.monotonic()
            if upto < top:
                gap_since = gap_since or now
                if now - gap_since >= GAP_WAIT_S:
                    upto, gap_since = top, 0.0
            else:
                gap_since = 0.0
            self.receipted[conv] = (max(done, upto), gap_since)
        if upto > done:
            try:
                assert self.ws is not None
                self.ws.send({"type": "receipt", "conversation": conv, "status": "delivered", "up_to_seq": upto})
            except Exception:  # unconfirmed: replayed after a reconnect
                pass


# ---------------------------------------------------------------------------
# Traffic
# ---------------------------------------------------------------------------


class Traffic:
    """Open-loop 1-to-1 and group messages among ``clients`` at ``rate`` msgs/s."""

    def __init__(self, clients: list[CarefulClient], group_id: str, rate: float, group_share: float = 0.25):
        self.clients = clients
        self.group_id = group_id
        self.rate = rate
        self.group_share = group_share
        self.rng = random.Random(13)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        members = [c.user_id for c in self.clients]
        interval = 1.0 / self.rate
        due = time.monotonic()
        while not self._stop.is_set():
            # Open loop: the schedule does not wait for acks or for a slow system.
            due += interval
            sender = self.rng.choice(self.clients)
            if self.rng.random() < self.group_share:
                sender.send([m for m in members if m != sender.user_id], group=self.group_id)
            else:
                other = self.rng.choice([c for c in self.clients if c is not sender])
                sender.send([other.user_id], to=other.user_id)
            self._stop.wait(max(0.0, due - time.monotonic()))


# ---------------------------------------------------------------------------
# The checker
# ---------------------------------------------------------------------------


@dataclass
class Summary:
    faults: int = 0
    sent: int = 0
    acked: int = 0
    delivered: int = 0
    lost: int = 0
    conflicts: int = 0
    out_of_order: int = 0
    mismatches: int = 0
    unacked: int = 0
    redelivered: int = 0
    not_back: list[str] = field(default_factory=list)
    longest_recovery_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"faults {self.faults}, sent {self.sent}, acked {self.acked}, delivered {self.delivered},"
            f" lost {self.lost}, conflicts {self.conflicts}, out of order {self.out_of_order},"
            f" mismatches {self.mismatches}, unacked {self.unacked}, redelivered {self.redelivered},"
            f" not back {len(self.not_back)}, longest recovery {self.longest_recovery_s:.1f} s"
        )

    @property
    def clean(self) -> bool:
        return not (
            self.lost or self.conflicts or self.out_of_order or self.mismatches or self.unacked or self.not_back
        )


def history_of(user: User, conversation: str) -> dict[str, int]:
    """message_id -> seq of every stored message of a conversation (paged by before_seq)."""
    out: dict[str, int] = {}
    before: int | None = None
    while True:
        query = "?limit=100" + (f"&before_seq={before}" if before is not None else "")
        r = Api(user.base_url, user.access_token).get(f"/v1/conversations/{conversation}/messages{query}")
        if r.status_code == 401:
            r = requests.post(
                f"{user.base_url}/v1/auth/refresh", json={"refresh_token": user.refresh_token}, timeout=10
            )
            user.access_token, user.refresh_token = r.json()["access_token"], r.json()["refresh_token"]
            continue
        assert r.status_code == 200, r.text
        body = r.json()
        for m in body["messages"]:
            out[m["message_id"]] = m["seq"]
        before = body.get("next_before_seq")
        if not before:
            return out


def check(clients: list[CarefulClient]) -> Summary:
    """Everything the records and the stored histories say; ``faults``, ``not_back`` and recovery are the caller's."""
    s = Summary()
    by_user = {c.user_id: c for c in clients}
    acked: dict[str, tuple[str, int]] = {}  # message_id -> (conversation, seq) as acknowledged
    seqs: dict[str, set[tuple[str, int]]] = {}
    for c in clients:
        s.sent += len(c.sent)
        s.unacked += len(c.unacked)
        for cid, acks in c.acks.items():
            s.acked += 1
            if len({a for a in acks}) > 1:
                s.conflicts += 1
                s.problems.append(f"{cid} acked as {sorted(set(acks))}")
            mid, conv, seq = acks[0]
            acked[mid] = (conv, seq)
            seqs.setdefault(mid, set()).update((a[1], a[2]) for a in acks)
            sent = c.sent[cid]
            missing = [u for u in sent.recipients if mid not in by_user[u].received]
            if missing:
                s.lost += 1
                s.problems.append(f"{mid} ({conv} seq {seq}) acked but never delivered to {len(missing)} recipient(s)")
            else:
                s.delivered += 1
        for mid, copies in c.received.items():
            seqs.setdefault(mid, set()).update(copies)
            s.redelivered += len(copies) - 1
        for conv, order in c.order.items():
            bad = sum(1 for a, b in itertools.pairwise(order) if b <= a)
            if bad:
                s.out_of_order += bad
                s.problems.append(f"{c.user.username} got {conv} out of order: {order}")
    for mid, found in seqs.items():
        if len(found) > 1:
            s.conflicts += 1
            s.problems.append(f"{mid} seen with seqs {sorted(found)}")
    # Every conversation's stored history against what was acknowledged in it.
    convs: dict[str, User] = {}
    for c in clients:
        for acks in c.acks.values():
            convs.setdefault(acks[0][1], c.user)
    for conv, reader in convs.items():
        stored = history_of(reader, conv)
        expected = {mid: seq for mid, (cv, seq) in acked.items() if cv == conv}
        for mid, seq in expected.items():
            if stored.get(mid) != seq:
                s.mismatches += 1
                s.problems.append(f"{mid} acked as {conv} seq {seq}, stored as {stored.get(mid)}")
        unknown = set(stored) - set(expected)
        # Stored but never acknowledged is counted as unacked while a client still waits for an ack;
        # once every message is acknowledged, every stored one must be one of them.
        if unknown and not s.unacked:
            s.mismatches += len(unknown)
            s.problems.append(f"{conv}: {len(unknown)} stored messages nobody was told about")
    return s


# ---------------------------------------------------------------------------
# The campaign
# ---------------------------------------------------------------------------


@dataclass
class Fault:
    """One fault: ``kill`` (kill -9, the supervisor starts it again), ``stall`` (SIGSTOP, then SIGCONT)."""

    kind: str
    key: str
    stall_s: float = 5.0

    def __str__(self) -> str:
        return f"{self.kind} {self.key}"


def short_faults(stack: Stack) -> list[Fault]:
    gateways = [f"gateway-{i}" for i in range(1, stack.gateways + 1)]
    kills = [Fault("kill", k) for k in gateways + SERVICE_KEYS]
    stalls = [Fault("stall", k, 3.0) for k in ("persistence", "gateway-1", "kafka")]
    # Last: the embedded broker lost (kill -9; it comes back empty) while every service runs.
    return kills + stalls + [Fault("kill", "kafka")]


def long_faults(stack: Stack) -> list[Fault]:
    keys = [f"gateway-{i}" for i in range(1, stack.gateways + 1)] + SERVICE_KEYS
    return (
        [Fault("kill", k) for k in keys]
        + [Fault("stall", k, 5.0) for k in [*keys, "kafka", "mongo"]]
        + [Fault("kill", "mongo"), Fault("kill", "kafka")]
    )


class Campaign:
    """Clients, traffic, faults one after another, a drain, and the checker's verdict."""

    def __init__(self, stack: Stack, users: int = 6, rate: float = 20.0, say: Callable[[str], None] = print):
        self.stack = stack
        self.say = say
        self.rate = rate
        base, ws_url = stack.base_url, stack.ws_url
        self.users = [new_user(base) for _ in range(users)]
        r = self.users[0].api.post(
            "/v1/groups", json={"name": "faults", "members": [u.user_id for u in self.users[1:]]}
        )
        assert r.status_code == 201, r.text
        self.group_id = r.json()["group_id"]
        self.clients = [CarefulClient(u, ws_url).start() for u in self.users]
        self.recoveries: dict[str, float] = {}
        self.not_back: list[str] = []
        self.faults = 0

    def probe(self, timeout: float) -> float | None:
        """Seconds until a fresh 1-to-1 and a fresh group message both reach their recipients, else None."""
        a, b = self.clients[0], self.clients[1]
        start = time.monotonic()
        dm = a.send([b.user_id], to=b.user_id)
        gm = a.send([c.user_id for c in self.clients[1:]], group=self.group_id)
        deadline = start + timeout
        while time.monotonic() < deadline:
            with a.lock:
                mids = [a.acks[c][0][0] for c in (dm, gm) if c in a.acks]
            if len(mids) == 2 and all(m in b.received for m in mids):
                return time.monotonic() - start
            time.sleep(0.05)
        return None

    def inject(self, fault: Fault, settle_s: float = 2.0) -> None:
        proc = self.stack.procs[fault.key]
        self.faults += 1
        started = time.monotonic()
        if fault.kind == "kill":
            before = restarts(self.stack, fault.key)
            proc.kill()
            if not wait_back(self.stack, fault.key, before, timeout=90):
                self.not_back.append(fault.key)
                self.say(f"{fault}: did not come back")
                return
            healed = time.monotonic()
        else:
            proc.signal(signal.SIGSTOP)
            time.sleep(fault.stall_s)
            proc.signal(signal.SIGCONT)
            healed = time.monotonic()
        took = self.probe(timeout=120)
        if took is None:
            self.not_back.append(f"{fault} (no delivery after it)")
            self.say(f"{fault}: nothing delivered within 120 s")
            return
        # A kill counts from the kill (backoff and start included), a stall from SIGCONT.
        recovery = (healed - started if fault.kind == "kill" else 0.0) + took
        self.recoveries[str(fault)] = recovery
        self.say(f"{fault}: serving again {recovery:.1f} s after it")
        time.sleep(settle_s)

    def run(self, faults: list[Fault], warmup_s: float = 3.0, drain_s: float = 120.0) -> Summary:
        traffic = Traffic(self.clients, self.group_id, self.rate).start()
        try:
            time.sleep(warmup_s)
            for fault in faults:
                self.inject(fault)
        finally:
            traffic.stop()
        self.drain(drain_s)
        for c in self.clients:
            c.stop()
        summary = check(self.clients)
        summary.faults = self.faults
        summary.not_back = self.not_back
        summary.longest_recovery_s = max(self.recoveries.values(), default=0.0)
        return summary

    def drain(self, timeout: float) -> None:
        """Until every message is acknowledged and every acknowledged one delivered (or time is up)."""
        by_user = {c.user_id: c for c in self.clients}

        def settled() -> bool:
            for c in self.clients:
                with c.lock:
                    if c.unacked:
                        return False
                    done = [(c.acks[cid][0][0], s.recipients) for cid, s in c.sent.items()]
                if any(mid not in by_user[u].received for mid, rcpts in done for u in rcpts):
                    return False
            return True

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not settled():
            time.sleep(0.25)
        time.sleep(1.0)  # late duplicates land in the record too


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description="the long fault campaign")
    parser.add_argument("--rate", type=float, default=100.0, help="messages per second, open loop")
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--out", default="docs/faults.md", help="where the summary line goes ('' for nowhere)")
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with supervised_stack(say=lambda line: print(f"  supervisor: {line}", flush=True)) as stack:
        campaign = Campaign(stack, users=args.users, rate=args.rate, say=lambda m: print(m, flush=True))
        summary = campaign.run(long_faults(stack))
        ready = ready_times(stack)
    print(summary.line(), flush=True)
    for p in summary.problems[:50]:
        print("  " + p)
    if args.out:
        Path(args.out).write_text(
            "# Fault campaign (`make faults`)\n\n"
            f"Run {started}: {args.users} careful clients, {args.rate:g} msgs/s open loop (1-to-1 and group),\n"
            "every fault of issue 13 once (kill -9 and a 5 s SIGSTOP of every process, the broker and the\n"
            "database included, a restart of MongoDB, the loss of the embedded broker), under supervision.\n\n"
            f"    {summary.line()}\n\n"
            "Recovery after each fault: until a new 1-to-1 and a new group message are both delivered\n"
            "(a kill counts from the kill, the supervisor's backoff included; a stall from SIGCONT):\n\n"
            + "".join(f"- {k}: {v:.1f} s\n" for k, v in campaign.recoveries.items())
            + "\nA restarted process serving again (its /healthz), seconds after its start:\n\n"
            + "".join(f"- {k}: {v:.1f} s\n" for k, v in sorted(ready.items()))
        )
    return 0 if summary.clean else 1


if __name__ == "__main__":
    sys.exit(main())

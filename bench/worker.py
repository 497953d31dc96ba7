"""One load-generator process: an asyncio loop that owns a share of the sockets.

The controller (bench.pool) starts several of these and sends them commands
over a pipe: open sockets, send a planned schedule, run a one-at-a-time or
echo loop, report progress and figures. Every socket behaves as a real client:
it answers each ``message`` frame with a ``delivered`` receipt (or, for a
catch-up, one receipt per conversation every 100 ms) and drops duplicates
by (conversation, seq), as the contract asks.

Latency is measured where the frame arrives: each message body starts with
its planned send time (``CLOCK_MONOTONIC`` ns, system-wide), so the recipient's
process subtracts it from its own arrival stamp; acks are timed by the
sender against the same planned time. Arrivals are stamped before parsing.
Figures are kept per *tag* (the part of the client id before the last ':',
one per phase), so a message that arrives after its phase ended still counts
for its own phase and never for the next.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

#: Message bodies: planned time, a space, then padding to this many characters.
BODY_CHARS = 100


@dataclass
class TagStats:
    """What one worker saw of one phase (tag)."""

    #: every arrival's latency (ms from the planned send time), duplicates excluded
    lat_ms: list[float] = field(default_factory=list)
    #: client id -> [arrivals, first ms, last ms] (group messages arrive many times)
    per_id: dict[str, list[float]] = field(default_factory=dict)
    #: client id -> ack latency (ms from the planned send time), sender side
    acks_ms: dict[str, float] = field(default_factory=dict)
    sent: int = 0
    send_failed: int = 0
    #: actual minus planned send time (ms): how far the generator itself fell behind
    lag_ms: list[float] = field(default_factory=list)
    duplicates: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def arrive(self, cid: str, ms: float) -> None:
        self.lat_ms.append(ms)
        row = self.per_id.get(cid)
        if row is None:
            self.per_id[cid] = [1, ms, ms]
        else:
            row[0] += 1
            row[1] = min(row[1], ms)
            row[2] = max(row[2], ms)

    def progress(self) -> dict[str, int]:
        return {
            "ids": len(self.per_id),
            "arrivals": len(self.lat_ms),
            "acks": len(self.acks_ms),
            "sent": self.sent,
            "send_failed": self.send_failed,
        }

    def export(self, per_id: bool) -> dict[str, Any]:
        return {
            "lat_ms": self.lat_ms,
            "per_id": self.per_id if per_id else {},
            "acks_ms": list(self.acks_ms.values()),
            "ids": len(self.per_id),
            "sent": self.sent,
            "send_failed": self.send_failed,
            "lag_ms": self.lag_ms,
            "duplicates": self.duplicates,
            "errors": dict(self.errors),
        }


@dataclass
class Sock:
    """One client socket (a device) and what it must answer."""

    sid: int
    user_id: str
    ws: ClientConnection
    receipts: str = "each"  # "each" | "coalesce" | "off"
    seen: set[tuple[str, int]] = field(default_factory=set)
    pending: dict[str, int] = field(default_factory=dict)  # coalesced receipts: conversation -> seq
    pong: asyncio.Future[int] | None = None
    #: extra observer of message frames (the catch-up check): (frame, arrival ns)
    watch: Callable[[dict[str, Any], int], None] | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: frames to write, in order: (text, client id of a message or "", its planned ns)
    outbox: asyncio.Queue[tuple[str, str, int]] = field(default_factory=asyncio.Queue)


def body_for(planned_ns: int) -> str:
    head = f"{planned_ns} "
    return head + "x" * max(0, BODY_CHARS - len(head))


def tag_of(cid: str) -> str:
    return cid.rpartition(":")[0]


class Worker:
    """The command loop and the sockets of one process."""

    def __init__(self, index: int, ws_url: str, nonce: str):
        self.index = index
        self.ws_url = ws_url
        self.nonce = nonce
        self.socks: dict[int, Sock] = {}
        self.tags: dict[str, TagStats] = {}
        #: client id -> planned ns, until its ack arrives
        self.planned: dict[str, int] = {}
        #: client id -> future resolved at the first arrival (one-at-a-time)
        self.waiters: dict[str, asyncio.Future[int]] = {}
        #: client id -> callback on its ack (catch-up fill window)
        self.on_ack: dict[str, Callable[[], None]] = {}
        #: errors and closes not tied to a message id go to the current phase
        self.current = "setup"
        self.closed_by_server = 0
        #: sockets the server closed, until the controller opens them again (as a client would)
        self.lost: list[int] = []
        self.rep: Connection | None = None

    def stats(self, tag: str) -> TagStats:
        st = self.tags.get(tag)
        if st is None:
            st = self.tags[tag] = TagStats()
        return st

    # -- the command loop ---------------------------------------------------

    async def serve(self, cmd: Connection, rep: Connection) -> None:
        self.rep = rep
        loop = asyncio.get_running_loop()
        running: set[asyncio.Task[None]] = set()
        while True:
            try:
                msg = await loop.run_in_executor(None, cmd.recv)
            except (EOFError, OSError):
                break
            if msg.get("op") == "exit":
                self.reply(msg["rid"], True, None)
                break
            task = asyncio.create_task(self.run_command(msg))
            running.add(task)
            task.add_done_callback(running.discard)
        for s in list(self.socks.values()):
            await self.close_sock(s)

    async def run_command(self, msg: dict[str, Any]) -> None:
        try:
            result = await getattr(self, "op_" + msg["op"])(**msg.get("args", {}))
        except Exception:
            self.reply(msg["rid"], False, traceback.format_exc())
        else:
            self.reply(msg["rid"], True, result)

    def reply(self, rid: int, ok: bool, result: Any) -> None:
        assert self.rep is not None
        self.rep.send({"rid": rid, "ok": ok, "result": result})

    # -- sockets --------------------------------------------------------------

    async def open_sock(self, sid: int, user_id: str, token: str, receipts: str) -> Sock:
        ws = await connect(
            self.ws_url,
            additional_headers={"Authorization": f"Bearer {token}"},
            compression=None,  # the gateway does not negotiate permessage-deflate anyway
            proxy=None,
            open_timeout=60,
            ping_interval=None,  # the gateway pings (GATEWAY_PING_INTERVAL_S); the client answers
            max_queue=4096,
            max_size=2**20,
        )
        s = Sock(sid, user_id, ws, receipts)
        s.tasks.append(asyncio.create_task(self.read(s)))
        s.tasks.append(asyncio.create_task(self.write(s)))
        if receipts == "coalesce":
            s.tasks.append(asyncio.create_task(self.flush_receipts(s)))
        return s

    async def close_sock(self, s: Sock) -> None:
        self.socks.pop(s.sid, None)
        for t in s.tasks:
            t.cancel()
        try:
            await asyncio.wait_for(s.ws.close(), 10)
        except (TimeoutError, WebSocketException, OSError):
            pass
        # Let the cancelled tasks finish, or a worker that exits next leaves them pending.
        await asyncio.gather(*s.tasks, return_exceptions=True)

    async def op_connect(
        self, sockets: list[tuple[int, str, str]], receipts: str = "each", parallel: int = 50
    ) -> dict[str, Any]:
        """Open a socket per (sid, user_id, token), ``parallel`` handshakes at a time."""
        started = time.monotonic()
        gate = asyncio.Semaphore(parallel)
        failed: Counter[str] = Counter()
        handshakes: list[float] = []

        async def one(sid: int, user_id: str, token: str) -> None:
            async with gate:
                t = time.monotonic()
                try:
                    self.socks[sid] = await self.open_sock(sid, user_id, token, receipts)
                except Exception as exc:
                    failed[type(exc).__name__ + ": " + str(exc)[:80]] += 1
                    return
                handshakes.append((time.monotonic() - t) * 1000)

        await asyncio.gather(*(one(*s) for s in sockets))
        return {
            "opened": len(handshakes),
            "failed": dict(failed),
            "seconds": time.monotonic() - started,
            "handshake_ms": handshakes,
        }

    async def op_receipts(self, mode: str, sids: list[int] | None = None) -> int:
        """Switch how sockets answer messages ("each", "coalesce", "off")."""
        targets = [self.socks[s] for s in (sids if sids is not None else list(self.socks)) if s in self.socks]
        for s in targets:
            if mode == "coalesce" and s.receipts != "coalesce":
                s.tasks.append(asyncio.create_task(self.flush_receipts(s)))
            s.receipts = mode
        return len(targets)

    async def op_disconnect(self, sids: list[int] | None = None) -> int:
        targets = [self.socks[s] for s in (sids if sids is not None else list(self.socks)) if s in self.socks]
        await asyncio.gather(*(self.close_sock(s) for s in targets))
        return len(targets)

    async def read(self, s: Sock) -> None:
        try:
            async for raw in s.ws:
                now = time.monotonic_ns()  # stamped before any parsing
                try:
                    await self.on_frame(s, raw, now)
                except (ValueError, KeyError, TypeError):
                    # A frame this client cannot read is a finding, not a reason to stop reading.
                    self.stats(self.current).errors["unreadable_frame"] += 1
        except ConnectionClosed:
            pass
        except asyncio.CancelledError:
            raise
        if self.socks.get(s.sid) is s:  # closed by the server, not by us
            self.closed_by_server += 1
            why = f"{s.ws.close_code or ''} {s.ws.close_reason or ''}".strip() or "no close frame"
            self.stats(self.current).errors[f"socket closed by the server ({why})"] += 1
            self.socks.pop(s.sid, None)
            self.lost.append(s.sid)
            for t in s.tasks:  # its writer and receipt flusher end with it
                if t is not asyncio.current_task():
                    t.cancel()

    async def on_frame(self, s: Sock, raw: str | bytes, now: int) -> None:
        f = json.loads(raw)
        kind = f.get("type")
        if kind == "message":
            key = (f["conversation"], f["seq"])
            cid = str(f.get("id") or "")
            ours = cid.startswith(self.nonce)
            if key in s.seen:
                if ours:
                    self.stats(tag_of(cid)).duplicates += 1
                return
            s.seen.add(key)
            if ours:
                try:
                    planned = int(str(f.get("body", "")).split(" ", 1)[0])
                except ValueError:
                    planned = now
                self.stats(tag_of(cid)).arrive(cid, (now - planned) / 1e6)
                waiter = self.waiters.pop(cid, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(now)
            if s.watch is not None:
                s.watch(f, now)
            if s.receipts == "each":
                self.send_receipt(s, f["conversation"], f["seq"])
            elif s.receipts == "coalesce":
                s.pending[f["conversation"]] = max(f["seq"], s.pending.get(f["conversation"], 0))
        elif kind == "ack":
            cid = str(f.get("id") or "")
            due = self.planned.pop(cid, None)
            if due is not None:
                self.stats(tag_of(cid)).acks_ms[cid] = (now - due) / 1e6
            hook = self.on_ack.pop(cid, None)
            if hook is not None:
                hook()
        elif kind == "pong":
            if s.pong is not None and not s.pong.done():
                s.pong.set_result(now)
        elif kind == "error":
            ref = str(f.get("ref") or "")
            tag = tag_of(ref) if ref.startswith(self.nonce) else self.current
            self.stats(tag).errors[str(f.get("code"))] += 1
            hook = self.on_ack.pop(ref, None)
            if hook is not None:
                hook()

    def send_receipt(self, s: Sock, conversation: str, seq: int) -> None:
        frame = {"type": "receipt", "conversation": conversation, "status": "delivered", "up_to_seq": seq}
        s.outbox.put_nowait((json.dumps(frame), "", 0))

    async def write(self, s: Sock) -> None:
        """The socket's writer: frames leave in order, and a socket the server reads slowly
        (a full TCP buffer) holds up only itself, never the plan of the other sockets."""
        while True:
            text, cid, planned = await s.outbox.get()
            if cid:
                self.stats(tag_of(cid)).lag_ms.append((time.monotonic_ns() - planned) / 1e6)
            try:
                await s.ws.send(text)
            except ConnectionClosed:
                if cid:
                    self.stats(tag_of(cid)).send_failed += 1
                    self.planned.pop(cid, None)
                    hook = self.on_ack.pop(cid, None)
                    if hook is not None:
                        hook()

    async def flush_receipts(self, s: Sock) -> None:
        """Coalesced receipts: the highest seq per conversation, every 100 ms (a catching-up client)."""
        while True:
            await asyncio.sleep(0.1)
            pending, s.pending = s.pending, {}
            for conversation, seq in pending.items():
                self.send_receipt(s, conversation, seq)

    # -- sending --------------------------------------------------------------

    async def send_message(self, s: Sock, cid: str, planned_ns: int, to: str | None, group: str | None) -> bool:
        """Hand a message to the socket's writer (False if the socket is gone)."""
        frame: dict[str, Any] = {"type": "message", "id": cid, "body": body_for(planned_ns)}
        if group is not None:
            frame["group"] = group
        else:
            frame["to"] = to
        st = self.stats(tag_of(cid))
        st.sent += 1
        if self.socks.get(s.sid) is not s:
            st.send_failed += 1
            return False
        self.planned[cid] = planned_ns
        s.outbox.put_nowait((json.dumps(frame), cid, planned_ns))
        return True

    async def op_send(self, items: list[tuple[int, int, str, str | None, str | None]]) -> dict[str, Any]:
        """Send (planned ns, sid, client id, to, group) items, each at its planned time, in order.

        Open loop: a send that is late (the loop was busy) goes out at once
        and keeps its planned time, so the lateness is charged to latency.
        """
        for planned, sid, cid, to, group in items:
            delay = (planned - time.monotonic_ns()) / 1e9
            if delay > 0:
                await asyncio.sleep(delay)
            s = self.socks.get(sid)
            if s is None:
                st = self.stats(tag_of(cid))
                st.sent += 1
                st.send_failed += 1
                continue
            await self.send_message(s, cid, planned, to, group)
        return {"sent": len(items)}

    async def op_one_at_a_time(
        self, tag: str, pairs: list[tuple[int, int, str, str]], count: int, timeout_s: float, budget_s: float
    ) -> dict[str, Any]:
        """Send, wait for the recipient's frame, send the next; pairs take turns, directions alternate.

        ``pairs`` are (sid a, sid b, user a, user b), both sockets in this process.
        """
        self.current = tag
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        done = timeouts = 0
        for k in range(count):
            if time.monotonic() - started > budget_s:
                break
            a, b, user_a, user_b = pairs[k % len(pairs)]
            if (k // len(pairs)) % 2:
                a, b, user_b = b, a, user_a
            s = self.socks.get(a)
            if s is None or b not in self.socks:
                continue
            cid = f"{tag}:{k}"
            fut: asyncio.Future[int] = loop.create_future()
            self.waiters[cid] = fut
            if not await self.send_message(s, cid, time.monotonic_ns(), user_b, None):
                self.waiters.pop(cid, None)
                continue
            try:
                await asyncio.wait_for(fut, timeout_s)
                done += 1
            except TimeoutError:
                timeouts += 1
                self.waiters.pop(cid, None)
        return {"done": done, "timeouts": timeouts, "seconds": time.monotonic() - started}

    async def op_echo(self, sid: int, count: int, per_s: float, timeout_s: float = 10) -> dict[str, Any]:
        """``ping`` -> ``pong`` round trips on one socket, ``per_s`` a second (below the frame limit)."""
        s = self.socks[sid]
        loop = asyncio.get_running_loop()
        rtts: list[float] = []
        lost = 0
        for _ in range(count):
            t0 = time.monotonic_ns()
            s.pong = loop.create_future()
            await s.ws.send('{"type":"ping"}')
            try:
                rtts.append((await asyncio.wait_for(s.pong, timeout_s) - t0) / 1e6)
            except TimeoutError:
                lost += 1
            await asyncio.sleep(max(0.0, 1 / per_s - (time.monotonic_ns() - t0) / 1e9))
        s.pong = None
        return {"rtt_ms": rtts, "lost": lost}

    # -- catch-up -----------------------------------------------------------------

    async def op_fill(
        self, tag: str, sids: list[int], to: str, count: int, per_socket_rate: float, window: int, budget_s: float
    ) -> dict[str, Any]:
        """Send ``count`` messages to ``to`` from the sockets ``sids`` (one device), and wait for every ack.

        Each socket stays under ``per_socket_rate`` frames/s (the gateway's
        per-socket limit) and at most ``window`` messages wait for an ack in
        all, so a slow system is filled at its own pace.
        """
        self.current = tag
        started = time.monotonic()
        in_flight = asyncio.Semaphore(window)
        acked = 0
        next_i = 0
        all_acked = asyncio.Event()

        def on_ack() -> None:
            nonlocal acked
            acked += 1
            in_flight.release()
            if acked >= count:
                all_acked.set()

        async def sender(sid: int) -> None:
            nonlocal next_i
            s = self.socks[sid]
            while next_i < count:
                t = time.monotonic()
                left = budget_s - (t - started)
                try:
                    await asyncio.wait_for(in_flight.acquire(), max(0.0, left))
                except TimeoutError:
                    break  # acks stopped coming: the budget is spent
                i, next_i = next_i, next_i + 1
                if i >= count:
                    in_flight.release()
                    break
                cid = f"{tag}:{i}"
                self.on_ack[cid] = on_ack
                if not await self.send_message(s, cid, time.monotonic_ns(), to, None):
                    self.on_ack.pop(cid, None)
                    in_flight.release()
                await asyncio.sleep(max(0.0, 1 / per_socket_rate - (time.monotonic() - t)))

        await asyncio.gather(*(sender(sid) for sid in sids))
        sent_s = time.monotonic() - started
        left = budget_s - (time.monotonic() - started)
        if acked < count and left > 0:
            try:
                await asyncio.wait_for(all_acked.wait(), left)
            except TimeoutError:
                pass
        return {"sent": next_i, "acked": acked, "send_seconds": sent_s, "seconds": time.monotonic() - started}

    async def op_catch_up(
        self, tag: str, sid: int, user_id: str, token: str, conversation: str, count: int, budget_s: float
    ) -> dict[str, Any]:
        """Connect a device that has ``count`` messages pending and time it until it has them all.

        Checks what a client would: every message once, in ``seq`` order
        within the conversation (duplicates are counted and dropped).
        """
        self.current = tag
        seqs: list[int] = []
        ids: set[str] = set()
        stamps: list[int] = []
        got_all = asyncio.Event()
        prefix = tag + ":"

        def watch(f: dict[str, Any], now: int) -> None:
            if f["conversation"] != conversation:
                return
            seqs.append(int(f["seq"]))
            if str(f.get("id") or "").startswith(prefix):
                ids.add(str(f["id"]))
                stamps.append(now)
                if len(ids) >= count:
                    got_all.set()

        t0 = time.monotonic_ns()
        s = await self.open_sock(sid, user_id, token, "coalesce")
        s.watch = watch
        self.socks[sid] = s
        handshake_ns = time.monotonic_ns() - t0
        try:
            await asyncio.wait_for(got_all.wait(), budget_s)
        except TimeoutError:
            pass
        in_order = all(a < b for a, b in itertools.pairwise(seqs))
        return {
            "received": len(ids),
            "frames": len(seqs),
            "duplicates": self.stats(tag).duplicates,
            "in_order": in_order,
            "seq_first": seqs[0] if seqs else None,
            "seq_last": seqs[-1] if seqs else None,
            "handshake_ms": handshake_ns / 1e6,
            "first_ms": (stamps[0] - t0) / 1e6 if stamps else None,
            "all_ms": (stamps[-1] - t0) / 1e6 if len(ids) >= count and stamps else None,
            "last_ms": (stamps[-1] - t0) / 1e6 if stamps else None,
        }

    # -- figures --------------------------------------------------------------------

    async def op_phase(self, tag: str) -> None:
        """Errors and closes without a message id from now on belong to ``tag``."""
        self.current = tag

    async def op_progress(self, tag: str) -> dict[str, int]:
        return self.stats(tag).progress()

    async def op_collect(self, tag: str, per_id: bool = False) -> dict[str, Any]:
        return self.stats(tag).export(per_id)

    async def op_status(self) -> dict[str, Any]:
        return {"sockets": len(self.socks), "closed_by_server": self.closed_by_server}

    async def op_take_lost(self) -> list[int]:
        """The sockets the server closed since the last call (the controller reconnects them)."""
        lost, self.lost = self.lost, []
        return lost


def main(index: int, ws_url: str, nonce: str, cmd: Connection, rep: Connection) -> None:
    """Entry point of a worker process (multiprocessing target; spawn hands over sys.path)."""
    from chatlib.oslimits import raise_open_file_limit

    raise_open_file_limit(65536)  # a few thousand sockets, past a shell's 1024
    asyncio.run(Worker(index, ws_url, nonce).serve(cmd, rep))

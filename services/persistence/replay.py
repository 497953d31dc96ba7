"""Replays: what a connecting device missed, what a gateway asks for, and the connect catch-up.

A device's pending messages are everything above its delivered offset, per
conversation; a DeviceConnected makes this part send them (protocol 5) with
the initial sync, a ReplayRequest gets the missing range of one conversation
(protocol 6), and a moment after each connect what was stored since its
snapshot is sent once more (the router may have routed it before its session
view listed the new device).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from chatlib.schemas import DeviceConnected, DeviceRef, ReplayRequest, parse_conversation

from . import logic
from .inbound import Outbox, Part
from .logic import INFINITY, ConnectReplay, Interval, Offsets
from .reads import ConvInfo

if TYPE_CHECKING:
    from .service import Persistence

logger = logging.getLogger(__name__)


class Replay(Part):
    """Connect replays, replay requests and connect catch-ups."""

    def __init__(self, svc: Persistence):
        super().__init__(svc)
        #: (due time, the connect, its sync snapshot) of the pending connect catch-ups
        self._due: list[tuple[float, DeviceConnected, dict[str, int]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> None:
        """Run the connect catch-ups in the background."""
        self._stop.clear()
        threading.Thread(target=self._catchup_loop, name="connect-catchup", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def answer(self, req: ReplayRequest, out: Outbox) -> None:
        """Protocol 6: the visible messages ``after_seq < seq <= up_to_seq``, then a sync to ``up_to_seq``."""
        device = DeviceRef(user_id=req.user_id, device_id=req.device_id)
        intervals = self._readable_intervals(req.user_id, req.conversation)
        want = logic.clip(intervals, req.after_seq, req.up_to_seq)
        messages = self.store.get_messages(req.conversation, want) if want else []
        for d in logic.replay_delivers(
            req.conversation, messages, device, req.conn_id, req.up_to_seq, self.config.deliver_max_bytes
        ):
            out.deliver(req.gateway, d)

    def _readable_intervals(self, user_id: str, conversation: str) -> list[Interval]:
        """Every seq of the conversation the user may read (unbounded above); [] for a stranger."""
        try:
            kind, ids = parse_conversation(conversation)
        except ValueError:
            return []
        if kind == "dm":
            return [(1, INFINITY)] if user_id in ids else []
        return logic.visible_intervals(self.store.get_ranges_of_user(user_id, conversation), INFINITY)

    def connect(self, events: list[DeviceConnected], out: Outbox) -> None:
        """Everything above each connecting device's delivered offsets, then the initial sync;
        a catch-up is scheduled for each.

        A poll's connects are read together (a reconnect storm brings thousands): the
        conversations and offsets of all their users in a few ``$in`` queries, and the
        pending messages of a device once however many of its sockets connected.
        """
        if not events:
            return
        convs = self.svc.reads.conversations_of_users(ev.user_id for ev in events)
        offsets = self.store.get_offsets_of_devices((ev.user_id, ev.device_id) for ev in events)
        replays: dict[tuple[str, str], ConnectReplay] = {}
        records = messages = 0
        for ev in events:
            key = (ev.user_id, ev.device_id)
            replay = replays.get(key)
            if replay is None:
                replay = replays[key] = self._pending(convs[ev.user_id], offsets[key])
                messages += sum(len(v) for v in replay.messages.values())
            device = DeviceRef(user_id=ev.user_id, device_id=ev.device_id)
            delivers = logic.connect_delivers(replay, device, ev.conn_id, self.config.deliver_max_bytes)
            for d in delivers:
                out.deliver(ev.gateway, d)
            records += len(delivers)
            if self.config.connect_catchup_ms > 0:
                due = time.monotonic() + self.config.connect_catchup_ms / 1000
                with self._lock:
                    self._due.append((due, ev, dict(replay.last)))
        logger.info(
            "replay for %d connecting sockets of %d devices: %d messages, %d records",
            len(events),
            len(replays),
            messages,
            records,
        )

    def _pending(self, infos: list[ConvInfo], offsets: dict[str, Offsets]) -> ConnectReplay:
        """A device's conversations: their newest seq, its delivered offset and what lies between."""
        replay = ConnectReplay()
        for info in infos:
            conv = info.conversation
            delivered = offsets.get(conv, Offsets()).delivered
            replay.last[conv] = info.last
            replay.delivered[conv] = delivered
            want = logic.clip(info.intervals, delivered, info.last)
            if want:
                pending = self.store.get_messages(conv, want)
                if pending:
                    replay.messages[conv] = pending
        return replay

    def run_due(self, now: float) -> int:
        """Send the catch-up syncs that are due; returns how many ran.

        A message stored after a connect's snapshot is normally routed live,
        but the router may route it before its session view lists the new
        device. A second look a moment later sends what was stored since the
        snapshot (the gateway drops what the socket already has).
        """
        with self._lock:
            due = [c for c in self._due if c[0] <= now]
            self._due = [c for c in self._due if c[0] > now]
        if not due:
            return 0
        out = Outbox(self.config.deliver_max_bytes)
        convs = self.svc.reads.conversations_of_users(ev.user_id for _, ev, _ in due)
        for _, ev, snapshot in due:
            self.catch_up(ev, snapshot, convs[ev.user_id], out)
        out.send(self.publisher)
        self.publisher.flush()
        return len(due)

    def catch_up(self, ev: DeviceConnected, snapshot: dict[str, int], infos: list[ConvInfo], out: Outbox) -> None:
        """What was stored since the connect snapshot, as sync Delivers for that socket."""
        device = DeviceRef(user_id=ev.user_id, device_id=ev.device_id)
        for info in infos:
            before = snapshot.get(info.conversation, 0)
            if info.last <= before:
                continue
            want = logic.clip(info.intervals, before, info.last)
            messages = self.store.get_messages(info.conversation, want) if want else []
            for d in logic.replay_delivers(
                info.conversation, messages, device, ev.conn_id, info.last, self.config.deliver_max_bytes
            ):
                out.deliver(ev.gateway, d)

    def _catchup_loop(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.run_due(time.monotonic())
            except Exception:
                logger.warning("connect catch-up failed", exc_info=True)

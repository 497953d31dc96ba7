"""The persistence service: store first, then route.

Kafka entry points (each a thin adapter: read, ask logic.py, write through
storage.py, produce):

- :meth:`Persistence.on_inbound` (``chat.messages.in.v1``, group
  ``persistence``): messages are authorised, deduplicated, numbered, stored
  with one ``insert_many``, announced as MessageStored and only then acked;
  receipts raise offsets; replay requests are answered (protocol 5-7, 9).
- :meth:`Persistence.on_session_events`: a DeviceConnected gets its replay.
- :meth:`Persistence.on_user_events`: the users projection; removed devices
  and unregistered users lose their queues (device offsets).
- :meth:`Persistence.on_group_changes`: the readable seq range of every
  (group, member) from the GroupChanged stream.
- :meth:`Persistence.on_presence`: presence to everyone sharing a
  conversation, as PresenceRoute for the message-router (protocol 11).

A live view of ``group.changes.v1`` answers "is the sender a member" and "my
groups" without a database call. The read side (conversation list, history,
sync, mutes) is served by the methods at the end, called from http.py.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from chatlib import topics
from chatlib.errors import forbidden, not_found
from chatlib.kafka import Publisher
from chatlib.schemas import (
    Deliver,
    DeviceConnected,
    DeviceRef,
    DeviceRemoved,
    Event,
    GroupChanged,
    GroupSnapshot,
    InboundMessage,
    InboundReceipt,
    MessageStored,
    PresenceChanged,
    PresenceRoute,
    ReplayRequest,
    UserRegistered,
    UserUnregistered,
    UserUpdated,
    error_frame,
    group_conversation,
    now_ms,
    parse_conversation,
)
from chatlib.service import Producer, Service, ServiceConfig, Storage, View, consume
from flask import Flask
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from . import logic
from .logic import INFINITY, ConnectReplay, Interval, KnownUser, Offsets, ReceiptState, Refusal
from .storage import PersistenceStore

logger = logging.getLogger(__name__)

#: Entries of the users cache before it starts over, and how long an entry is trusted.
USER_CACHE_MAX = 200_000
USER_CACHE_TTL_S = 10.0
#: Conversations remembered as checked (see store_messages) before the set starts over.
VERIFIED_MAX = 500_000


class PersistenceConfig(ServiceConfig):
    """PERSISTENCE_* settings."""

    model_config = SettingsConfigDict(env_prefix="PERSISTENCE_", extra="ignore")

    port: int = 8103
    # Largest frames payload of one Deliver record (bytes); a bigger replay is split.
    deliver_max_bytes: int = Field(512 * 1024, ge=16 * 1024, le=900 * 1024)
    # Co-members of groups up to this size get a user's presence.
    presence_max_group: int = Field(100, ge=0)
    # How long a message to an unknown recipient or from a non-member waits for the
    # user/group projections to catch up before it is refused (ms).
    catchup_wait_ms: int = Field(500, ge=0, le=10000)
    # Unread counts up to this many seqs exclude the user's own messages (one count query);
    # above it the count is the plain seq difference.
    unread_exact_max: int = Field(1000, ge=0)
    # A connected socket gets what was stored since its replay once more after this long (ms;
    # 0 = off), in case the router routed it before its session view listed the device.
    connect_catchup_ms: int = Field(1000, ge=0, le=60000)


def group_of(ev: Event | None) -> GroupSnapshot | None:
    return ev.group if isinstance(ev, GroupChanged) else None


class _Catchup:
    """A change counter a handler waits on until a live projection has moved on."""

    def __init__(self) -> None:
        self.version = 0
        self.cv = threading.Condition()

    def bump(self) -> None:
        with self.cv:
            self.version += 1
            self.cv.notify_all()

    def wait_change(self, seen: int, deadline: float) -> int:
        """Block until the version differs from ``seen`` or the deadline passes; the version now."""
        with self.cv:
            left = deadline - time.monotonic()
            if self.version == seen and left > 0:
                self.cv.wait(left)
            return self.version


@dataclass
class ConvInfo:
    """One conversation as a user sees it."""

    conversation: str
    #: the seqs the user may read, up to ``last``
    intervals: list[Interval]
    #: the newest stored seq of the conversation
    last: int
    #: the newest message the user may read (a message frame), if any
    last_message: dict[str, Any] | None
    #: ordering key: newest activity first
    activity: int


class _Outbox:
    """Deliver records of one batch: device frames grouped per device, then whole Delivers."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._device_frames: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        self._delivers: list[tuple[str, Deliver]] = []

    def to_device(self, gateway: str, user_id: str, device_id: str, frame: dict[str, Any]) -> None:
        self._device_frames.setdefault((gateway, user_id, device_id), []).append(frame)

    def deliver(self, gateway: str, d: Deliver) -> None:
        self._delivers.append((gateway, d))

    def send(self, publisher: Publisher) -> None:
        for (gateway, user_id, device_id), frames in self._device_frames.items():
            # Acks carry seqs: in seq order per conversation for the gateway's sequencer.
            frames.sort(key=lambda f: (f.get("seq") is None, f.get("conversation", ""), f.get("seq", 0)))
            for chunk in logic.chunk_frames(frames, self.max_bytes):
                target = DeviceRef(user_id=user_id, device_id=device_id)
                publisher.send(topics.gateway_topic(gateway), Deliver(targets=[target], frames=chunk), key=user_id)
        for gateway, d in self._delivers:
            publisher.send(topics.gateway_topic(gateway), d, key=d.targets[0].user_id if d.targets else None)


class Persistence(Service):
    """Stores messages and offsets, replays to connecting devices, serves history."""

    name = "persistence"
    config_class = PersistenceConfig
    config: PersistenceConfig

    store = Storage(PersistenceStore)
    publisher = Producer()
    groups = View(topics.GROUP_CHANGES, key=lambda e: e.group.group_id if isinstance(e, GroupChanged) else "")

    def __init__(self, config: ServiceConfig, **overrides: Any):
        super().__init__(config, **overrides)
        #: Conversations whose counter this process has checked against the stored messages.
        self._verified: set[str] = set()
        self._users_catchup = _Catchup()
        self._groups_catchup = _Catchup()
        #: user -> current groups, and group -> current members (from the groups view)
        self._groups_of: dict[str, set[str]] = {}
        self._members_of: dict[str, set[str]] = {}
        #: (due time, the connect, its sync snapshot) of the pending connect catch-ups
        self._catchups: list[tuple[float, DeviceConnected, dict[str, int]]] = []
        self._catchup_lock = threading.Lock()
        self._catchup_stop = threading.Event()
        #: user_id -> (KnownUser, expiry), a cache of the users projection (see _lookup_users)
        self._user_cache: dict[str, tuple[KnownUser, float]] = {}

    def routes(self, app: Flask) -> None:
        from .http import blueprint

        app.register_blueprint(blueprint(self))

    # -- live view hook ---------------------------------------------------------

    def on_groups_update(self, ev: Event) -> None:
        """Keep the user -> groups index of the groups view (called in the view's reader)."""
        snap = group_of(ev)
        if snap is None:
            return
        new = set() if snap.deleted else snap.member_ids()
        old = self._members_of.get(snap.group_id, set())
        for user in old - new:
            self._groups_of.get(user, set()).discard(snap.group_id)
        for user in new - old:
            self._groups_of.setdefault(user, set()).add(snap.group_id)
        self._members_of[snap.group_id] = new
        self._groups_catchup.bump()

    def _snapshot(self, group_id: str) -> GroupSnapshot | None:
        return group_of(self.groups.get(group_id))

    # -- chat.messages.in.v1 -------------------------------------------------------

    @consume(topics.MESSAGES_IN, group="persistence", batch=True)
    def on_inbound(self, events: list[Event]) -> None:
        """One poll: store its messages, apply its receipts, answer its replay requests.

        An ack is produced only after its message is in MongoDB and after its
        MessageStored (same producer, so the broker gets them in that order),
        and everything is flushed before the handler returns (the offset
        commit). If this process dies before that flush, the offsets are not
        committed: the successor re-reads the poll, finds the messages stored
        and announces them again (see ``store_messages``), so nothing acked is
        left unrouted.
        """
        out = _Outbox(self.config.deliver_max_bytes)
        messages = [e for e in events if isinstance(e, InboundMessage)]
        receipts = [e for e in events if isinstance(e, InboundReceipt)]
        replays = [e for e in events if isinstance(e, ReplayRequest)]
        touched: set[str] = set()
        if messages:
            touched = self.store_messages(messages, out)
        try:
            if receipts:
                self.apply_receipts(receipts, out)
            for req in replays:
                self.answer_replay(req, out)
            out.send(self.publisher)
            self.publisher.flush()
        except BaseException:
            # Announce these conversations' messages again when the poll is retried.
            self._verified -= touched
            raise

    def store_messages(self, events: list[InboundMessage], out: _Outbox) -> set[str]:
        """Authorise, deduplicate, number and store a batch of messages; produce MessageStored; queue acks.

        Returns the conversations touched."""
        existing = self.store.get_messages_by_keys((e.sender, e.id) for e in events)
        fresh = [e for e in events if (e.sender, e.id) not in existing]
        deadline = time.monotonic() + self.config.catchup_wait_ms / 1000
        users = self._known_users({e.to for e in fresh if e.group is None and e.to}, deadline)

        accepted: list[tuple[InboundMessage, str]] = []
        seen: set[tuple[str, str]] = set()
        for ev in fresh:
            key = (ev.sender, ev.id)
            if key in seen:
                continue  # a retry inside the same poll: acked below with the first copy
            refusal, conv = self._authorise(ev, users, deadline)
            if refusal is not None:
                logger.info("message refused: %s", refusal.code.value)
                out.to_device(ev.gateway, ev.sender, ev.sender_device, refusal.frame(ev.id))
                continue
            seen.add(key)
            accepted.append((ev, conv))

        counts: dict[str, int] = {}
        for _, conv in accepted:
            counts[conv] = counts.get(conv, 0) + 1
        touched = set(counts) | {m.conversation for m in existing.values()}
        unverified = touched - self._verified
        try:
            for conv in counts:
                if conv in unverified:
                    self.store.repair_counter(conv)
            lasts = {conv: self.store.reserve_seqs(conv, n) for conv, n in counts.items()}
            stored = [m for _, m in logic.number_batch(accepted, lasts, now_ms())]
            self.store.insert_messages(stored)
            # A duplicate in a conversation this process has not handled yet may come
            # from a predecessor that died between storing and announcing: announce it again.
            again = [m for m in existing.values() if m.conversation in unverified]
            self.store.set_last_messages(stored + again)
            for m in sorted(stored + again, key=lambda m: (m.conversation, m.seq)):
                self.publisher.send(topics.MESSAGES_STORED, MessageStored(message=m), key=m.conversation)
        except BaseException:
            self._verified -= touched
            raise
        if len(self._verified) > VERIFIED_MAX:
            self._verified.clear()  # forgetting only costs a re-check of each counter
        self._verified |= touched

        by_key = dict(existing)
        by_key.update({(m.sender, m.id): m for m in stored})
        acked: set[tuple[str, str, str]] = set()
        for ev in events:
            m = by_key.get((ev.sender, ev.id))
            if m is None or (ev.sender_device, ev.gateway, m.message_id) in acked:
                continue
            acked.add((ev.sender_device, ev.gateway, m.message_id))
            out.to_device(ev.gateway, ev.sender, ev.sender_device, logic.ack_for(m))
        if stored:
            logger.debug("stored %d messages in %d conversations", len(stored), len(counts))
        return touched

    def _authorise(
        self, ev: InboundMessage, users: dict[str, KnownUser], deadline: float
    ) -> tuple[Refusal | None, str]:
        conv = logic.target_conversation(ev)
        if ev.group is not None:
            return self._authorise_group(ev.sender, ev.group, deadline), conv or ""
        refusal = logic.authorise_dm(ev.sender, ev.to, users.get(ev.to or ""))
        return refusal, conv or ""

    def _authorise_group(self, sender: str, group_id: str, deadline: float) -> Refusal | None:
        # A group created or joined a moment ago may not be in the view yet: wait briefly for it.
        seen = self._groups_catchup.version
        refusal = logic.authorise_group(sender, self._snapshot(group_id))
        while refusal is not None and time.monotonic() < deadline:
            seen = self._groups_catchup.wait_change(seen, deadline)
            refusal = logic.authorise_group(sender, self._snapshot(group_id))
        return refusal

    def _member_snapshot(self, group_id: str, user_id: str) -> GroupSnapshot | None:
        """The group as the view has it, after waiting briefly for a group or membership that
        the group service recorded a moment ago (read-your-writes for the REST side)."""
        deadline = time.monotonic() + self.config.catchup_wait_ms / 1000
        seen = self._groups_catchup.version
        snap = self._snapshot(group_id)
        while (snap is None or snap.deleted or user_id not in snap.member_ids()) and time.monotonic() < deadline:
            seen = self._groups_catchup.wait_change(seen, deadline)
            snap = self._snapshot(group_id)
        return snap

    def _known_users(self, user_ids: set[str], deadline: float) -> dict[str, KnownUser]:
        # A user who signed up a moment ago may not be in the projection yet: wait briefly for it.
        seen = self._users_catchup.version
        found = self._lookup_users(user_ids)
        missing = user_ids - set(found)
        while missing and time.monotonic() < deadline:
            seen = self._users_catchup.wait_change(seen, deadline)
            found.update(self._lookup_users(missing))
            missing -= set(found)
        return found

    def _lookup_users(self, user_ids: set[str]) -> dict[str, KnownUser]:
        """Users from the in-process cache, the misses from the projection (then cached).

        This process's user-events consumer updates the cache as it writes the
        projection; entries also expire after :data:`USER_CACHE_TTL_S`, because
        with several persistence instances another one may handle the event.
        """
        now = time.monotonic()
        found: dict[str, KnownUser] = {}
        for u in user_ids:
            hit = self._user_cache.get(u)
            if hit is not None and hit[1] > now:
                found[u] = hit[0]
        misses = user_ids - set(found)
        if misses:
            fetched = self.store.get_users(misses)
            if len(self._user_cache) + len(fetched) > USER_CACHE_MAX:
                self._user_cache.clear()
            self._user_cache.update({u: (known, now + USER_CACHE_TTL_S) for u, known in fetched.items()})
            found.update(fetched)
        return found

    def apply_receipts(self, receipts: list[InboundReceipt], out: _Outbox) -> None:
        """Raise device and user offsets (one bulk write each); ReceiptStored per user-level advance."""
        valid: list[InboundReceipt] = []
        group_receipts: list[InboundReceipt] = []
        for r in receipts:
            try:
                kind, ids = parse_conversation(r.conversation)
            except ValueError:
                kind, ids = "", []
            if kind == "dm" and r.user_id in ids:
                valid.append(r)
            elif kind == "group":
                group_receipts.append(r)
            else:
                out.to_device(r.gateway, r.user_id, r.device_id, self._not_participant())
        if group_receipts:
            ranges = self.store.get_ranges_of_users(
                {r.user_id for r in group_receipts}, {r.conversation for r in group_receipts}
            )
            members = {(x.user_id, x.conversation) for x in ranges}
            for r in group_receipts:
                if (r.user_id, r.conversation) in members:
                    valid.append(r)
                else:
                    out.to_device(r.gateway, r.user_id, r.device_id, self._not_participant())
        if not valid:
            return
        dm_lasts = self.store.get_dm_lasts((r.user_id, r.conversation) for r in valid if r.conversation[:3] == "dm:")
        group_lasts = self.store.get_group_lasts(r.conversation for r in valid if r.conversation[:6] == "group:")
        dev_before = self.store.get_device_offsets_many((r.user_id, r.device_id, r.conversation) for r in valid)
        user_before = self.store.get_user_offsets_many((r.user_id, r.conversation) for r in valid)

        dev_now: dict[tuple[str, str, str], Offsets] = {}
        states: dict[tuple[str, str], ReceiptState] = {}
        for r in valid:
            if r.conversation.startswith("dm:"):
                last = dm_lasts.get((r.user_id, r.conversation), 0)
            else:
                last = int(group_lasts.get(r.conversation, {}).get("seq", 0))
            up_to = min(r.up_to_seq, last)  # nobody has read what does not exist yet
            if up_to <= 0:
                continue
            dk = (r.user_id, r.device_id, r.conversation)
            dev_now[dk] = logic.advance(dev_now.get(dk, dev_before.get(dk, Offsets())), r.status, up_to)
            uk = (r.user_id, r.conversation)
            st = states.get(uk)
            if st is None:
                before = user_before.get(uk, Offsets())
                st = states[uk] = ReceiptState(before=before, now=before)
            new = logic.advance(st.now, r.status, up_to)
            if new.read > st.now.read:
                st.read_device = r.device_id
            if new.delivered > st.now.delivered:
                st.delivered_device = r.device_id
            st.now = new
        self.store.set_offsets(
            {k: v for k, v in dev_now.items() if v != dev_before.get(k, Offsets())},
            {k: st.now for k, st in states.items() if st.now != st.before},
        )
        for ev in logic.receipt_events(states):
            self.publisher.send(topics.MESSAGES_STORED, ev, key=ev.conversation)

    @staticmethod
    def _not_participant() -> dict[str, Any]:
        return error_frame("forbidden", "you are not a participant of this conversation")

    def answer_replay(self, req: ReplayRequest, out: _Outbox) -> None:
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

    # -- session.events.v1 -----------------------------------------------------------

    # Each control topic keeps its own consumer: a slow account deletion or a big
    # membership change must not hold back the replay a connecting device waits for.
    @consume(topics.SESSION_EVENTS, group="persistence-sessions", batch=True)
    def on_session_events(self, events: list[Event]) -> None:
        """Replay to every socket that connected (protocol 5); other session events are not ours."""
        out = _Outbox(self.config.deliver_max_bytes)
        for ev in events:
            if isinstance(ev, DeviceConnected):
                self.replay_connect(ev, out)
        out.send(self.publisher)
        self.publisher.flush()

    def replay_connect(self, ev: DeviceConnected, out: _Outbox) -> None:
        """Everything above the device's delivered offsets, then the initial sync; a catch-up is scheduled."""
        device = DeviceRef(user_id=ev.user_id, device_id=ev.device_id)
        offsets = self.store.get_device_offsets(ev.user_id, ev.device_id)
        replay = ConnectReplay()
        for info in self.conversations_of(ev.user_id):
            conv = info.conversation
            delivered = offsets.get(conv, Offsets()).delivered
            replay.last[conv] = info.last
            replay.delivered[conv] = delivered
            want = logic.clip(info.intervals, delivered, info.last)
            if want:
                pending = self.store.get_messages(conv, want)
                if pending:
                    replay.messages[conv] = pending
        delivers = logic.connect_delivers(replay, device, ev.conn_id, self.config.deliver_max_bytes)
        for d in delivers:
            out.deliver(ev.gateway, d)
        if self.config.connect_catchup_ms > 0:
            due = time.monotonic() + self.config.connect_catchup_ms / 1000
            with self._catchup_lock:
                self._catchups.append((due, ev, dict(replay.last)))
        logger.info(
            "replay for a connecting device: %d conversations, %d messages, %d records",
            len(replay.last),
            sum(len(v) for v in replay.messages.values()),
            len(delivers),
        )

    def run_due_catchups(self, now: float) -> int:
        """Send the catch-up syncs that are due; returns how many ran.

        A message stored after a connect's snapshot is normally routed live,
        but the router may route it before its session view lists the new
        device. A second look a moment later sends what was stored since the
        snapshot (the gateway drops what the socket already has).
        """
        with self._catchup_lock:
            due = [c for c in self._catchups if c[0] <= now]
            self._catchups = [c for c in self._catchups if c[0] > now]
        if not due:
            return 0
        out = _Outbox(self.config.deliver_max_bytes)
        for _, ev, snapshot in due:
            self.catch_up(ev, snapshot, out)
        out.send(self.publisher)
        self.publisher.flush()
        return len(due)

    def catch_up(self, ev: DeviceConnected, snapshot: dict[str, int], out: _Outbox) -> None:
        """What was stored since the connect snapshot, as sync Delivers for that socket."""
        device = DeviceRef(user_id=ev.user_id, device_id=ev.device_id)
        for info in self.conversations_of(ev.user_id):
            before = snapshot.get(info.conversation, 0)
            if info.last <= before:
                continue
            want = logic.clip(info.intervals, before, info.last)
            messages = self.store.get_messages(info.conversation, want) if want else []
            for d in logic.replay_delivers(
                info.conversation, messages, device, ev.conn_id, info.last, self.config.deliver_max_bytes
            ):
                out.deliver(ev.gateway, d)

    def on_start(self) -> None:
        """Run the connect catch-ups in the background."""
        self._catchup_stop.clear()
        self._catchup_thread = threading.Thread(target=self._catchup_loop, name="connect-catchup", daemon=True)
        self._catchup_thread.start()

    def on_stop(self) -> None:
        self._catchup_stop.set()

    def _catchup_loop(self) -> None:
        while not self._catchup_stop.wait(0.1):
            try:
                self.run_due_catchups(time.monotonic())
            except Exception:
                logger.warning("connect catch-up failed", exc_info=True)

    # -- user.events.v1 ----------------------------------------------------------------

    @consume(topics.USER_EVENTS, group="persistence-users", batch=True)
    def on_user_events(self, events: list[Event]) -> None:
        """Keep the users projection; a removed device or an unregistered user loses its queue."""
        for ev in events:
            if isinstance(ev, UserRegistered | UserUpdated):
                self.store.set_user(ev.user_id, ev.username, ev.name)
                self._user_cache.pop(ev.user_id, None)
            elif isinstance(ev, UserUnregistered):
                # Their messages stay (others keep history); history marks them from_deleted.
                self.store.set_user_deleted(ev.user_id, now_ms())
                gone = KnownUser(ev.user_id, deleted=True)
                self._user_cache[ev.user_id] = (gone, time.monotonic() + USER_CACHE_TTL_S)
                self.store.delete_device_offsets(ev.user_id)
            elif isinstance(ev, DeviceRemoved):
                self.store.delete_device_offsets(ev.user_id, ev.device_id)
        self._users_catchup.bump()

    # -- group.changes.v1 ------------------------------------------------------------------

    @consume(topics.GROUP_CHANGES, group="persistence-groups", batch=True)
    def on_group_changes(self, events: list[Event]) -> None:
        """Open a member's readable range at joining, close it at removal (or group deletion)."""
        changes = [e for e in events if isinstance(e, GroupChanged)]
        if not changes:
            return
        convs = {group_conversation(c.group.group_id) for c in changes}
        current: dict[str, list[logic.MemberRange]] = {c: [] for c in convs}
        for r in self.store.get_ranges_of_conversations(convs):
            current[r.conversation].append(r)
        lasts = self.store.get_group_lasts(convs)
        opened_all: list[logic.MemberRange] = []
        closed_all: list[logic.MemberRange] = []
        for change in changes:
            conv = group_conversation(change.group.group_id)
            last = int(lasts.get(conv, {}).get("seq", 0))
            opened, closed = logic.apply_group_change(current[conv], change, last)
            if not opened and not closed:
                continue
            by_id = {r.range_id: r for r in closed}
            current[conv] = [by_id.get(r.range_id, r) for r in current[conv]] + opened
            opened_all += opened
            closed_all += closed
        self.store.save_ranges(opened_all, closed_all)

    # -- presence.v1 --------------------------------------------------------------------------

    @consume(topics.PRESENCE, group="persistence-presence", batch=True)
    def on_presence(self, events: list[Event]) -> None:
        """Protocol 11: who shares a dm (or a small group) with the user hears of their presence."""
        changes = [e for e in events if isinstance(e, PresenceChanged)]
        if not changes:
            return
        peers = self.store.get_dm_peers(e.user_id for e in changes)
        for ev in changes:
            to = peers.get(ev.user_id, set()) | self._group_peers(ev.user_id)
            to.discard(ev.user_id)
            if to:
                route = PresenceRoute(user_id=ev.user_id, online=ev.online, last_seen=ev.last_seen, to_users=sorted(to))
                self.publisher.send(topics.ROUTE, route, key=ev.user_id)
        self.publisher.flush()

    def _group_peers(self, user_id: str) -> set[str]:
        out: set[str] = set()
        for gid in self._groups_of.get(user_id, set()):
            members = self._members_of.get(gid, set())
            if len(members) <= self.config.presence_max_group:
                out |= members
        return out

    # -- read side (http.py) ---------------------------------------------------------------------

    def conversations_of(self, user_id: str) -> list[ConvInfo]:
        """Every conversation the user can read: dms from user_conversations, groups from member ranges."""
        out = [
            ConvInfo(
                conversation=d["conversation"],
                intervals=logic.dm_intervals(int(d.get("last", {}).get("seq", 0))),
                last=int(d.get("last", {}).get("seq", 0)),
                last_message=d.get("last", {}).get("message"),
                activity=int(d.get("last", {}).get("ts", 0)),
            )
            for d in self.store.get_dm_conversations(user_id)
        ]
        ranges: dict[str, list[logic.MemberRange]] = {}
        for r in self.store.get_ranges_of_user(user_id):
            ranges.setdefault(r.conversation, []).append(r)
        lasts = self.store.get_group_lasts(ranges)
        for conv, rs in ranges.items():
            out.append(self._group_info(conv, rs, lasts.get(conv)))
        return out

    def _group_info(self, conv: str, ranges: list[logic.MemberRange], last: dict[str, Any] | None) -> ConvInfo:
        last_seq = int(last["seq"]) if last else 0
        intervals = logic.visible_intervals(ranges, last_seq)
        top = intervals[-1][1] if intervals else 0
        message: dict[str, Any] | None = None
        activity = max(r.opened_ts for r in ranges)
        if last and top == last_seq and top > 0:
            message, activity = last.get("message"), int(last.get("ts", activity))
        elif top > 0:
            # A removed member: the newest message they may still read.
            m = self.store.get_message_at(conv, top)
            if m is not None:
                message, activity = m.frame(), m.ts
        return ConvInfo(conv, intervals, last_seq, message, activity)

    def conversation_of(self, user_id: str, conversation: str) -> ConvInfo:
        """One conversation for the REST side: 403 for a stranger or a malformed id, 404 for an unknown group."""
        try:
            kind, ids = parse_conversation(conversation)
        except ValueError:
            raise forbidden("you are not a participant of this conversation") from None
        if kind == "dm":
            if user_id not in ids:
                raise forbidden("you are not a participant of this conversation")
            last = self.store.get_dm_lasts([(user_id, conversation)]).get((user_id, conversation), 0)
            return ConvInfo(conversation, logic.dm_intervals(last), last, None, 0)
        ranges = self.store.get_ranges_of_user(user_id, conversation)
        if not ranges:
            snap = self._member_snapshot(ids[0], user_id)
            if snap is None or snap.deleted:
                raise not_found("unknown group")
            if user_id not in snap.member_ids():
                raise forbidden("you are not a member of this group")
            # Joined a moment ago: the readable range is being recorded; nothing to read yet.
            return ConvInfo(conversation, [], 0, None, 0)
        return self._group_info(conversation, ranges, self.store.get_group_lasts([conversation]).get(conversation))

    def unread(self, user_id: str, info: ConvInfo, read_seq: int) -> int:
        """Messages from others above the user's read offset (plain seq difference when very many)."""
        span = logic.unread_span(info.intervals, read_seq)
        n = logic.size(span)
        if n == 0 or n > self.config.unread_exact_max:
            return n
        return self.store.count_from_others(info.conversation, span, user_id)

    def list_conversations(self, user_id: str) -> list[dict[str, Any]]:
        """GET /v1/conversations: newest activity first."""
        infos = sorted(self.conversations_of(user_id), key=lambda i: (-i.activity, i.conversation))
        offsets = self.store.get_user_offsets(user_id)
        muted = set(self.store.get_mutes(user_id))
        deleted = self._deleted_senders([i.last_message for i in infos if i.last_message])
        out = []
        for info in infos:
            read = offsets.get(info.conversation, Offsets()).read
            out.append(
                {
                    "conversation": info.conversation,
                    "last_message": _mark(info.last_message, deleted) if info.last_message else None,
                    "unread": self.unread(user_id, info, read),
                    "read_seq": read,
                    "muted": info.conversation in muted,
                }
            )
        return out

    def history(self, user_id: str, conversation: str, before_seq: int | None, limit: int) -> dict[str, Any]:
        """GET /v1/conversations/{c}/messages: newest first, within what the user may read."""
        info = self.conversation_of(user_id, conversation)
        page, next_before = logic.history_page(info.intervals, before_seq, limit)
        messages = self.store.get_messages(conversation, page) if page else []
        frames = [m.frame() for m in reversed(messages)]
        deleted = self._deleted_senders(frames)
        return {"messages": [_mark(f, deleted) for f in frames], "next_before_seq": next_before}

    def sync(self, user_id: str, device_id: str, per_conversation: int) -> dict[str, Any]:
        """GET /v1/sync: every conversation with this device's offsets and its latest messages; my groups."""
        infos = sorted(self.conversations_of(user_id), key=lambda i: (-i.activity, i.conversation))
        device = self.store.get_device_offsets(user_id, device_id)
        user = self.store.get_user_offsets(user_id)
        muted = set(self.store.get_mutes(user_id))
        conversations = []
        for info in infos:
            page, _ = logic.history_page(info.intervals, None, per_conversation)
            messages = self.store.get_messages(info.conversation, page) if page else []
            mine = device.get(info.conversation, Offsets())
            conversations.append(
                {
                    "conversation": info.conversation,
                    "read_seq": mine.read,
                    "delivered_seq": mine.delivered,
                    "unread": self.unread(user_id, info, user.get(info.conversation, Offsets()).read),
                    "muted": info.conversation in muted,
                    "messages": [m.frame() for m in reversed(messages)],
                }
            )
        deleted = self._deleted_senders([f for c in conversations for f in c["messages"]])
        for c in conversations:
            c["messages"] = [_mark(f, deleted) for f in c["messages"]]
        groups = []
        for gid in sorted(self._groups_of.get(user_id, set())):
            snap = self._snapshot(gid)
            if snap is not None and not snap.deleted and user_id in snap.member_ids():
                groups.append(snap.public_dict())
        return {"conversations": conversations, "groups": groups}

    def _deleted_senders(self, frames: list[dict[str, Any]]) -> set[str]:
        """Senders of these messages whose account was deleted (one lookup for them all)."""
        users = self.store.get_users({f["from"] for f in frames})
        return {u for u, known in users.items() if known.deleted}

    def set_mute(self, user_id: str, conversation: str, muted: bool) -> None:
        """PUT /v1/conversations/{c}/mute: only a participant may mute a conversation."""
        self.conversation_of(user_id, conversation)
        self.store.set_mute(user_id, conversation, muted)

    def mutes(self, user_id: str) -> list[str]:
        """The conversations a user muted (for the push service)."""
        return self.store.get_mutes(user_id)


def _mark(frame: dict[str, Any], deleted: set[str]) -> dict[str, Any]:
    """A message for the REST side: ``from`` is kept, ``from_deleted`` says the account is gone."""
    return {**frame, "from_deleted": frame["from"] in deleted}

"""The persistence service: store first, then route.

Kafka entry points, each a thin adapter over one part of the service:

- :meth:`Persistence.on_inbound` (``chat.messages.in.v1``, group
  ``persistence``): messages are authorised, deduplicated, numbered, stored
  and journaled, announced as MessageStored and only then acked; receipts
  raise offsets; replay requests are answered (protocol 5-7, 9) —
  :mod:`.inbound`.
- :meth:`Persistence.on_session_events`: a DeviceConnected gets its replay
  (:mod:`.replay`).
- :meth:`Persistence.on_user_events`: the users projection; removed devices
  and unregistered users lose their queues (device offsets).
- :meth:`Persistence.on_group_changes`: the readable seq range of every
  (group, member) from the GroupChanged stream.
- :meth:`Persistence.on_presence`: presence to everyone sharing a
  conversation, as PresenceRoute for the message-router (protocol 11).

A live view of ``group.changes.v1`` answers "is the sender a member" and "my
groups" without a database call. The read side (conversation list, history,
sync, mutes) is :mod:`.reads`, called from http.py.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from chatlib import topics
from chatlib.schemas import (
    DeviceConnected,
    DeviceRemoved,
    Event,
    GroupChanged,
    GroupSnapshot,
    PresenceChanged,
    PresenceRoute,
    UserRegistered,
    UserUnregistered,
    UserUpdated,
    group_conversation,
    now_ms,
)
from chatlib.service import Producer, Service, ServiceConfig, Storage, View, consume
from flask import Flask
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from . import logic
from .inbound import Catchup, Inbound, Outbox
from .reads import Reads
from .replay import Replay
from .storage import PersistenceStore

logger = logging.getLogger(__name__)


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
    # Past catchup_wait_ms, a message to a user the projection does not know yet keeps waiting
    # while the users consumer is not current (its group re-joining after a restart, say), up
    # to this long (ms; keep it well under KAFKA_MAX_POLL_INTERVAL_MS).
    catchup_rejoin_wait_ms: int = Field(5000, ge=0, le=10000)
    # Receipts are journaled at once (one insert per poll) and folded into the offsets
    # collection this often (ms; 0 = after every poll): one upsert per user and conversation
    # per interval, however many receipts raised it. Other persistence instances see an
    # offset up to this late (this one at once).
    offsets_fold_ms: int = Field(5000, ge=0, le=60000)
    # Unread counts up to this many seqs exclude the user's own messages (one count query);
    # above it the count is the plain seq difference.
    unread_exact_max: int = Field(1000, ge=0)
    # A connected socket gets what was stored since its replay once more after this long (ms;
    # 0 = off), in case the router routed it before its session view listed the device.
    connect_catchup_ms: int = Field(1000, ge=0, le=60000)


def group_of(ev: Event | None) -> GroupSnapshot | None:
    return ev.group if isinstance(ev, GroupChanged) else None


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
        #: user -> current groups, and group -> current members (from the groups view)
        self.groups_of: dict[str, set[str]] = {}
        self.members_of: dict[str, set[str]] = {}
        self.groups_catchup = Catchup()
        self._folding = threading.Event()
        self.inbound = Inbound(self)
        self.replay = Replay(self)
        self.reads = Reads(self)

    def on_setup(self) -> None:
        """Bring older stored data to the current collections (idempotent)."""
        self.store.migrate()

    def routes(self, app: Flask) -> None:
        from .http import blueprint

        app.register_blueprint(blueprint(self))

    def on_start(self) -> None:
        self.replay.start()
        self._folding.clear()
        if self.config.offsets_fold_ms > 0:
            threading.Thread(target=self._fold_loop, name="offsets-fold", daemon=True).start()

    def on_stop(self) -> None:
        self.replay.stop()
        self._folding.set()
        self.fold_offsets()  # best effort: what is left is in the journal, folded at the next start

    def _fold_loop(self) -> None:
        while not self._folding.wait(self.config.offsets_fold_ms / 1000):
            self.fold_offsets(pace=True)

    def fold_offsets(self, pace: bool = False) -> None:
        """Journaled receipts into the offsets collection (see PersistenceStore.fold_offsets)."""
        try:
            self.store.fold_offsets(pace=pace)
        except Exception as exc:  # noqa: BLE001 - kept for the next fold; the journal holds them
            logger.warning("folding offsets failed (%s); retrying at the next fold", exc.__class__.__name__)

    # -- live view hook ---------------------------------------------------------

    def on_groups_update(self, ev: Event, previous: Event | None = None) -> None:
        """Keep the user -> groups index of the groups view (called in the view's reader)."""
        snap = group_of(ev)
        if snap is None:
            return
        new = set() if snap.deleted else snap.member_ids()
        old = self.members_of.get(snap.group_id, set())
        for user in old - new:
            self.groups_of.get(user, set()).discard(snap.group_id)
        for user in new - old:
            self.groups_of.setdefault(user, set()).add(snap.group_id)
        self.members_of[snap.group_id] = new
        self.groups_catchup.bump()

    def snapshot(self, group_id: str) -> GroupSnapshot | None:
        return group_of(self.groups.get(group_id))

    # -- chat.messages.in.v1 -------------------------------------------------------

    @consume(topics.MESSAGES_IN, group="persistence", batch=True, on_assignment="forget_owned_state")
    def on_inbound(self, events: list[Event]) -> None:
        """One poll of messages, receipts and replay requests (see :class:`.inbound.Inbound`)."""
        self.inbound.handle(events)

    def forget_owned_state(self) -> None:
        """The inbound consumer's partitions changed: what this process knew of them may be stale."""
        self.inbound.forget_owned()

    # -- session.events.v1 -----------------------------------------------------------

    # Each control topic keeps its own consumer: a slow account deletion or a big
    # membership change must not hold back the replay a connecting device waits for.
    # A connect costs a few database reads (its conversations, offsets and pending messages):
    # polls of at most 500 keep a reconnect storm's batches well within the poll interval.
    @consume(topics.SESSION_EVENTS, group="persistence-sessions", batch=True, max_records=500)
    def on_session_events(self, events: list[Event]) -> None:
        """Replay to every socket that connected (protocol 5); other session events are not ours."""
        out = Outbox(self.config.deliver_max_bytes)
        self.replay.connect([ev for ev in events if isinstance(ev, DeviceConnected)], out)
        out.send(self.publisher)
        self.publisher.flush()

    def run_due_catchups(self, now: float) -> int:
        """Send the connect catch-ups that are due; returns how many ran."""
        return self.replay.run_due(now)

    # -- user.events.v1 ----------------------------------------------------------------

    @consume(topics.USER_EVENTS, group="persistence-users", batch=True)
    def on_user_events(self, events: list[Event]) -> None:
        """Keep the users projection; a removed device or an unregistered user loses its queue."""
        for ev in events:
            if isinstance(ev, UserRegistered | UserUpdated):
                self.store.set_user(ev.user_id, ev.username, ev.name)
                self.inbound.user_changed(ev.user_id)
            elif isinstance(ev, UserUnregistered):
                # Their messages stay (others keep history); history marks them from_deleted.
                self.store.set_user_deleted(ev.user_id, now_ms())
                self.store.delete_device_offsets(ev.user_id)
                self.inbound.user_deleted(ev.user_id)
            elif isinstance(ev, DeviceRemoved):
                self.store.delete_device_offsets(ev.user_id, ev.device_id)
                self.inbound.offsets.drop(ev.user_id, ev.device_id)
        self.inbound.users_catchup.bump()

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
        lasts = self.store.get_lasts(convs)
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
        for gid in self.groups_of.get(user_id, set()):
            members = self.members_of.get(gid, set())
            if len(members) <= self.config.presence_max_group:
                out |= members
        return out

    # -- read side (http.py) ---------------------------------------------------------------------

    def list_conversations(self, user_id: str) -> list[dict[str, Any]]:
        """GET /v1/conversations: newest activity first."""
        return self.reads.list_conversations(user_id)

    def history(self, user_id: str, conversation: str, before_seq: int | None, limit: int) -> dict[str, Any]:
        """GET /v1/conversations/{c}/messages: newest first, within what the user may read."""
        return self.reads.history(user_id, conversation, before_seq, limit)

    def sync(self, user_id: str, device_id: str, per_conversation: int) -> dict[str, Any]:
        """GET /v1/sync: every conversation with this device's offsets and its latest messages; my groups."""
        return self.reads.sync(user_id, device_id, per_conversation)

    def set_mute(self, user_id: str, conversation: str, muted: bool) -> None:
        """PUT /v1/conversations/{c}/mute: only a participant may mute a conversation."""
        self.reads.set_mute(user_id, conversation, muted)

    def mutes(self, user_id: str) -> list[str]:
        """The conversations a user muted (for the push service)."""
        return self.reads.mutes(user_id)

"""The write side of ``chat.messages.in.v1``: authorise, number, store, acknowledge; receipts.

One poll of the inbound consumer is one batch: its messages are deduplicated
with one lookup, numbered in memory from the last seqs this process owns,
written with one insert and one journaled conversations write (the write an
ack waits for), announced as MessageStored and acked; its receipts raise
device and user offsets (kept in memory for the owned conversations, so a
receipt costs writes only). Everything leaves in one producer flush before
the consumer commits.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from chatlib import topics
from chatlib.kafka import Publisher, RetryBatch
from chatlib.schemas import (
    Deliver,
    DeviceRef,
    Event,
    InboundMessage,
    InboundReceipt,
    MessageStored,
    ReplayRequest,
    StoredMessage,
    error_frame,
    now_ms,
    parse_conversation,
)

from . import logic
from .logic import KnownUser, OffsetCache, Offsets, ReceiptState, Refusal
from .storage import SeqTaken

if TYPE_CHECKING:
    from .service import Persistence, PersistenceConfig
    from .storage import PersistenceStore

logger = logging.getLogger(__name__)

#: Entries of the users cache before it starts over, and how long an entry is trusted.
USER_CACHE_MAX = 200_000
USER_CACHE_TTL_S = 10.0
#: Conversations whose last seq is kept in memory before the map starts over.
LASTS_MAX = 500_000


class Catchup:
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


class Outbox:
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


class Part:
    """A part of the persistence service: reaches the service's dependencies through it.

    Dependencies are set up after the service is built (or replaced by fakes
    in tests), so a part looks them up on each use rather than keeping them.
    """

    def __init__(self, svc: Persistence):
        self.svc = svc

    @property
    def store(self) -> PersistenceStore:
        return self.svc.store  # type: ignore[no-any-return]

    @property
    def publisher(self) -> Publisher:
        return self.svc.publisher  # type: ignore[no-any-return]

    @property
    def config(self) -> PersistenceConfig:
        return self.svc.config


class Inbound(Part):
    """Messages, receipts and replay requests of one inbound poll, and the state of the owned
    conversations (last seqs, offsets) that makes them cheap."""

    def __init__(self, svc: Persistence):
        super().__init__(svc)
        #: conversation -> its newest stored seq, for the conversations this process owns
        #: (loaded once with PersistenceStore.load_lasts, then advanced here): numbering
        #: a batch costs no database round trip. Forgotten when the partitions change.
        self._lasts: dict[str, int] = {}
        #: Conversations whose stored messages this process has announced (see store_messages).
        self._verified: set[str] = set()
        #: Delivered/read offsets of the owned conversations (see logic.OffsetCache).
        self.offsets = OffsetCache()
        #: user_id -> (KnownUser, expiry), a cache of the users projection (see _lookup_users)
        self.user_cache: dict[str, tuple[KnownUser, float]] = {}
        self.users_catchup = Catchup()

    def forget_owned(self) -> None:
        """The consumer's partitions changed: what this process knew of them may be stale.

        Offsets journaled here are folded, and those a dead process left in the
        journal too, so the new owners of the partitions read them.
        """
        self._lasts.clear()
        self._verified.clear()
        self.offsets.clear()
        try:
            self.store.fold_offsets()
            self.store.recover_offsets()
        except Exception as exc:  # noqa: BLE001 - a stale offset costs a redelivery, not a loss
            logger.warning("folding offsets at reassignment failed: %s", exc.__class__.__name__)

    def user_changed(self, user_id: str) -> None:
        """The users projection changed for this user: look it up again next time."""
        self.user_cache.pop(user_id, None)

    def user_deleted(self, user_id: str) -> None:
        """An unregistered user: known as deleted from now on, and without queues."""
        gone = KnownUser(user_id, deleted=True)
        self.user_cache[user_id] = (gone, time.monotonic() + USER_CACHE_TTL_S)
        self.offsets.drop(user_id)

    def handle(self, events: list[Event]) -> None:
        """One poll: store its messages, apply its receipts, answer its replay requests.

        An ack is produced only after its message is journaled in MongoDB and
        after its MessageStored (same producer, so the broker gets them in that
        order), and everything is flushed before the handler returns (the
        offset commit). If this process dies before that flush, the offsets are
        not committed: the successor re-reads the poll, finds the messages
        stored and announces them again (see ``store_messages``), so nothing
        acked is left unrouted.
        """
        out = Outbox(self.config.deliver_max_bytes)
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
                self.svc.replay.answer(req, out)
            out.send(self.publisher)
            self.publisher.flush()
        except BaseException:
            # Announce these conversations' messages again when the poll is retried.
            self._forget(touched)
            raise

    def _forget(self, conversations: set[str]) -> None:
        self._verified -= conversations
        for conv in conversations:
            self._lasts.pop(conv, None)

    def store_messages(self, events: list[InboundMessage], out: Outbox) -> set[str]:
        """Authorise, number and store a batch of messages; produce MessageStored; queue acks.

        A client that did not get its ack sends the same message again (same
        sender and client id): the unique index finds it when the batch is
        inserted, so a batch of new messages costs no lookup; the stored copy
        of a retry is read then and acked again. Returns the conversations
        touched.
        """
        deadline = time.monotonic() + self.config.catchup_wait_ms / 1000
        users = self._known_users({e.to for e in events if e.group is None and e.to}, deadline)
        accepted: list[tuple[InboundMessage, str]] = []
        refused: list[tuple[InboundMessage, Refusal]] = []
        seen: set[tuple[str, str]] = set()
        for ev in events:
            key = (ev.sender, ev.id)
            if key in seen:
                continue  # a retry inside the same poll: acked below with the first copy
            refusal, conv = self._authorise(ev, users, deadline)
            if refusal is not None:
                refused.append((ev, refusal))
                continue
            seen.add(key)
            accepted.append((ev, conv))
        # A refused retry of a message stored earlier (its sender left the group since,
        # say) is acked again, not refused: look those few up.
        existing = self.store.get_messages_by_keys((ev.sender, ev.id) for ev, _ in refused) if refused else {}
        for ev, refusal in refused:
            if (ev.sender, ev.id) not in existing:
                logger.info("message refused: %s", refusal.code.value)
                out.to_device(ev.gateway, ev.sender, ev.sender_device, refusal.frame(ev.id))

        stored: list[StoredMessage] = []
        touched = {conv for _, conv in accepted} | {m.conversation for m in existing.values()}
        try:
            unknown = [c for c in {conv for _, conv in accepted} if c not in self._lasts]
            if unknown:
                if len(self._lasts) > LASTS_MAX:
                    self._lasts.clear()  # forgetting only costs a reload
                self._lasts.update(self.store.load_lasts(unknown))
            lasts = {conv: self._lasts[conv] for _, conv in accepted}
            pending = accepted
            now = now_ms()
            while pending:
                numbered = [m for _, m in logic.number_batch(pending, logic.raised(lasts, pending), now)]
                inserted, at_retry = self.store.insert_new(numbered)
                stored += numbered[:inserted]
                for m in numbered[:inserted]:
                    lasts[m.conversation] = m.seq
                if not at_retry:
                    break
                # numbered[inserted] repeats a stored message: read the stored copies of the
                # rest (a retry or more) and number the others again, after what went in.
                rest = pending[inserted:]
                existing.update(self.store.get_messages_by_keys((ev.sender, ev.id) for ev, _ in rest))
                pending = [(ev, conv) for ev, conv in rest if (ev.sender, ev.id) not in existing]
            touched |= {m.conversation for m in existing.values()}
            # A duplicate in a conversation this process has not announced yet may come
            # from a predecessor that died between storing and announcing: announce it again.
            again = [m for m in existing.values() if m.conversation not in self._verified]
            # The batch's one journaled write: after it, every message above is durable.
            self.store.save_conversations(stored + again)
            self._lasts.update(lasts)
            for m in sorted(stored + again, key=lambda m: (m.conversation, m.seq)):
                self.publisher.send(topics.MESSAGES_STORED, MessageStored(message=m), key=m.conversation)
        except SeqTaken as exc:
            # Another process numbered in these conversations (its partitions came here):
            # forget what this one knew and take the batch again from the database.
            self._forget(touched)
            raise RetryBatch("conversation numbered elsewhere; reloading") from exc
        except BaseException:
            self._forget(touched)
            raise
        if len(self._verified) > LASTS_MAX:
            self._verified.clear()  # forgetting only costs announcing a retry again
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
            logger.debug("stored %d messages in %d conversations", len(stored), len(lasts))
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
        seen = self.svc.groups_catchup.version
        refusal = logic.authorise_group(sender, self.svc.snapshot(group_id))
        while refusal is not None and time.monotonic() < deadline:
            seen = self.svc.groups_catchup.wait_change(seen, deadline)
            refusal = logic.authorise_group(sender, self.svc.snapshot(group_id))
        return refusal

    def _known_users(self, user_ids: set[str], deadline: float) -> dict[str, KnownUser]:
        """The known users among ``user_ids``, waiting for the projection where it may be late.

        A user who signed up a moment ago may not be in the projection yet: wait
        until ``deadline`` for it. Past that, wait on (up to
        ``catchup_rejoin_wait_ms``) only while the users consumer is not current
        (its group re-joining after a restart, or reading its backlog): its
        profile event may be among what is not read yet. Once that consumer is
        current, an id still missing is unknown, and refused at once.
        """
        seen = self.users_catchup.version
        found = self._lookup_users(user_ids)
        missing = user_ids - set(found)
        while missing and time.monotonic() < deadline:
            seen = self.users_catchup.wait_change(seen, deadline)
            found.update(self._lookup_users(missing))
            missing -= set(found)
        if missing:
            users = self.svc.consumer_of(self.svc.on_user_events)
            late = time.monotonic() + self.config.catchup_rejoin_wait_ms / 1000
            while missing and users is not None and not users.current and time.monotonic() < late:
                seen = self.users_catchup.wait_change(seen, min(late, time.monotonic() + 0.05))
                found.update(self._lookup_users(missing))
                missing -= set(found)
            if missing and users is not None and users.current:
                found.update(self._lookup_users(missing))  # what its last poll wrote
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
            hit = self.user_cache.get(u)
            if hit is not None and hit[1] > now:
                found[u] = hit[0]
        misses = user_ids - set(found)
        if misses:
            fetched = self.store.get_users(misses)
            if len(self.user_cache) + len(fetched) > USER_CACHE_MAX:
                self.user_cache.clear()
            self.user_cache.update({u: (known, now + USER_CACHE_TTL_S) for u, known in fetched.items()})
            found.update(fetched)
        return found

    def apply_receipts(self, receipts: list[InboundReceipt], out: Outbox) -> None:
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
            elif kind == "group" and r.user_id in self.svc.members_of.get(ids[0], ()):
                valid.append(r)  # a current member (the live groups view): no database read
            elif kind == "group":
                group_receipts.append(r)  # a former member may still read (and receipt) their range
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
        lasts = self._known_lasts({r.conversation: r.up_to_seq for r in valid})
        dev_before, user_before = self._offsets_of(valid)

        dev_now: dict[tuple[str, str, str], Offsets] = {}
        states: dict[tuple[str, str], ReceiptState] = {}
        for r in valid:
            up_to = min(r.up_to_seq, lasts.get(r.conversation, 0))  # nobody reads what does not exist yet
            if up_to <= 0:
                continue
            dk = (r.user_id, r.device_id, r.conversation)
            dev_now[dk] = logic.advance(dev_now.get(dk, dev_before[dk]), r.status, up_to)
            uk = (r.user_id, r.conversation)
            st = states.get(uk)
            if st is None:
                before = user_before[uk]
                st = states[uk] = ReceiptState(before=before, now=before)
            new = logic.advance(st.now, r.status, up_to)
            if new.read > st.now.read:
                st.read_device = r.device_id
            if new.delivered > st.now.delivered:
                st.delivered_device = r.device_id
            st.now = new
        dev_changed = {k: v for k, v in dev_now.items() if v != dev_before[k]}
        user_changed = {k: st.now for k, st in states.items() if st.now != st.before}
        self.store.set_offsets(dev_changed, user_changed)
        if self.config.offsets_fold_ms == 0:
            self.store.fold_offsets()
        self.offsets.put(dev_changed, user_changed)
        for ev in logic.receipt_events(states):
            self.publisher.send(topics.MESSAGES_STORED, ev, key=ev.conversation)

    def _known_lasts(self, wanted: dict[str, int]) -> dict[str, int]:
        """The newest seq of each conversation, from memory where it is at least ``wanted``.

        A receipt above what this process knows may come from messages stored
        elsewhere (partitions that just moved here): those are read again.
        """
        reload = [c for c, seq in wanted.items() if self._lasts.get(c, -1) < seq]
        if reload:
            self._lasts.update(self.store.load_lasts(reload))
        return {c: self._lasts.get(c, 0) for c in wanted}

    def _offsets_of(
        self, receipts: list[InboundReceipt]
    ) -> tuple[dict[tuple[str, str, str], Offsets], dict[tuple[str, str], Offsets]]:
        """Current device and user offsets for these receipts: from memory, the misses read once."""
        cache = self.offsets
        dev_keys = {(r.user_id, r.device_id, r.conversation) for r in receipts}
        user_keys = {(r.user_id, r.conversation) for r in receipts}
        dev_miss = [k for k in dev_keys if k not in cache.devices]
        user_miss = [k for k in user_keys if k not in cache.users]
        if dev_miss or user_miss:
            found_dev = self.store.get_device_offsets_many(dev_miss) if dev_miss else {}
            found_user = self.store.get_user_offsets_many(user_miss) if user_miss else {}
            cache.put(
                {k: found_dev.get(k, Offsets()) for k in dev_miss}, {k: found_user.get(k, Offsets()) for k in user_miss}
            )
        return {k: cache.devices.get(k, Offsets()) for k in dev_keys}, {
            k: cache.users.get(k, Offsets()) for k in user_keys
        }

    @staticmethod
    def _not_participant() -> dict[str, Any]:
        return error_frame("forbidden", "you are not a participant of this conversation")

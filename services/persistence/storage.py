"""MongoDB storage of persistence: the only module of the service that uses pymongo.

Collections (all in the shared database, names owned by this service):

- ``messages``: one document per message, ``_id`` = message id. Unique
  ``(conversation, seq)`` (history and replay are bounded seq ranges on it)
  and unique ``(id, from)`` (the sender's client id: idempotent retries).
- ``conversations``: one document per conversation, ``_id`` = conversation:
  ``last_seq`` (the newest stored seq) and ``last`` = ``{seq, ts, message}``
  of the newest message (both raised with ``$max``, so they never go back),
  and for a dm its two ``members`` (a user's dms are one indexed query). It
  is written once per batch per conversation, with the journal (``j=True``):
  that write is what makes the batch's messages durable before any ack
  (WiredTiger's log is sequential, so syncing it syncs the messages inserted
  just before). A crash between the insert and this write leaves messages
  above ``last_seq``; :meth:`PersistenceStore.load_lasts` finds and repairs
  them before numbering again. Seqs are handed out in memory from there.
  Group conversations of a user come from ``member_ranges``, so a group
  message costs no per-member write.
- ``member_ranges``: per (group, user) membership the seqs the user may read
  (``from_seq`` at joining, ``to_seq`` at removal, None while a member).
- ``offsets``: one document per (user, conversation): the user's
  ``delivered_seq`` and ``read_seq`` (the highest over their devices) and,
  under ``devices.<device_id>``, each device's; all raised with ``$max``
  only. Written through ``offset_journal`` (below), not per receipt.
- ``offset_journal``: what receipts raised, one document per batch of
  receipts (a consumer poll), inserted before the batch's receipts are
  answered; :meth:`PersistenceStore.fold_offsets` folds what this process
  journaled into ``offsets`` every few seconds, one upsert per (user,
  conversation) however many receipts raised it, and deletes those journal
  documents; :meth:`PersistenceStore.recover_offsets` folds what a process
  that died left there. A group message answered by 1,000 members is then one
  insert, not 1,000 upserts (SecantusDB: ~3 ms against ~750 ms).
- ``persistence_users``: the projection of accounts from user events
  (known, deleted), for dm authorisation and ``from_deleted`` in history.
- ``mutes``: (user, conversation) pairs a user muted; read by the push
  service through ``GET /internal/mutes/{user_id}``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from chatlib.mongo import Index, chunked, find_in, journaled
from chatlib.schemas import StoredMessage
from pymongo import InsertOne, UpdateOne
from pymongo.database import Database
from pymongo.errors import BulkWriteError

from .logic import Interval, KnownUser, MemberRange, Offsets, parties

logger = logging.getLogger(__name__)

MESSAGES = "messages"
CONVERSATIONS = "conversations"
#: Before ``conversations``: counters (and group lasts), and dm lasts per user (migrated at start).
OLD_COUNTERS = "conversation_counters"
OLD_USER_CONVERSATIONS = "user_conversations"
RANGES = "member_ranges"
OFFSETS = "offsets"
#: Before ``offsets``: device and user offsets in two collections (migrated at start).
OLD_DEVICE_OFFSETS = "device_offsets"
OLD_USER_OFFSETS = "user_offsets"
OFFSET_JOURNAL = "offset_journal"
#: Entries of one journal document at most (a poll's receipts; a document stays far below 16 MB).
JOURNAL_ENTRIES_MAX = 20_000
#: Upserts per bulk write when folding: SecantusDB runs one command at a time (~0.75 ms an
#: upsert), so a fold of a 1,000-member group in one command held every message write for ~750 ms.
FOLD_CHUNK = 50
USERS = "persistence_users"
MUTES = "mutes"


def _key(*parts: str) -> str:
    # Composite _ids; ids never contain "|" (user, device and group ids are generated hex).
    return "|".join(parts)


def _message_doc(m: StoredMessage) -> dict[str, Any]:
    return {
        "_id": m.message_id,
        "conversation": m.conversation,
        "seq": m.seq,
        "from": m.sender,
        "from_device": m.from_device,
        "to": m.to,
        "group": m.group,
        "id": m.id,
        "body": m.body,
        "ts": m.ts,
    }


def _to_message(doc: dict[str, Any]) -> StoredMessage:
    return StoredMessage.model_validate({**doc, "message_id": doc["_id"]})


def _last_of(m: StoredMessage) -> dict[str, Any]:
    # Field order matters: $max compares documents field by field, seq first.
    return {"seq": m.seq, "ts": m.ts, "message": m.frame()}


def _to_range(doc: dict[str, Any]) -> MemberRange:
    return MemberRange(
        range_id=doc["_id"],
        conversation=doc["conversation"],
        user_id=doc["user_id"],
        from_seq=int(doc["from_seq"]),
        to_seq=doc.get("to_seq"),
        opened_ts=int(doc.get("opened_ts", 0)),
        closed_ts=doc.get("closed_ts"),
        joined_ts=int(doc.get("joined_ts", 0)),
    )


def _offsets(doc: dict[str, Any] | None) -> Offsets:
    if doc is None:
        return Offsets()
    return Offsets(delivered=int(doc.get("delivered_seq", 0)), read=int(doc.get("read_seq", 0)))


def _higher(a: Offsets, b: Offsets) -> Offsets:
    return Offsets(delivered=max(a.delivered, b.delivered), read=max(a.read, b.read))


def _raise_all(table: dict[Any, Offsets], updates: dict[Any, Offsets]) -> None:
    for k, o in updates.items():
        table[k] = _higher(table[k], o) if k in table else o


class _Unfolded:
    """Offsets this process journaled and has not folded into ``offsets`` yet, by user.

    Reads see them until a fold has written them (the ones a fold is writing
    included), so a receipt is visible at once through this store.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: user -> (device, conversation) -> offsets; user -> conversation -> offsets
        self.devices: dict[str, dict[tuple[str, str], Offsets]] = {}
        self.users: dict[str, dict[str, Offsets]] = {}
        self.journal_ids: list[Any] = []
        #: what folds in progress are writing (same shapes), until written
        self.folding: list[tuple[dict[str, dict[tuple[str, str], Offsets]], dict[str, dict[str, Offsets]]]] = []

    def add(self, devices: dict[tuple[str, str, str], Offsets], users: dict[tuple[str, str], Offsets]) -> None:
        """(Lock held.)"""
        for (u, d, c), o in devices.items():
            _raise_all(self.devices.setdefault(u, {}), {(d, c): o})
        for (u, c), o in users.items():
            _raise_all(self.users.setdefault(u, {}), {c: o})

    def take(self) -> tuple[dict[tuple[str, str, str], Offsets], dict[tuple[str, str], Offsets], list[Any], Any]:
        """Start a fold: what is unfolded, flat, the journal documents it came from, and a token
        for :meth:`folded`."""
        with self.lock:
            devices = {(u, d, c): o for u, m in self.devices.items() for (d, c), o in m.items()}
            users = {(u, c): o for u, m in self.users.items() for c, o in m.items()}
            ids = self.journal_ids
            token = (self.devices, self.users)
            self.folding.append(token)
            self.devices, self.users, self.journal_ids = {}, {}, []
            return devices, users, ids, token

    def folded(self, token: Any) -> None:
        """That fold's offsets are in ``offsets`` (or given back)."""
        with self.lock:
            self.folding = [f for f in self.folding if f is not token]

    def give_back(
        self, devices: dict[tuple[str, str, str], Offsets], users: dict[tuple[str, str], Offsets], ids: list[Any]
    ) -> None:
        """A fold failed: keep its offsets and journal documents for the next."""
        with self.lock:
            self.add(devices, users)
            self.journal_ids[:0] = ids

    def device_view(self, user_id: str) -> dict[tuple[str, str], Offsets]:
        """(device, conversation) -> offsets of one user (lock held)."""
        out: dict[tuple[str, str], Offsets] = {}
        for devices, _ in self.folding:
            _raise_all(out, devices.get(user_id, {}))
        _raise_all(out, self.devices.get(user_id, {}))
        return out

    def user_view(self, user_id: str) -> dict[str, Offsets]:
        """conversation -> offsets of one user (lock held)."""
        out: dict[str, Offsets] = {}
        for _, users in self.folding:
            _raise_all(out, users.get(user_id, {}))
        _raise_all(out, self.users.get(user_id, {}))
        return out


def _dm_entry(doc: dict[str, Any], user_id: str) -> dict[str, Any]:
    peers = [u for u in doc.get("members", []) if u != user_id]
    return {"conversation": doc["_id"], "peer": peers[0] if peers else user_id, "last": doc.get("last", {})}


def _range_filter(conversation: str, intervals: Iterable[Interval]) -> list[dict[str, Any]]:
    return [{"conversation": conversation, "seq": {"$gte": lo, "$lte": hi}} for lo, hi in intervals]


class SeqTaken(Exception):
    """A seq this process handed out is taken already: another process numbered in the conversation."""


class PersistenceStore:
    """Every query of persistence."""

    INDEXES = [
        Index(MESSAGES, [("conversation", 1), ("seq", 1)], unique=True),
        Index(MESSAGES, [("id", 1), ("from", 1)], unique=True),
        Index(CONVERSATIONS, [("members", 1)]),
        Index(RANGES, [("user_id", 1), ("conversation", 1)]),
        Index(RANGES, [("conversation", 1)]),
        Index(OFFSETS, [("user_id", 1)]),
        Index(MUTES, [("user_id", 1)]),
    ]

    def __init__(self, db: Database[dict[str, Any]]):
        self.db = db
        self.messages = db[MESSAGES]
        # The one journaled write of a message batch (see the module docstring): an ack
        # is sent only after it, so a database crash cannot lose an acknowledged message.
        self.conversations = journaled(db[CONVERSATIONS])
        self.ranges = journaled(db[RANGES])  # who may read what
        self.offsets = db[OFFSETS]
        self.offset_journal = db[OFFSET_JOURNAL]
        self._unfolded = _Unfolded()
        #: one fold at a time, and none between a device's removal and its fold (it would bring it back)
        self._fold_lock = threading.RLock()
        self.users = db[USERS]
        self.mutes = journaled(db[MUTES])

    def migrate(self) -> int:
        """Build ``conversations`` from the collections that held the same facts before; idempotent.

        Returns the number of conversations written. Runs at start; a store
        that never had the old collections does nothing.
        """
        self.migrate_offsets()
        self.recover_offsets()
        if self.conversations.estimated_document_count() > 0:
            return 0
        docs: dict[str, dict[str, Any]] = {}
        for d in self.db[OLD_COUNTERS].find():
            doc = docs.setdefault(d["_id"], {"_id": d["_id"], "last_seq": 0})
            doc["last_seq"] = max(doc["last_seq"], int(d.get("last_seq", 0)))
            if d.get("last"):
                doc["last"] = d["last"]
        for d in self.db[OLD_USER_CONVERSATIONS].find():
            doc = docs.setdefault(d["conversation"], {"_id": d["conversation"], "last_seq": 0})
            doc["members"] = parties(d["conversation"])
            if d.get("last") and int(d["last"].get("seq", 0)) >= int(doc.get("last", {}).get("seq", 0)):
                doc["last"] = d["last"]
        for doc in docs.values():
            doc["last_seq"] = max(doc["last_seq"], int(doc.get("last", {}).get("seq", 0)))
        if docs:
            ops = [UpdateOne({"_id": k}, {"$setOnInsert": v}, upsert=True) for k, v in docs.items()]
            self.conversations.bulk_write(ops, ordered=False)
            logger.info("migrated %d conversations to %s", len(docs), CONVERSATIONS)
        return len(docs)

    # -- messages ----------------------------------------------------------

    def get_messages_by_keys(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], StoredMessage]:
        """Stored messages by (sender, client id): one ``$in`` query on the unique index."""
        wanted = set(keys)
        if not wanted:
            return {}
        docs = find_in(self.messages, "id", sorted({cid for _, cid in wanted}))
        out = {}
        for doc in docs:
            key = (doc["from"], doc["id"])
            if key in wanted:
                out[key] = _to_message(doc)
        return out

    def load_lasts(self, conversations: Iterable[str]) -> dict[str, int]:
        """The newest stored seq of each conversation (0 for a new one), where numbering goes on.

        Normally that is the conversation's ``last_seq``. A process that died
        between inserting a batch and advancing its conversations left
        messages above it: they are found with one bounded index range per
        conversation and the conversation is advanced to them first.
        """
        convs = sorted(set(conversations))
        if not convs:
            return {}
        lasts = {
            d["_id"]: int(d.get("last_seq", 0))
            for d in find_in(self.conversations, "_id", convs, projection={"last_seq": 1})
        }
        out = {c: lasts.get(c, 0) for c in convs}
        above: dict[str, StoredMessage] = {}
        for part in chunked(convs):
            query = {"$or": [{"conversation": c, "seq": {"$gt": out[c]}} for c in part]}
            for doc in self.messages.find(query):
                m = _to_message(doc)
                if m.conversation not in above or m.seq > above[m.conversation].seq:
                    above[m.conversation] = m
        if above:
            logger.warning("%d conversations behind their stored messages (a crash mid-batch): repaired", len(above))
            self.save_conversations(list(above.values()))
            out.update({c: m.seq for c, m in above.items()})
        return out

    def insert_new(self, messages: list[StoredMessage]) -> tuple[int, bool]:
        """Insert ``messages`` in order, up to the first that repeats a stored one (same sender and
        client id): how many went in, and whether it stopped at such a repeat.

        Not journaled by itself: :meth:`save_conversations` follows. Raises
        :class:`SeqTaken` if a seq is taken already (someone else numbered in
        the conversation).
        """
        if not messages:
            return 0, False
        try:
            self.messages.insert_many([_message_doc(m) for m in messages], ordered=True)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors") or [{}]
            first = errors[0]
            if first.get("code") != 11000:
                raise
            index_name = str(first.get("errmsg", ""))
            pattern = first.get("keyPattern") or {}
            if "seq" in pattern or "conversation_1_seq_1" in index_name:
                raise SeqTaken(str(first.get("keyValue", ""))) from exc
            if "id" in pattern or "id_1_from_1" in index_name:
                return int(first.get("index", 0)), True
            raise
        return len(messages), False

    def get_messages(self, conversation: str, intervals: list[Interval]) -> list[StoredMessage]:
        """Messages with seq in the intervals, in seq order (one bounded index range per interval)."""
        out: list[StoredMessage] = []
        for flt in _range_filter(conversation, intervals):
            out.extend(_to_message(d) for d in self.messages.find(flt))
        out.sort(key=lambda m: m.seq)
        return out

    def get_message_at(self, conversation: str, seq: int) -> StoredMessage | None:
        doc = self.messages.find_one({"conversation": conversation, "seq": seq})
        return _to_message(doc) if doc else None

    def count_from_others(self, conversation: str, intervals: list[Interval], user_id: str) -> int:
        """How many messages in the intervals were sent by someone other than ``user_id``."""
        return sum(
            self.messages.count_documents({**flt, "from": {"$ne": user_id}})
            for flt in _range_filter(conversation, intervals)
        )

    # -- conversations --------------------------------------------------------

    def save_conversations(self, messages: Iterable[StoredMessage]) -> None:
        """Advance each conversation to its newest message in ``messages``: one journaled bulk write."""
        newest: dict[str, StoredMessage] = {}
        for m in messages:
            if m.conversation not in newest or m.seq > newest[m.conversation].seq:
                newest[m.conversation] = m
        ops: list[Any] = []
        for conv, m in newest.items():
            insert: dict[str, Any] = {"members": parties(conv)} if m.group is None else {}
            update: dict[str, Any] = {"$max": {"last_seq": m.seq, "last": _last_of(m)}}
            if insert:
                update["$setOnInsert"] = insert
            ops.append(UpdateOne({"_id": conv}, update, upsert=True))
        if ops:
            self.conversations.bulk_write(ops, ordered=False)

    def get_lasts(self, conversations: Iterable[str]) -> dict[str, dict[str, Any]]:
        """``{conversation: {seq, ts, message}}``: the newest stored message of each (absent: none yet)."""
        ids = sorted(set(conversations))
        if not ids:
            return {}
        docs = find_in(self.conversations, "_id", ids, projection={"last": 1})
        return {d["_id"]: d["last"] for d in docs if d.get("last")}

    def get_dm_conversations_of(self, user_ids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        """Each user's dms, ``{conversation, peer, last: {seq, ts, message}}``, in ``$in`` queries."""
        ids = sorted(set(user_ids))
        out: dict[str, list[dict[str, Any]]] = {u: [] for u in ids}
        seen: set[str] = set()
        for d in find_in(self.conversations, "members", ids, projection={"members": 1, "last": 1}):
            if d["_id"] in seen:
                continue  # its two members fell into two chunks of the $in
            seen.add(d["_id"])
            for u in set(d.get("members", [])):
                if u in out:
                    out[u].append(_dm_entry(d, u))
        return out

    def get_dm_peers(self, user_ids: Iterable[str]) -> dict[str, set[str]]:
        """Everyone each user shares a dm with."""
        ids = sorted(set(user_ids))
        out: dict[str, set[str]] = {u: set() for u in ids}
        for d in find_in(self.conversations, "members", ids, projection={"members": 1}):
            members = d.get("members", [])
            for u in members:
                if u in out:
                    out[u].update(m for m in members if m != u)
        return out

    # -- member ranges ---------------------------------------------------------

    def get_ranges_of_user(self, user_id: str, conversation: str | None = None) -> list[MemberRange]:
        flt: dict[str, Any] = {"user_id": user_id}
        if conversation is not None:
            flt["conversation"] = conversation
        return [_to_range(d) for d in self.ranges.find(flt)]

    def get_ranges_of_user_ids(self, user_ids: Iterable[str]) -> dict[str, list[MemberRange]]:
        """Every membership range of each user, in ``$in`` queries."""
        ids = sorted(set(user_ids))
        out: dict[str, list[MemberRange]] = {u: [] for u in ids}
        for d in find_in(self.ranges, "user_id", ids):
            out[d["user_id"]].append(_to_range(d))
        return out

    def get_ranges_of_conversations(self, conversations: Iterable[str]) -> list[MemberRange]:
        ids = sorted(set(conversations))
        if not ids:
            return []
        return [_to_range(d) for d in find_in(self.ranges, "conversation", ids)]

    def get_ranges_of_users(self, user_ids: Iterable[str], conversations: Iterable[str]) -> list[MemberRange]:
        users, convs = sorted(set(user_ids)), sorted(set(conversations))
        if not users or not convs:
            return []
        return [_to_range(d) for d in find_in(self.ranges, "user_id", users, {"conversation": {"$in": convs}})]

    def save_ranges(self, opened: list[MemberRange], closed: list[MemberRange]) -> None:
        ops: list[Any] = [
            InsertOne(
                {
                    "_id": r.range_id,
                    "conversation": r.conversation,
                    "user_id": r.user_id,
                    "from_seq": r.from_seq,
                    "to_seq": None,
                    "opened_ts": r.opened_ts,
                    "closed_ts": None,
                    "joined_ts": r.joined_ts,
                }
            )
            for r in opened
        ]
        ops += [
            UpdateOne({"_id": r.range_id, "to_seq": None}, {"$set": {"to_seq": r.to_seq, "closed_ts": r.closed_ts}})
            for r in closed
        ]
        if ops:
            self.ranges.bulk_write(ops, ordered=True)

    # -- offsets ---------------------------------------------------------------

    def get_device_offsets(self, user_id: str, device_id: str) -> dict[str, Offsets]:
        """conversation -> the device's offsets (every conversation the user has offsets in)."""
        return self.get_offsets_of_devices([(user_id, device_id)])[(user_id, device_id)]

    def get_offsets_of_devices(self, devices: Iterable[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Offsets]]:
        """:meth:`get_device_offsets` of many (user, device) pairs, in ``$in`` queries by user."""
        wanted = set(devices)
        out: dict[tuple[str, str], dict[str, Offsets]] = {key: {} for key in wanted}
        by_user: dict[str, set[str]] = {}
        for u, d in wanted:
            by_user.setdefault(u, set()).add(d)
        projection = {"conversation": 1, "user_id": 1, "devices": 1}
        for doc in find_in(self.offsets, "user_id", sorted(by_user), projection=projection):
            stored = doc.get("devices", {})
            for device_id in by_user[doc["user_id"]]:
                out[(doc["user_id"], device_id)][doc["conversation"]] = _offsets(stored.get(device_id))
        with self._unfolded.lock:
            for u, device_ids in by_user.items():
                for (d, c), o in self._unfolded.device_view(u).items():
                    if d in device_ids:
                        _raise_all(out[(u, d)], {c: o})
        return out

    def get_device_offsets_many(self, keys: Iterable[tuple[str, str, str]]) -> dict[tuple[str, str, str], Offsets]:
        wanted = set(keys)
        ids = sorted({_key(u, c) for u, _, c in wanted})
        if not ids:
            return {}
        out = {}
        for d in find_in(self.offsets, "_id", ids):
            for device_id, offsets in d.get("devices", {}).items():
                key = (d["user_id"], device_id, d["conversation"])
                if key in wanted:
                    out[key] = _offsets(offsets)
        with self._unfolded.lock:
            for u in {k[0] for k in wanted}:
                view = self._unfolded.device_view(u)
                _raise_all(out, {(u, d, c): o for (d, c), o in view.items() if (u, d, c) in wanted})
        return out

    def get_user_offsets(self, user_id: str) -> dict[str, Offsets]:
        docs = self.offsets.find({"user_id": user_id}, {"conversation": 1, "delivered_seq": 1, "read_seq": 1})
        out = {d["conversation"]: _offsets(d) for d in docs}
        with self._unfolded.lock:
            mine = self._unfolded.user_view(user_id)
        _raise_all(out, mine)
        return out

    def get_user_offsets_many(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Offsets]:
        wanted = set(keys)
        ids = sorted({_key(*k) for k in wanted})
        if not ids:
            return {}
        docs = find_in(
            self.offsets, "_id", ids, projection={"user_id": 1, "conversation": 1, "delivered_seq": 1, "read_seq": 1}
        )
        out = {(d["user_id"], d["conversation"]): _offsets(d) for d in docs}
        with self._unfolded.lock:
            for u in {k[0] for k in wanted}:
                view = self._unfolded.user_view(u)
                _raise_all(out, {(u, c): o for c, o in view.items() if (u, c) in wanted})
        return out

    def set_offsets(self, devices: dict[tuple[str, str, str], Offsets], users: dict[tuple[str, str], Offsets]) -> None:
        """Raise offsets (a late or repeated receipt never moves one back): journaled now, in one
        insert, and readable at once through this store; folded into ``offsets`` by
        :meth:`fold_offsets`."""
        entries: list[list[Any]] = [[u, d, c, o.delivered, o.read] for (u, d, c), o in devices.items()]
        entries += [[u, None, c, o.delivered, o.read] for (u, c), o in users.items()]
        ids = [
            r.inserted_id
            for r in (self.offset_journal.insert_one({"e": part}) for part in chunked(entries, JOURNAL_ENTRIES_MAX))
        ]
        with self._unfolded.lock:
            self._unfolded.add(devices, users)
            self._unfolded.journal_ids += ids

    def fold_offsets(self, pace: bool = False) -> int:
        """Write what this process journaled into ``offsets`` (one upsert per user and conversation),
        then drop those journal documents; returns the upserts. A failure keeps them for the next fold.
        ``pace``: see :meth:`_upsert_offsets` (the periodic fold)."""
        with self._fold_lock:
            devices, users, ids, token = self._unfolded.take()
            try:
                if not ids:
                    return 0
                n = self._upsert_offsets(devices, users, pace=pace)
                self._drop_journal(ids)
            except BaseException:
                self._unfolded.give_back(devices, users, ids)
                raise
            finally:
                self._unfolded.folded(token)
            return n

    def recover_offsets(self) -> int:
        """Fold every journal document there is (a process that died left them unfolded); returns them.

        Safe while other processes journal: folding is a ``$max``, and a document
        folded twice changes nothing.
        """
        with self._fold_lock:
            return self._recover_offsets()

    def _recover_offsets(self) -> int:
        devices: dict[tuple[str, str, str], Offsets] = {}
        users: dict[tuple[str, str], Offsets] = {}
        ids = []
        for doc in self.offset_journal.find():
            ids.append(doc["_id"])
            for u, d, c, delivered, read in doc.get("e", []):
                o = Offsets(delivered=int(delivered), read=int(read))
                if d is None:
                    _raise_all(users, {(u, c): o})
                else:
                    _raise_all(devices, {(u, d, c): o})
        if not ids:
            return 0
        self._upsert_offsets(devices, users)
        self._drop_journal(ids)
        logger.info("folded %d offset journal documents left unfolded", len(ids))
        return len(ids)

    def _drop_journal(self, ids: list[Any]) -> None:
        """Delete journal documents that are folded."""
        for part in chunked(ids):
            self.offset_journal.delete_many({"_id": {"$in": part}})

    def _upsert_offsets(
        self, devices: dict[tuple[str, str, str], Offsets], users: dict[tuple[str, str], Offsets], pace: bool = False
    ) -> int:
        """``$max`` into ``offsets``: one upsert per (user, conversation), user and device levels together.

        ``pace``: after each bulk write, wait as long as it took, so a large fold leaves the
        database at least half its time for message writes (a fold is not urgent; they are).
        """
        raised: dict[tuple[str, str], dict[str, int]] = {}
        for (u, c), o in users.items():
            raised.setdefault((u, c), {}).update({"delivered_seq": o.delivered, "read_seq": o.read})
        for (u, d, c), o in devices.items():
            raised.setdefault((u, c), {}).update(
                {f"devices.{d}.delivered_seq": o.delivered, f"devices.{d}.read_seq": o.read}
            )
        ops = [
            UpdateOne(
                {"_id": _key(u, c)},
                {"$max": values, "$setOnInsert": {"user_id": u, "conversation": c}},
                upsert=True,
            )
            for (u, c), values in raised.items()
        ]
        for i, part in enumerate(chunked(ops, FOLD_CHUNK)):
            started = time.monotonic()
            self.offsets.bulk_write(part, ordered=False)
            if pace and (i + 1) * FOLD_CHUNK < len(ops):
                time.sleep(time.monotonic() - started)
        return len(ops)

    def delete_device_offsets(self, user_id: str, device_id: str | None = None) -> int:
        """Drop a device's offsets (its queue), or every device's of a user (their own read state stays).

        What this process journaled is folded first, so no later fold of its brings the
        device back (another persistence instance's unfolded receipt from that device,
        folded after this, can leave a stale entry under ``devices``: replay for a
        device id that comes back then starts from it).
        """
        field = "devices" if device_id is None else f"devices.{device_id}"
        with self._fold_lock:
            self.fold_offsets()
            return self.offsets.update_many({"user_id": user_id}, {"$unset": {field: ""}}).modified_count

    def migrate_offsets(self) -> int:
        """Build ``offsets`` from the two collections that held them before; idempotent."""
        if self.offsets.estimated_document_count() > 0:
            return 0
        devices = {
            (d["user_id"], d["device_id"], d["conversation"]): _offsets(d) for d in self.db[OLD_DEVICE_OFFSETS].find()
        }
        users = {(d["user_id"], d["conversation"]): _offsets(d) for d in self.db[OLD_USER_OFFSETS].find()}
        self._upsert_offsets(devices, users)
        if devices or users:
            logger.info("migrated %d device and %d user offsets to %s", len(devices), len(users), OFFSETS)
        return len(devices) + len(users)

    # -- users projection --------------------------------------------------------

    def get_users(self, user_ids: Iterable[str]) -> dict[str, KnownUser]:
        ids = sorted(set(user_ids))
        if not ids:
            return {}
        return {
            d["_id"]: KnownUser(d["_id"], bool(d.get("deleted", False)))
            for d in find_in(self.users, "_id", ids, projection={"deleted": 1})
        }

    def set_user(self, user_id: str, username: str, name: str) -> None:
        self.users.update_one(
            {"_id": user_id},
            {"$set": {"username": username, "name": name}, "$setOnInsert": {"deleted": False}},
            upsert=True,
        )

    def set_user_deleted(self, user_id: str, ts: int) -> None:
        """Unregistered: the account stays known (history shows it as deleted)."""
        self.users.update_one({"_id": user_id}, {"$set": {"deleted": True, "deleted_ts": ts}}, upsert=True)

    # -- mutes -----------------------------------------------------------------

    def set_mute(self, user_id: str, conversation: str, muted: bool) -> None:
        if muted:
            self.mutes.update_one(
                {"_id": _key(user_id, conversation)},
                {"$set": {"user_id": user_id, "conversation": conversation}},
                upsert=True,
            )
        else:
            self.mutes.delete_one({"_id": _key(user_id, conversation)})

    def get_mutes(self, user_id: str) -> list[str]:
        return sorted(d["conversation"] for d in self.mutes.find({"user_id": user_id}, {"conversation": 1}))

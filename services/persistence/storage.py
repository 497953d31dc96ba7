"""MongoDB storage of persistence: the only module of the service that uses pymongo.

Collections (all in the shared database, names owned by this service):

- ``messages``: one document per message, ``_id`` = message id. Unique
  ``(conversation, seq)`` (history and replay are bounded seq ranges on it)
  and unique ``(id, from)`` (the sender's client id: idempotent retries).
- ``conversation_counters``: ``_id`` = conversation, ``last_seq`` (the last
  seq handed out) and, for groups, ``last`` = ``{seq, ts, message}`` of the
  newest stored message (raised with ``$max``, so it never goes back).
- ``user_conversations``: one document per (user, dm conversation) with the
  peer and ``last`` as above: a user's dms in one indexed query. Group
  conversations of a user come from ``member_ranges`` instead, so a group
  message costs no per-member write.
- ``member_ranges``: per (group, user) membership the seqs the user may read
  (``from_seq`` at joining, ``to_seq`` at removal, None while a member).
- ``device_offsets`` / ``user_offsets``: delivered and read seqs per device
  and per user (max over the user's devices), raised with ``$max`` only.
- ``persistence_users``: the projection of accounts from user events
  (known, deleted), for dm authorisation and ``from_deleted`` in history.
- ``mutes``: (user, conversation) pairs a user muted; read by the push
  service through ``GET /internal/mutes/{user_id}``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from chatlib.mongo import Index, find_in, journaled
from chatlib.schemas import StoredMessage
from pymongo import InsertOne, ReturnDocument, UpdateOne
from pymongo.database import Database

from .logic import Interval, KnownUser, MemberRange, Offsets, parties

logger = logging.getLogger(__name__)

MESSAGES = "messages"
COUNTERS = "conversation_counters"
USER_CONVERSATIONS = "user_conversations"
RANGES = "member_ranges"
DEVICE_OFFSETS = "device_offsets"
USER_OFFSETS = "user_offsets"
USERS = "persistence_users"
MUTES = "mutes"

#: How far back the counter repair looks for stored messages (more than one poll's worth).
REPAIR_WINDOW = 2000


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


def _range_filter(conversation: str, intervals: Iterable[Interval]) -> list[dict[str, Any]]:
    return [{"conversation": conversation, "seq": {"$gte": lo, "$lte": hi}} for lo, hi in intervals]


class PersistenceStore:
    """Every query of persistence."""

    INDEXES = [
        Index(MESSAGES, [("conversation", 1), ("seq", 1)], unique=True),
        Index(MESSAGES, [("id", 1), ("from", 1)], unique=True),
        Index(USER_CONVERSATIONS, [("user_id", 1)]),
        Index(RANGES, [("user_id", 1), ("conversation", 1)]),
        Index(RANGES, [("conversation", 1)]),
        Index(DEVICE_OFFSETS, [("user_id", 1), ("device_id", 1)]),
        Index(USER_OFFSETS, [("user_id", 1)]),
        Index(MUTES, [("user_id", 1)]),
    ]

    def __init__(self, db: Database[dict[str, Any]]):
        self.db = db
        # What an ack promises lives here: these writes wait for the journal (on top of
        # the URL's w=...), so a database crash cannot lose an acknowledged message,
        # reissue its seq, or hide it from history. The rest (offsets, mutes) may lag.
        self.messages = journaled(db[MESSAGES])
        self.counters = journaled(db[COUNTERS])
        self.user_conversations = journaled(db[USER_CONVERSATIONS])
        self.ranges = journaled(db[RANGES])  # who may read what
        self.device_offsets = db[DEVICE_OFFSETS]
        self.user_offsets = db[USER_OFFSETS]
        self.users = db[USERS]
        self.mutes = journaled(db[MUTES])

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

    def reserve_seqs(self, conversation: str, count: int) -> int:
        """Raise the conversation's counter by ``count``; returns the new last seq."""
        doc = self.counters.find_one_and_update(
            {"_id": conversation},
            {"$inc": {"last_seq": count}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        assert doc is not None  # an upsert returning the document after the update
        return int(doc["last_seq"])

    def repair_counter(self, conversation: str) -> None:
        """Lower the counter to the highest stored seq if a crash left it ahead.

        Seqs are reserved before the messages are written; a process that died
        in between left the counter above the stored messages. Lowering it
        again (only ever the seqs never written) keeps seqs dense.
        """
        doc = self.counters.find_one({"_id": conversation}, {"last_seq": 1})
        if doc is None:
            return
        last = int(doc.get("last_seq", 0))
        if last <= 0:
            return
        lo = max(0, last - REPAIR_WINDOW)
        present = [
            int(d["seq"])
            for d in self.messages.find({"conversation": conversation, "seq": {"$gt": lo, "$lte": last}}, {"seq": 1})
        ]
        if present:
            actual = max(present)
        elif lo == 0:
            actual = 0
        else:
            return  # nothing in the window: not a crash gap, leave it
        if actual < last:
            logger.warning("conversation counter ahead of stored messages; lowering %d -> %d", last, actual)
            self.counters.update_one({"_id": conversation, "last_seq": last}, {"$set": {"last_seq": actual}})

    def insert_messages(self, messages: list[StoredMessage]) -> None:
        if messages:
            self.messages.insert_many([_message_doc(m) for m in messages], ordered=True)

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

    # -- last-message pointers ----------------------------------------------

    def set_last_messages(self, messages: Iterable[StoredMessage]) -> None:
        """Point each conversation (dm: both parties' entries; group: its counter) at its newest message."""
        newest: dict[str, StoredMessage] = {}
        for m in messages:
            if m.conversation not in newest or m.seq > newest[m.conversation].seq:
                newest[m.conversation] = m
        dm_ops: list[Any] = []
        group_ops: list[Any] = []
        for conv, m in newest.items():
            if m.group is not None:
                group_ops.append(UpdateOne({"_id": conv}, {"$max": {"last": _last_of(m)}}, upsert=True))
                continue
            a, b = parties(conv)
            for user, peer in ((a, b), (b, a)):
                dm_ops.append(
                    UpdateOne(
                        {"_id": _key(user, conv)},
                        {
                            "$max": {"last": _last_of(m)},
                            "$setOnInsert": {"user_id": user, "conversation": conv, "peer": peer},
                        },
                        upsert=True,
                    )
                )
        if dm_ops:
            self.user_conversations.bulk_write(dm_ops, ordered=False)
        if group_ops:
            self.counters.bulk_write(group_ops, ordered=False)

    def get_dm_conversations(self, user_id: str) -> list[dict[str, Any]]:
        """The user's dm entries: ``{conversation, peer, last: {seq, ts, message}}``."""
        return list(self.user_conversations.find({"user_id": user_id}))

    def get_dm_lasts(self, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """Last stored seq of dm conversations as seen by (user, conversation)."""
        ids = sorted({_key(u, c) for u, c in pairs})
        if not ids:
            return {}
        return {
            (d["user_id"], d["conversation"]): int(d.get("last", {}).get("seq", 0))
            for d in find_in(self.user_conversations, "_id", ids)
        }

    def get_group_lasts(self, conversations: Iterable[str]) -> dict[str, dict[str, Any]]:
        """``{conversation: {seq, ts, message}}`` of the newest stored message of each group conversation."""
        ids = sorted(set(conversations))
        if not ids:
            return {}
        docs = find_in(self.counters, "_id", ids, projection={"last": 1})
        return {d["_id"]: d["last"] for d in docs if d.get("last")}

    def get_dm_peers(self, user_ids: Iterable[str]) -> dict[str, set[str]]:
        """Everyone each user shares a dm with."""
        ids = sorted(set(user_ids))
        out: dict[str, set[str]] = {u: set() for u in ids}
        if ids:
            for d in find_in(self.user_conversations, "user_id", ids, projection={"user_id": 1, "peer": 1}):
                out[d["user_id"]].add(d["peer"])
        return out

    # -- member ranges ---------------------------------------------------------

    def get_ranges_of_user(self, user_id: str, conversation: str | None = None) -> list[MemberRange]:
        flt: dict[str, Any] = {"user_id": user_id}
        if conversation is not None:
            flt["conversation"] = conversation
        return [_to_range(d) for d in self.ranges.find(flt)]

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
        docs = self.device_offsets.find({"user_id": user_id, "device_id": device_id})
        return {d["conversation"]: _offsets(d) for d in docs}

    def get_device_offsets_many(self, keys: Iterable[tuple[str, str, str]]) -> dict[tuple[str, str, str], Offsets]:
        ids = sorted({_key(*k) for k in keys})
        if not ids:
            return {}
        return {
            (d["user_id"], d["device_id"], d["conversation"]): _offsets(d)
            for d in find_in(self.device_offsets, "_id", ids)
        }

    def get_user_offsets(self, user_id: str) -> dict[str, Offsets]:
        return {d["conversation"]: _offsets(d) for d in self.user_offsets.find({"user_id": user_id})}

    def get_user_offsets_many(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Offsets]:
        ids = sorted({_key(*k) for k in keys})
        if not ids:
            return {}
        return {(d["user_id"], d["conversation"]): _offsets(d) for d in find_in(self.user_offsets, "_id", ids)}

    def set_offsets(self, devices: dict[tuple[str, str, str], Offsets], users: dict[tuple[str, str], Offsets]) -> None:
        """Raise offsets (``$max``: a late or repeated receipt never moves one back)."""
        dev_ops = [
            UpdateOne(
                {"_id": _key(u, d, c)},
                {
                    "$max": {"delivered_seq": o.delivered, "read_seq": o.read},
                    "$setOnInsert": {"user_id": u, "device_id": d, "conversation": c},
                },
                upsert=True,
            )
            for (u, d, c), o in devices.items()
        ]
        user_ops = [
            UpdateOne(
                {"_id": _key(u, c)},
                {
                    "$max": {"delivered_seq": o.delivered, "read_seq": o.read},
                    "$setOnInsert": {"user_id": u, "conversation": c},
                },
                upsert=True,
            )
            for (u, c), o in users.items()
        ]
        if dev_ops:
            self.device_offsets.bulk_write(dev_ops, ordered=False)
        if user_ops:
            self.user_offsets.bulk_write(user_ops, ordered=False)

    def delete_device_offsets(self, user_id: str, device_id: str | None = None) -> int:
        """Drop a device's offsets (its queue), or every device offset of a user."""
        flt: dict[str, Any] = {"user_id": user_id}
        if device_id is not None:
            flt["device_id"] = device_id
        return self.device_offsets.delete_many(flt).deleted_count

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

"""MongoDB storage of the group service: groups, a projection of users, seed markers.

A group document is its snapshot plus ``member_ids`` (indexed, for "my
groups"), a ``version`` for optimistic concurrency, ``pending``: the
GroupChanged event not yet confirmed published (an outbox of one), so a
change stored before a crash is published again at the next start, and
``last``: the latest GroupChanged, the record the compacted topic holds for
this group, published again when the broker lost the topic.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

from chatlib.mongo import Index, find_in, journaled
from chatlib.schemas import GroupChanged, GroupSnapshot
from pymongo import UpdateOne
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

logger = logging.getLogger(__name__)

GROUPS = "groups"
USERS = "group_users"
META = "group_meta"


def _to_doc(group: GroupSnapshot, version: int, pending: GroupChanged | None) -> dict[str, Any]:
    doc = group.model_dump(mode="json")
    doc["_id"] = doc.pop("group_id")
    doc["member_ids"] = [m.user_id for m in group.members]
    doc["version"] = version
    doc["pending"] = pending.model_dump(mode="json") if pending is not None else None
    doc["last"] = doc["pending"]
    return doc


def _to_group(doc: dict[str, Any]) -> GroupSnapshot:
    return GroupSnapshot.model_validate({**doc, "group_id": doc["_id"]})


class GroupStore:
    """Every query of the group service."""

    INDEXES = [
        Index(GROUPS, [("member_ids", 1)]),
        Index(GROUPS, [("public", 1), ("deleted", 1)]),
        Index(GROUPS, [("pending.ts", 1)], options={"sparse": True}),
    ]

    def __init__(self, db: Database[dict[str, Any]]):
        self.db = db
        self.groups = journaled(db[GROUPS])  # memberships (and their outbox) answered as done
        self.users = db[USERS]
        self.meta = db[META]

    # -- groups -----------------------------------------------------------

    def get_group(self, group_id: str) -> tuple[GroupSnapshot, int] | None:
        """The group (deleted ones too) and its version."""
        doc = self.groups.find_one({"_id": group_id})
        if doc is None:
            return None
        return _to_group(doc), int(doc.get("version", 0))

    def insert_group(self, group: GroupSnapshot, pending: GroupChanged) -> None:
        self.groups.insert_one(_to_doc(group, 1, pending))

    def set_group(self, group: GroupSnapshot, version: int, pending: GroupChanged) -> bool:
        """Replace the group if it is still at ``version`` (stored as ``version + 1``)."""
        res = self.groups.replace_one({"_id": group.group_id, "version": version}, _to_doc(group, version + 1, pending))
        return res.modified_count == 1

    def delete_pending(self, group_id: str, version: int) -> None:
        """The change stored as ``version`` is published: drop it from the outbox."""
        self.groups.update_one({"_id": group_id, "version": version}, {"$set": {"pending": None}})

    def get_pending(self) -> list[tuple[GroupChanged, int]]:
        """Changes stored but not confirmed published, oldest first."""
        docs = self.groups.find({"pending": {"$ne": None}}, {"pending": 1, "version": 1})
        out = [(GroupChanged.model_validate(d["pending"]), int(d.get("version", 0))) for d in docs]
        out.sort(key=lambda p: p[0].ts)
        return out

    def get_all_latest(self) -> Iterator[tuple[GroupSnapshot, GroupChanged | None]]:
        """Every group (deleted ones too) with its latest change; None for a group stored
        before changes were kept (``last``)."""
        for doc in self.groups.find({}, {"pending": 0}).sort("_id", 1):
            last = doc.get("last")
            yield _to_group(doc), GroupChanged.model_validate(last) if last else None

    def get_groups_of(self, user_id: str) -> list[GroupSnapshot]:
        docs = self.groups.find({"member_ids": user_id, "deleted": False})
        return sorted((_to_group(d) for d in docs), key=lambda g: g.created_ts)

    def get_public_groups(self) -> list[GroupSnapshot]:
        docs = self.groups.find({"public": True, "deleted": False})
        return sorted((_to_group(d) for d in docs), key=lambda g: g.created_ts)

    # -- users projection -------------------------------------------------

    def set_users(self, changes: Iterable[tuple[str, str | None, bool]]) -> None:
        """Apply (user_id, username, active) changes in order, in one round trip."""
        ops = []
        for user_id, username, active in changes:
            fields: dict[str, Any] = {"active": active}
            if username is not None:
                fields["username"] = username
            ops.append(UpdateOne({"_id": user_id}, {"$set": fields}, upsert=True))
        if ops:
            self.users.bulk_write(ops, ordered=True)

    def get_active_users(self, user_ids: list[str]) -> set[str]:
        """Those of ``user_ids`` that are registered and not unregistered."""
        if not user_ids:
            return set()
        return {d["_id"] for d in find_in(self.users, "_id", user_ids, {"active": True}, {"_id": 1})}

    # -- seed markers -----------------------------------------------------

    def get_seed(self, key: str) -> str | None:
        doc = self.meta.find_one({"_id": key})
        return None if doc is None else str(doc["value"])

    def set_seed(self, key: str, value: str) -> bool:
        """Record a seed once; False if it was already there."""
        try:
            self.meta.insert_one({"_id": key, "value": value})
            return True
        except DuplicateKeyError:
            return False

"""MongoDB storage of push-notification: device/token projection, sender names, outcomes, dead tokens.

``push_devices`` is a projection of USER_EVENTS (one document per device,
with its push token while it has one). ``push_outcomes`` holds one record per
message and device: its ``_id`` makes a redelivered request a no-op.
Dead tokens are kept as hashes only: the token itself is a secret.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from typing import Any

from chatlib.mongo import Index, find_in
from chatlib.schemas import (
    DeviceLoggedOut,
    DevicePushToken,
    DeviceRegistered,
    DeviceRemoved,
    Event,
    UserRegistered,
    UserUnregistered,
    UserUpdated,
)
from pymongo import DeleteMany, DeleteOne, UpdateOne
from pymongo.database import Database
from pymongo.errors import BulkWriteError

from .logic import Outcome, PushDevice

logger = logging.getLogger(__name__)

DEVICES = "push_devices"
NAMES = "push_names"
OUTCOMES = "push_outcomes"
DEAD_TOKENS = "push_dead_tokens"
_DUPLICATE_KEY = 11000


def _device_id(user_id: str, device_id: str) -> str:
    return f"{user_id}/{device_id}"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class PushStore:
    """Every query of the push-notification service."""

    INDEXES = [
        Index(DEVICES, [("user_id", 1)]),
        Index(OUTCOMES, [("user_id", 1), ("ts", 1)]),
        Index(OUTCOMES, [("message_id", 1)]),
    ]

    def __init__(self, db: Database[dict[str, Any]]):
        self.devices = db[DEVICES]
        self.names = db[NAMES]
        self.outcomes = db[OUTCOMES]
        self.dead_tokens = db[DEAD_TOKENS]

    # -- projection -------------------------------------------------------

    def set_user_events(self, events: Iterable[Event]) -> None:
        """Apply user events in order: devices and tokens, sender names (two ordered bulk writes)."""
        devices: list[Any] = []
        names: list[Any] = []
        for ev in events:
            if isinstance(ev, UserRegistered | UserUpdated):
                names.append(UpdateOne({"_id": ev.user_id}, {"$set": {"name": ev.name or ev.username}}, upsert=True))
            elif isinstance(ev, DeviceRegistered):
                key = {"_id": _device_id(ev.user_id, ev.device_id)}
                doc = {"user_id": ev.user_id, "device_id": ev.device_id}
                devices.append(UpdateOne(key, {"$set": doc}, upsert=True))
            elif isinstance(ev, DevicePushToken):
                key = {"_id": _device_id(ev.user_id, ev.device_id)}
                doc = {"user_id": ev.user_id, "device_id": ev.device_id, "token": ev.push_token}
                devices.append(UpdateOne(key, {"$set": doc}, upsert=True))
            elif isinstance(ev, DeviceLoggedOut):
                devices.append(UpdateOne({"_id": _device_id(ev.user_id, ev.device_id)}, {"$unset": {"token": ""}}))
            elif isinstance(ev, DeviceRemoved):
                devices.append(DeleteOne({"_id": _device_id(ev.user_id, ev.device_id)}))
            elif isinstance(ev, UserUnregistered):
                devices.append(DeleteMany({"user_id": ev.user_id}))
                names.append(DeleteOne({"_id": ev.user_id}))
        if devices:
            self.devices.bulk_write(devices, ordered=True)
        if names:
            self.names.bulk_write(names, ordered=True)

    def get_push_devices(self, user_ids: list[str]) -> dict[str, list[PushDevice]]:
        """The devices of these users that have a push token, per user."""
        out: dict[str, list[PushDevice]] = {}
        if not user_ids:
            return out
        query = {"token": {"$exists": True, "$nin": [None, ""]}}
        for d in find_in(self.devices, "user_id", user_ids, query):
            out.setdefault(d["user_id"], []).append(PushDevice(d["user_id"], d["device_id"], d["token"]))
        for devs in out.values():
            devs.sort(key=lambda d: d.device_id)
        return out

    def get_names(self, user_ids: list[str]) -> dict[str, str]:
        if not user_ids:
            return {}
        return {d["_id"]: str(d.get("name", "")) for d in find_in(self.names, "_id", user_ids)}

    def delete_token(self, user_id: str, device_id: str, token: str, ts: int) -> None:
        """FCM said the token is dead: drop it (unless replaced meanwhile) and remember its hash."""
        self.devices.update_one({"_id": _device_id(user_id, device_id), "token": token}, {"$unset": {"token": ""}})
        self.dead_tokens.update_one(
            {"_id": token_hash(token)}, {"$set": {"user_id": user_id, "device_id": device_id, "ts": ts}}, upsert=True
        )

    # -- outcomes ---------------------------------------------------------

    def get_outcome_ids(self, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        return {d["_id"] for d in find_in(self.outcomes, "_id", ids, projection={"_id": 1})}

    def set_outcomes(self, outcomes: list[Outcome]) -> None:
        """Insert outcomes in one round trip; ones already recorded (a redelivery) are kept as they were."""
        if not outcomes:
            return
        docs = [
            {
                "_id": o.id,
                "user_id": o.user_id,
                "device_id": o.device_id,
                "conversation": o.conversation,
                "message_id": o.message_id,
                "seq": o.seq,
                "status": o.status,
                "ts": o.ts,
            }
            for o in outcomes
        ]
        try:
            self.outcomes.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            other = [e for e in exc.details.get("writeErrors", []) if e.get("code") != _DUPLICATE_KEY]
            if other:
                raise

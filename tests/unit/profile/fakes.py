"""In-memory stand-ins for the profile service's dependencies (store, publisher, session view)."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from typing import Any

from argon2 import PasswordHasher
from chatlib.schemas import Event
from kafka.errors import KafkaTimeoutError

from services.profile.logic import DELETED, DEVICE_ACTIVE, DEVICE_LOGGED_OUT, DEVICE_REMOVED, VISIBLE_STATES, tombstone
from services.profile.service import ProfileConfig, ProfileService
from services.profile.storage import UsernameTaken

Doc = dict[str, Any]
KEY = "unit-test-signing-key-0123456789abcdef"


class FakeStore:
    """The ProfileStore interface over dicts, with the same conditional-update semantics."""

    def __init__(self) -> None:
        self.users: dict[str, Doc] = {}
        self.devices: dict[str, Doc] = {}
        self.refresh: dict[str, Doc] = {}
        self.audit: list[Doc] = []
        self.device_reads = 0
        self.login_failures: dict[str, Doc] = {}

    # users
    def _username_free(self, username: str, user_id: str) -> bool:
        return all(u["username"] != username or uid == user_id for uid, u in self.users.items())

    def insert_user(self, doc: Doc) -> None:
        if not self._username_free(doc["username"], doc["_id"]):
            raise UsernameTaken(doc["username"])
        self.users[doc["_id"]] = copy.deepcopy(doc)

    def get_user(self, user_id: str) -> Doc | None:
        return copy.deepcopy(self.users.get(user_id))

    def get_user_by_username(self, username: str) -> Doc | None:
        return next((copy.deepcopy(u) for u in self.users.values() if u["username"] == username), None)

    def get_visible_users(self, usernames: list[str]) -> list[Doc]:
        return [
            {"_id": u["_id"], "username": u["username"], "name": u["name"]}
            for u in self.users.values()
            if u["username"] in usernames and u["state"] in VISIBLE_STATES
        ]

    def set_user(
        self, user_id: str, fields: Doc, unset: Iterable[str] = (), states: Iterable[str] | None = None
    ) -> bool:
        user = self.users.get(user_id)
        if user is None or (states is not None and user["state"] not in list(states)):
            return False
        if "username" in fields and not self._username_free(fields["username"], user_id):
            raise UsernameTaken(fields["username"])
        user.update(copy.deepcopy(fields))
        for name in unset:
            user.pop(name, None)
        return True

    def set_username_released(self, username: str, now: int) -> bool:
        for uid, u in self.users.items():
            if u["username"] == username and u["state"] == DELETED and u.get("username_free_at", now + 1) <= now:
                u["former_username"], u["username"] = username, tombstone(uid)
                return True
        return False

    def set_primary_claimed(self, user_id: str, device_id: str) -> bool:
        user = self.users[user_id]
        if user.get("primary_device"):
            return False
        user["primary_device"] = device_id
        return True

    def delete_primary(self, user_id: str, device_id: str) -> None:
        if self.users[user_id].get("primary_device") == device_id:
            del self.users[user_id]["primary_device"]

    def get_users_stuck_in(self, state: str, field: str, before: int) -> list[Doc]:
        return [{"_id": u["_id"]} for u in self.users.values() if u["state"] == state and u.get(field, before) < before]

    # devices
    def insert_device(self, doc: Doc) -> None:
        assert doc["_id"] not in self.devices
        self.devices[doc["_id"]] = copy.deepcopy(doc)

    def get_device(self, device_id: str) -> Doc | None:
        self.device_reads += 1
        return copy.deepcopy(self.devices.get(device_id))

    def get_devices(self, user_id: str) -> list[Doc]:
        return [
            copy.deepcopy(d)
            for d in self.devices.values()
            if d["user_id"] == user_id and d["state"] in (DEVICE_ACTIVE, DEVICE_LOGGED_OUT)
        ]

    def set_device(self, device_id: str, fields: Doc, unset: Iterable[str] = (), expect: Doc | None = None) -> bool:
        device = self.devices.get(device_id)
        if device is None or any(device.get(k) != v for k, v in (expect or {}).items()):
            return False
        device.update(copy.deepcopy(fields))
        for name in unset:
            device.pop(name, None)
        return True

    def set_devices_logged_out(self, user_id: str) -> list[str]:
        ids = []
        for d in self.devices.values():
            if d["user_id"] == user_id and d["state"] != DEVICE_REMOVED:
                d["state"] = DEVICE_LOGGED_OUT
                d.pop("sid", None)
                d.pop("push_token", None)
                ids.append(d["_id"])
        return ids

    # refresh tokens
    def insert_refresh(self, doc: Doc) -> None:
        self.refresh[doc["_id"]] = copy.deepcopy(doc)

    def get_refresh(self, token_hash: str) -> Doc | None:
        return copy.deepcopy(self.refresh.get(token_hash))

    def rotate_refresh(self, token_hash: str, now: int, successor: Doc) -> bool:
        doc = self.refresh.get(token_hash)
        if doc is None or doc["used_ts"] is not None:
            return False
        doc["used_ts"] = now
        self.insert_refresh(successor)
        return True

    def delete_expired_refresh(self, now: int) -> int:
        gone = [h for h, d in self.refresh.items() if d["expires_ts"] < now]
        for h in gone:
            del self.refresh[h]
        return len(gone)

    # audit
    def insert_audit(self, doc: Doc) -> None:
        self.audit.append(dict(doc))

    # failed logins
    def get_login_counters(self, keys: Iterable[str]) -> list[Doc]:
        return [copy.deepcopy(self.login_failures[k]) for k in keys if k in self.login_failures]

    def add_login_failure(self, key: str, now: int, window_ms: int, expires_ms: int) -> Doc:
        doc = self.login_failures.setdefault(
            key, {"_id": key, "failures": 0, "window_start": now, "lockouts": 0, "locked_until": 0}
        )
        if doc["window_start"] < now - window_ms:
            doc.update(failures=0, window_start=now)
        doc["failures"] += 1
        doc["expires_at"] = expires_ms
        return copy.deepcopy(doc)

    def set_login_locked(self, key: str, failures: int, until: int, expires_ms: int) -> bool:
        doc = self.login_failures.get(key)
        if doc is None or doc["failures"] != failures:
            return False
        doc.update(locked_until=until, failures=0, window_start=until, expires_at=expires_ms)
        doc["lockouts"] += 1
        return True

    def delete_login_counter(self, key: str) -> None:
        self.login_failures.pop(key, None)


class _Done:
    def __init__(self, error: Exception | None = None):
        self.error = error

    def get(self, timeout: float | None = None) -> None:
        if self.error is not None:
            raise self.error


class FakePublisher:
    """Records (topic, key, event); ``fail_after`` makes the n-th and later sends fail like a dead broker."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str | None, Event]] = []
        self.fail_after: int | None = None

    def send(self, topic: Any, ev: Event, key: str | None = None) -> _Done:
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            return _Done(KafkaTimeoutError("broker away"))
        self.sent.append((getattr(topic, "name", topic), key, ev))
        return _Done()

    def publish(self, topic: Any, ev: Event, key: str | None = None, timeout: float = 10.0) -> None:
        self.send(topic, ev, key).get()

    def types(self, key: str | None = None) -> list[str]:
        return [ev.TYPE for _, k, ev in self.sent if key is None or k == key]


class FakeView:
    """A session view: user_id -> UserSessions."""

    def __init__(self) -> None:
        self.data: dict[str, Event] = {}

    def get(self, key: str) -> Event | None:
        return self.data.get(key)


class Clock:
    """A settable clock (seconds)."""

    def __init__(self, t: float | None = None):
        # Starts at the real time, so tokens it stamps look like real ones.
        self.t = time.time() if t is None else t

    def __call__(self) -> float:
        return self.t


def make_service(cheap_hashing: bool = True, **config: Any) -> ProfileService:
    """A ProfileService on fakes, set up as at start (admin provisioned, unless ADMIN_USERNAME is empty).

    ``cheap_hashing`` keeps Argon2id but with tiny cost parameters, so tests run fast.
    """
    cfg = ProfileConfig(**{"jwt_secret": KEY, "admin_username": "", "auth_cache_ttl_s": 0, **config})
    svc = ProfileService(cfg, store=FakeStore(), publisher=FakePublisher(), sessions=FakeView(), clock=Clock())
    if cheap_hashing:
        svc.hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    svc.on_setup()
    return svc

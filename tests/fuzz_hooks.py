"""Schemathesis hooks for fuzzing the live system (loaded with SCHEMATHESIS_HOOKS=tests.fuzz_hooks).

Every secured operation is called with a valid token, so the fuzzer reaches
the services and not only Nginx's token check:

- an operation that revokes its caller's token (logout, unregistering, removing
  a device) gets a user of its own for every case, so it never logs out the
  user the other cases share; its positive cases name that user's own password
  and device, so they succeed;
- server administration runs as the administrator;
- every other operation shares one user, made again when its token stops
  working (a case may have disabled or unregistered it).

The system is found through FUZZ_BASE_URL, FUZZ_ADMIN_USERNAME and FUZZ_ADMIN_PASSWORD.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import requests
import schemathesis
from schemathesis import GenerationMode

BASE = os.environ.get("FUZZ_BASE_URL", "http://127.0.0.1:8080")
PASSWORD = "fuzz-password-" + uuid.uuid4().hex[:8]

#: (method, path) of the operations that revoke the caller's own token.
REVOKING = {("POST", "/v1/auth/logout"), ("DELETE", "/v1/me"), ("DELETE", "/v1/me/devices/{device_id}")}


@dataclass(frozen=True)
class Login:
    token: str
    user_id: str
    device_id: str


def _post(path: str, body: dict[str, Any]) -> requests.Response:
    """POST with a retry while the per-address limit of account requests refuses (429)."""
    for attempt in range(60):
        r = requests.post(BASE + path, json=body, timeout=30)
        if r.status_code != 429:
            return r
        time.sleep(min(2.0, 0.05 * 2**attempt))
    raise RuntimeError(f"{path}: still rate limited")


def login(username: str, password: str) -> Login:
    r = _post("/v1/auth/login", {"username": username, "password": password, "device_type": "mobile"})
    r.raise_for_status()
    body = r.json()
    return Login(body["access_token"], body["user_id"], body["device_id"])


def new_user() -> Login:
    username = "fz" + uuid.uuid4().hex[:16]
    r = _post("/v1/auth/signup", {"username": username, "password": PASSWORD, "name": username})
    r.raise_for_status()
    return login(username, PASSWORD)


def _operation(context: Any) -> tuple[str, str]:
    return context.operation.method.upper(), context.operation.path


def _bearer(case: Any, data: Login) -> None:
    case.headers = case.headers or {}
    case.headers["Authorization"] = f"Bearer {data.token}"


def _positive(case: Any) -> bool:
    meta = getattr(case, "meta", None)
    return meta is None or meta.generation.mode == GenerationMode.POSITIVE


@schemathesis.auth(refresh_interval=None).apply_to(lambda ctx: _operation(ctx) in REVOKING)
class OwnUser:
    """A fresh user per case for the operations that revoke their caller's token."""

    def get(self, case: Any, context: Any) -> Login:
        return new_user()

    def set(self, case: Any, data: Login, context: Any) -> None:
        _bearer(case, data)
        if not _positive(case):
            return
        method, path = _operation(context)
        if (method, path) == ("DELETE", "/v1/me") and isinstance(case.body, dict):
            case.body["password"] = PASSWORD
        elif path == "/v1/me/devices/{device_id}" and case.path_parameters:
            case.path_parameters["device_id"] = data.device_id


@schemathesis.auth(refresh_interval=600).apply_to(path_regex="^/v1/admin/")
class Administrator:
    """The server administrator (logged in again when its token stops working)."""

    def get(self, case: Any, context: Any) -> Login:
        return login(os.environ["FUZZ_ADMIN_USERNAME"], os.environ["FUZZ_ADMIN_PASSWORD"])

    def set(self, case: Any, data: Login, context: Any) -> None:
        _bearer(case, data)


_members: list[str] = []


def member_pool() -> list[str]:
    """Three registered users, made once, whom positive cases add to groups.

    Generated ids are never users: every group creation would be a 400
    (documented, but the success path would go untested) after the group
    service waited for them to register.
    """
    if not _members:
        _members.extend(new_user().user_id for _ in range(3))
    return _members


@schemathesis.auth(refresh_interval=600)
class SharedUser:
    """One user for everything else, made again when its token stops working (a 401)."""

    def get(self, case: Any, context: Any) -> Login:
        return new_user()

    def set(self, case: Any, data: Login, context: Any) -> None:
        _bearer(case, data)
        body = case.body
        if _positive(case) and isinstance(body, dict) and isinstance(body.get("members"), list) and body["members"]:
            pool = member_pool()
            body["members"] = [pool[i % len(pool)] for i in range(min(len(body["members"]), len(pool)))]

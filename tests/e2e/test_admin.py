"""Server administrator actions and account deletion, black-box through Nginx (plus Mongo/Kafka reads)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
from pymongo import MongoClient
from pymongo.database import Database

from helper.stack import Stack
from tests.support import Api, User, new_user, topic_events

ADMIN_USERNAME = "admin"
ADMIN_PASSWORD = "admin-password-for-tests"  # what Stack.for_tests configures


def error_of(r: requests.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    assert r.headers.get("X-Request-Id")
    return err


@pytest.fixture(scope="module")
def chat_db(stack: Stack) -> Iterator[Database[dict[str, Any]]]:
    client: MongoClient[dict[str, Any]] = MongoClient(stack.mongo_url)
    yield client["chat"]
    client.close()


@pytest.fixture
def admin(api: Api) -> Api:
    r = api.post("/v1/auth/login", json={"username": ADMIN_USERNAME, "password": ADMIN_PASSWORD, "device_type": "web"})
    assert r.status_code == 200, r.text
    return Api(api.base_url, r.json()["access_token"])


def login(api: Api, u: User) -> requests.Response:
    return api.post("/v1/auth/login", json={"username": u.username, "password": u.password, "device_type": "web"})


def test_admin_logs_in_with_the_configured_credentials(api: Api, admin: Api) -> None:
    me = admin.get("/v1/me")
    assert me.status_code == 200
    assert me.json()["username"] == ADMIN_USERNAME
    wrong = api.post("/v1/auth/login", json={"username": ADMIN_USERNAME, "password": "not-the-admin-password"})
    error_of(wrong, 401, "unauthorized")


def test_disable_and_enable(stack: Stack, api: Api, admin: Api, chat_db: Database[dict[str, Any]]) -> None:
    victim = new_user(api.base_url)
    second = victim.login_device("web")
    admin_id = admin.get("/v1/me").json()["user_id"]

    r = admin.post(f"/v1/admin/users/{victim.user_id}/disable")
    assert r.status_code == 204, r.text
    error_of(victim.api.get("/v1/me"), 401, "unauthorized")
    error_of(second.api.get("/v1/me"), 401, "unauthorized")
    err = error_of(login(api, victim), 403, "forbidden")
    assert err["message"] == "account disabled"
    error_of(api.post("/v1/auth/refresh", json={"refresh_token": victim.refresh_token}), 401, "unauthorized")
    # A wrong password still reads as a wrong password, not as "disabled".
    wrong = api.post("/v1/auth/login", json={"username": victim.username, "password": "wrong-password"})
    error_of(wrong, 401, "unauthorized")
    # Others still see the profile.
    assert admin.get(f"/v1/users/{victim.username}").status_code == 200

    r = admin.post(f"/v1/admin/users/{victim.user_id}/enable")
    assert r.status_code == 204, r.text
    again = login(api, victim)
    assert again.status_code == 200, again.text
    assert Api(api.base_url, again.json()["access_token"]).get("/v1/me").status_code == 200
    # Old sessions stay dead: enabling does not revive tokens.
    error_of(victim.api.get("/v1/me"), 401, "unauthorized")

    audit = list(chat_db["audit"].find({"target": victim.user_id}, {"_id": 0}))
    assert [a["action"] for a in sorted(audit, key=lambda a: a["ts"])] == ["user.disable", "user.enable"]
    assert all(a["actor"] == admin_id and isinstance(a["ts"], int) for a in audit)

    events = topic_events(
        stack.kafka, "user.events.v1", victim.user_id, lambda evs: any(e["type"] == "user.enabled" for e in evs)
    )
    kinds = [(e["type"], e["payload"].get("device_id")) for e in events]
    start = kinds.index(("user.disabled", None))
    assert set(kinds[start + 1 : start + 3]) == {
        ("device.logged_out", victim.device_id),
        ("device.logged_out", second.device_id),
    }
    assert ("user.enabled", None) in kinds[start + 3 :]


def test_admin_routes_refuse_non_admins(api: Api, user: User) -> None:
    other = new_user(api.base_url)
    error_of(user.api.post(f"/v1/admin/users/{other.user_id}/disable"), 403, "forbidden")
    error_of(user.api.post(f"/v1/admin/users/{other.user_id}/enable"), 403, "forbidden")
    assert other.api.get("/v1/me").status_code == 200


def test_admin_actions_on_unknown_users(admin: Api) -> None:
    error_of(admin.post("/v1/admin/users/no-such-user/disable"), 404, "not_found")
    error_of(admin.post("/v1/admin/users/no-such-user/enable"), 404, "not_found")


def test_an_administrator_cannot_be_disabled(admin: Api) -> None:
    admin_id = admin.get("/v1/me").json()["user_id"]
    error_of(admin.post(f"/v1/admin/users/{admin_id}/disable"), 403, "forbidden")
    assert admin.get("/v1/me").status_code == 200


def test_account_deletion(stack: Stack, api: Api, chat_db: Database[dict[str, Any]]) -> None:
    victim = new_user(api.base_url)
    web = victim.login_device("web")
    friend = new_user(api.base_url)

    error_of(victim.api.delete("/v1/me", json={"password": "not-my-password"}), 401, "unauthorized")
    error_of(victim.api.delete("/v1/me", json={}), 400, "invalid_request")
    error_of(victim.api.delete("/v1/me", json={"password": 5}), 400, "invalid_request")
    assert victim.api.get("/v1/me").status_code == 200  # nothing happened yet

    r = victim.api.delete("/v1/me", json={"password": victim.password})
    assert r.status_code == 204, r.text
    # Every device logged out at once.
    error_of(victim.api.get("/v1/me"), 401, "unauthorized")
    error_of(web.api.get("/v1/me"), 401, "unauthorized")
    error_of(api.post("/v1/auth/refresh", json={"refresh_token": web.refresh_token}), 401, "unauthorized")
    error_of(login(api, victim), 401, "unauthorized")
    # Shown as deleted; the username stays reserved during the grace period.
    error_of(friend.api.get(f"/v1/users/{victim.username}"), 404, "not_found")
    sync = friend.api.post("/v1/contacts/sync", json={"usernames": [victim.username, friend.username]})
    assert [c["user_id"] for c in sync.json()["contacts"]] == [friend.user_id]
    err = error_of(
        api.post("/v1/auth/signup", json={"username": victim.username, "password": "another password"}), 409, "conflict"
    )
    assert err["details"]["field"] == "username"
    error_of(friend.api.patch("/v1/me", json={"username": victim.username}), 409, "conflict")

    doc = chat_db["users"].find_one({"_id": victim.user_id})
    assert doc is not None and doc["state"] == "deleted"
    assert doc["username_free_at"] - doc["deleted_ts"] == 7 * 24 * 3600 * 1000
    assert "password_hash" not in doc

    events = topic_events(
        stack.kafka, "user.events.v1", victim.user_id, lambda evs: any(e["type"] == "user.unregistered" for e in evs)
    )
    tail = [(e["type"], e["payload"].get("device_id")) for e in events[-3:]]
    assert set(tail[:2]) == {("device.logged_out", victim.device_id), ("device.logged_out", web.device_id)}
    assert tail[2] == ("user.unregistered", None)


def test_deleted_users_name_is_free_after_the_grace_period(api: Api, chat_db: Database[dict[str, Any]]) -> None:
    victim = new_user(api.base_url)
    assert victim.api.delete("/v1/me", json={"password": victim.password}).status_code == 204
    # Let the grace period end (the stack runs with the default 7 days).
    chat_db["users"].update_one({"_id": victim.user_id}, {"$set": {"username_free_at": 0}})
    r = api.post("/v1/auth/signup", json={"username": victim.username, "password": "a new password"})
    assert r.status_code == 201, r.text
    assert r.json()["user_id"] != victim.user_id
    newcomer = api.post("/v1/auth/login", json={"username": victim.username, "password": "a new password"})
    assert newcomer.status_code == 200
    assert newcomer.json()["user_id"] == r.json()["user_id"]
    # The old account keeps its record under its former name.
    old = chat_db["users"].find_one({"_id": victim.user_id})
    assert old is not None and old["former_username"] == victim.username and old["state"] == "deleted"


def test_admin_can_not_act_on_deleted_users(api: Api, admin: Api) -> None:
    victim = new_user(api.base_url)
    assert victim.api.delete("/v1/me", json={"password": victim.password}).status_code == 204
    error_of(admin.post(f"/v1/admin/users/{victim.user_id}/disable"), 404, "not_found")
    error_of(admin.post(f"/v1/admin/users/{victim.user_id}/enable"), 404, "not_found")

"""Accounts, tokens, profiles, contacts and devices, black-box through Nginx."""

from __future__ import annotations

import base64
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jwt
import pytest
import requests
import websocket

from helper.stack import Stack
from tests.support import Api, User, new_user, topic_events, unique_name

PASSWORD = "correct horse battery"


def error_of(r: requests.Response, status: int, code: str) -> dict[str, Any]:
    """Assert the contract's error shape and return the error object."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert err["code"] == code, body
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["details"], dict)
    assert r.headers.get("X-Request-Id"), "every response carries X-Request-Id"
    return err


def signup(api: Api, username: str | None = None, **extra: Any) -> requests.Response:
    return api.post("/v1/auth/signup", json={"username": username or unique_name(), "password": PASSWORD, **extra})


def login(api: Api, username: str, password: str = PASSWORD, **extra: Any) -> requests.Response:
    return api.post("/v1/auth/login", json={"username": username, "password": password, **extra})


def devices_of(u: User) -> dict[str, dict[str, Any]]:
    r = u.api.get("/v1/me/devices")
    assert r.status_code == 200, r.text
    return {d["device_id"]: d for d in r.json()["devices"]}


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# ---------------------------------------------------------------------------
# signup and login
# ---------------------------------------------------------------------------


def test_signup_and_login_return_the_contract_shapes(api: Api) -> None:
    username = unique_name()
    r = signup(api, username, name="Ada Lovelace")
    assert r.status_code == 201, r.text
    assert r.headers["X-Request-Id"]
    created = r.json()
    assert set(created) == {"user_id", "username", "name"}
    assert created["username"] == username and created["name"] == "Ada Lovelace"

    r = login(api, username, device_type="mobile")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"access_token", "refresh_token", "expires_in", "user_id", "device_id"}
    assert body["user_id"] == created["user_id"]
    assert isinstance(body["expires_in"], int) and body["expires_in"] > 0

    me = Api(api.base_url, body["access_token"]).get("/v1/me")
    assert me.status_code == 200
    assert me.json() == created


def test_signup_without_name_uses_the_username(api: Api) -> None:
    username = unique_name()
    r = signup(api, username)
    assert r.status_code == 201
    assert r.json()["name"] == username


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"username": "ab", "password": PASSWORD}, "username"),
        ({"username": "x" * 33, "password": PASSWORD}, "username"),
        ({"username": "Alice", "password": PASSWORD}, "username"),
        ({"username": "bad name", "password": PASSWORD}, "username"),
        ({"username": "ünïcode", "password": PASSWORD}, "username"),
        ({"username": 12345, "password": PASSWORD}, "username"),
        ({"password": PASSWORD}, "username"),
        ({"username": "valid_name", "password": "short"}, "password"),
        ({"username": "valid_name", "password": "p" * 129}, "password"),
        ({"username": "valid_name"}, "password"),
        ({"username": "valid_name", "password": 12345678}, "password"),
        ({"username": "valid_name", "password": PASSWORD, "name": 5}, "name"),
        ({"username": "valid_name", "password": PASSWORD, "name": "n" * 65}, "name"),
    ],
)
def test_signup_validation(api: Api, body: dict[str, Any], field: str) -> None:
    err = error_of(api.post("/v1/auth/signup", json=body), 400, "invalid_request")
    assert err["details"]["field"] == field


def test_username_and_password_limits_are_inclusive(api: Api) -> None:
    r = api.post("/v1/auth/signup", json={"username": uuid.uuid4().hex[:3], "password": "p" * 8})
    assert r.status_code == 201, r.text
    long_name = "z_-." + uuid.uuid4().hex[:28]
    r = api.post("/v1/auth/signup", json={"username": long_name, "password": "p" * 128})
    assert r.status_code == 201, r.text
    assert login(api, long_name, "p" * 128).status_code == 200


def test_signup_conflict(api: Api) -> None:
    username = unique_name()
    assert signup(api, username).status_code == 201
    err = error_of(signup(api, username), 409, "conflict")
    assert err["details"]["field"] == "username"


@pytest.mark.parametrize("raw", ["{not json", "[1, 2]", "", "null", '"a string"'])
def test_bodies_that_are_not_a_json_object_are_invalid(api: Api, raw: str) -> None:
    for path in ("/v1/auth/signup", "/v1/auth/login", "/v1/auth/refresh"):
        r = api.post(path, data=raw, headers={"Content-Type": "application/json"})
        error_of(r, 400, "invalid_request")


def test_wrong_password_and_unknown_user_read_the_same(api: Api, user: User) -> None:
    wrong = error_of(login(api, user.username, "not the password"), 401, "unauthorized")
    unknown = error_of(login(api, unique_name(), PASSWORD), 401, "unauthorized")
    malformed = error_of(login(api, "NO SUCH USER", PASSWORD), 401, "unauthorized")
    assert wrong["message"] == unknown["message"] == malformed["message"]


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"device_type": "desktop"}, "device_type"),
        ({"device_id": 5}, "device_id"),
        ({"push_token": ""}, "push_token"),
        ({"push_token": 7}, "push_token"),
    ],
)
def test_login_validation(api: Api, user: User, extra: dict[str, Any], field: str) -> None:
    err = error_of(login(api, user.username, **extra), 400, "invalid_request")
    assert err["details"]["field"] == field


def test_login_with_missing_fields_is_invalid(api: Api) -> None:
    error_of(api.post("/v1/auth/login", json={"username": "someone"}), 400, "invalid_request")
    error_of(api.post("/v1/auth/login", json={"password": PASSWORD}), 400, "invalid_request")


def test_login_reuses_the_callers_own_device(api: Api, user: User) -> None:
    r = login(api, user.username, device_id=user.device_id)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["device_id"] == user.device_id
    listed = Api(api.base_url, body["access_token"]).get("/v1/me/devices").json()["devices"]
    assert [d["device_id"] for d in listed] == [user.device_id]
    # The new session replaced the old one on that device.
    error_of(user.api.get("/v1/me"), 401, "unauthorized")
    assert Api(api.base_url, body["access_token"]).get("/v1/me").status_code == 200


def test_login_refuses_unknown_or_foreign_device_ids(api: Api, user: User) -> None:
    other = new_user(api.base_url)
    foreign = error_of(login(api, user.username, device_id=other.device_id), 400, "invalid_request")
    unknown = error_of(login(api, user.username, device_id="nosuchdevice"), 400, "invalid_request")
    assert foreign["details"]["field"] == unknown["details"]["field"] == "device_id"
    assert foreign["message"] == unknown["message"]
    # The other user's device was not touched.
    assert other.api.get("/v1/me").status_code == 200


def test_first_mobile_device_is_primary(api: Api) -> None:
    username = unique_name()
    assert signup(api, username).status_code == 201
    web = login(api, username, device_type="web").json()
    mobile = login(api, username, device_type="mobile").json()
    mobile2 = login(api, username, device_type="mobile").json()
    default = login(api, username).json()
    listed = {d["device_id"]: d for d in Api(api.base_url, web["access_token"]).get("/v1/me/devices").json()["devices"]}
    assert listed[web["device_id"]]["primary"] is False
    assert listed[web["device_id"]]["device_type"] == "web"
    assert listed[mobile["device_id"]]["primary"] is True
    assert listed[mobile2["device_id"]]["primary"] is False
    assert listed[default["device_id"]]["device_type"] == "mobile"
    assert sum(d["primary"] for d in listed.values()) == 1
    for d in listed.values():
        assert set(d) >= {"device_id", "device_type", "primary", "online", "last_seen"}
        assert d["online"] is False


# ---------------------------------------------------------------------------
# refresh, logout, the token gate
# ---------------------------------------------------------------------------


def test_refresh_rotates_and_the_old_token_stops_working(api: Api, user: User) -> None:
    r = api.post("/v1/auth/refresh", json={"refresh_token": user.refresh_token})
    assert r.status_code == 200, r.text
    fresh = r.json()
    assert set(fresh) == {"access_token", "refresh_token", "expires_in", "user_id", "device_id"}
    assert fresh["device_id"] == user.device_id and fresh["user_id"] == user.user_id
    assert fresh["refresh_token"] != user.refresh_token
    assert Api(api.base_url, fresh["access_token"]).get("/v1/me").status_code == 200
    # Rotation again with the new token works.
    r2 = api.post("/v1/auth/refresh", json={"refresh_token": fresh["refresh_token"]})
    assert r2.status_code == 200, r2.text


def test_refresh_token_reuse_logs_the_device_out(api: Api, user: User) -> None:
    other_device = user.login_device("web")
    fresh = api.post("/v1/auth/refresh", json={"refresh_token": user.refresh_token}).json()
    newest_access = fresh["access_token"]
    assert Api(api.base_url, newest_access).get("/v1/me").status_code == 200

    # The used token comes back (a stolen copy): the whole family is revoked.
    error_of(api.post("/v1/auth/refresh", json={"refresh_token": user.refresh_token}), 401, "unauthorized")
    error_of(Api(api.base_url, newest_access).get("/v1/me"), 401, "unauthorized")
    error_of(api.post("/v1/auth/refresh", json={"refresh_token": fresh["refresh_token"]}), 401, "unauthorized")
    # Only that device: the account's other device keeps working.
    assert other_device.api.get("/v1/me").status_code == 200
    # The device may log in again with its id.
    again = login(api, user.username, device_id=user.device_id)
    assert again.status_code == 200
    assert Api(api.base_url, again.json()["access_token"]).get("/v1/me").status_code == 200


def test_concurrent_uses_of_one_refresh_token_rotate_at_most_once(api: Api, user: User) -> None:
    """The store's conditional update decides the race: never two live families from one token."""

    def use(_: int) -> requests.Response:
        return requests.post(f"{api.base_url}/v1/auth/refresh", json={"refresh_token": user.refresh_token}, timeout=10)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(use, range(8)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] + [401] * 7, codes
    for r in answers:
        if r.status_code == 401:
            error_of(r, 401, "unauthorized")
    # The other uses were reuse: the device is logged out, so what the winner got no longer works.
    won = next(r.json() for r in answers if r.status_code == 200)
    error_of(Api(api.base_url, won["access_token"]).get("/v1/me"), 401, "unauthorized")
    error_of(api.post("/v1/auth/refresh", json={"refresh_token": won["refresh_token"]}), 401, "unauthorized")


def test_refresh_errors(api: Api) -> None:
    error_of(api.post("/v1/auth/refresh", json={}), 400, "invalid_request")
    error_of(api.post("/v1/auth/refresh", json={"refresh_token": 5}), 400, "invalid_request")
    error_of(api.post("/v1/auth/refresh", json={"refresh_token": "made-up"}), 401, "unauthorized")


def test_logout_kills_the_devices_tokens_at_once(api: Api, user: User) -> None:
    other_device = user.login_device("web")
    assert user.api.get("/v1/me").status_code == 200
    r = user.api.post("/v1/auth/logout")
    assert r.status_code == 204, r.text
    assert r.headers["X-Request-Id"]
    error_of(user.api.get("/v1/me"), 401, "unauthorized")
    error_of(user.api.post("/v1/auth/logout"), 401, "unauthorized")
    error_of(api.post("/v1/auth/refresh", json={"refresh_token": user.refresh_token}), 401, "unauthorized")
    assert other_device.api.get("/v1/me").status_code == 200
    # A logged-out device is still the account's device (it may log in again).
    assert user.device_id in devices_of(other_device)
    assert devices_of(other_device)[user.device_id]["logged_in"] is False


def test_every_protected_route_needs_a_token(api: Api) -> None:
    for method, path in [
        ("POST", "/v1/auth/logout"),
        ("GET", "/v1/me"),
        ("PATCH", "/v1/me"),
        ("DELETE", "/v1/me"),
        ("GET", "/v1/users/someone"),
        ("POST", "/v1/contacts/sync"),
        ("GET", "/v1/me/devices"),
        ("PUT", "/v1/me/devices/x/push-token"),
        ("DELETE", "/v1/me/devices/x"),
        ("POST", "/v1/admin/users/x/disable"),
        ("POST", "/v1/admin/users/x/enable"),
    ]:
        error_of(api.request(method, path, json={}), 401, "unauthorized")


def test_spoofed_identity_headers_are_ignored(api: Api, user: User) -> None:
    victim = new_user(api.base_url)
    spoof = {
        "X-User-Id": victim.user_id,
        "X-Device-Id": victim.device_id,
        "X-User-Admin": "1",
        "X-Auth-User": victim.user_id,
        "X-Auth-Device": victim.device_id,
        "X-Auth-Admin": "1",
        "X-Device-Primary": "1",
    }
    r = user.api.get("/v1/me", headers=spoof)
    assert r.status_code == 200
    assert r.json()["user_id"] == user.user_id
    # Without a token the headers alone get nothing.
    error_of(api.get("/v1/me", headers=spoof), 401, "unauthorized")
    # Nor do they make a user a server administrator.
    error_of(user.api.post(f"/v1/admin/users/{victim.user_id}/disable", headers=spoof), 403, "forbidden")
    assert victim.api.get("/v1/me").status_code == 200


def test_forged_and_expired_tokens_are_refused(stack: Stack, api: Api, user: User) -> None:
    claims = jwt.decode(user.access_token, options={"verify_signature": False})
    assert {"sub", "did", "iat", "exp", "jti"} <= set(claims)
    assert claims["sub"] == user.user_id and claims["did"] == user.device_id

    alg_none = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."
    other_key = jwt.encode(claims, "another-key-of-at-least-32-bytes-long!", algorithm="HS256")
    key = stack.env["PROFILE_JWT_SECRET"]
    now = int(time.time())
    expired = jwt.encode({**claims, "iat": now - 3600, "exp": now - 60}, key, algorithm="HS256")
    hs512 = jwt.encode(claims, key + key, algorithm="HS512")
    wrong_session = jwt.encode({**claims, "sid": "not-the-session"}, key, algorithm="HS256")
    wrong_user = jwt.encode({**claims, "sub": "someone-else"}, key, algorithm="HS256")
    tampered = user.access_token[:-4] + ("AAAA" if not user.access_token.endswith("AAAA") else "BBBB")
    for token in (alg_none, other_key, expired, hs512, wrong_session, wrong_user, tampered, "garbage", "a.b.c"):
        error_of(Api(api.base_url, token).get("/v1/me"), 401, "unauthorized")
    error_of(api.get("/v1/me", headers={"Authorization": f"Basic {user.access_token}"}), 401, "unauthorized")
    # A correctly signed token for the live session passes (the same checks, not a blanket refusal).
    good = jwt.encode({**claims, "iat": now, "exp": now + 60}, key, algorithm="HS256")
    assert Api(api.base_url, good).get("/v1/me").status_code == 200


def _ws_status(url: str, headers: dict[str, str] | None = None) -> int:
    """Status of a WebSocket upgrade attempt (101 when a gateway accepts it)."""
    try:
        ws = websocket.create_connection(url, header=headers or {}, timeout=10)
    except websocket.WebSocketBadStatusException as exc:
        return int(exc.status_code)
    ws.close()
    return 101


def test_query_token_works_on_the_websocket_only(stack: Stack, api: Api, user: User) -> None:
    bad = _ws_status(f"{stack.ws_url}?token=garbage")
    assert bad == 401
    assert _ws_status(stack.ws_url) == 401
    good = _ws_status(f"{stack.ws_url}?token={user.access_token}")
    if "gateway-1" in stack.procs:
        assert good == 101
    else:
        # No gateway yet: auth let the upgrade through, and nginx found no upstream.
        assert good not in (401, 403), good
    # The header form on a profile route reaches the same verdict.
    assert user.api.get("/v1/me").status_code == 200
    # A token in the query string of a REST route is not accepted (it would end up in logs).
    error_of(api.get(f"/v1/me?token={user.access_token}"), 401, "unauthorized")


# ---------------------------------------------------------------------------
# profiles and contacts
# ---------------------------------------------------------------------------


def test_get_and_patch_me(api: Api, user: User) -> None:
    r = user.api.patch("/v1/me", json={"name": "New Name"})
    assert r.status_code == 200, r.text
    assert r.json() == {"user_id": user.user_id, "username": user.username, "name": "New Name"}

    new_username = unique_name()
    r = user.api.patch("/v1/me", json={"username": new_username})
    assert r.status_code == 200
    assert r.json()["username"] == new_username
    assert user.api.get("/v1/me").json() == {"user_id": user.user_id, "username": new_username, "name": "New Name"}
    # The old name is free again, the new one resolves.
    viewer = new_user(api.base_url)
    error_of(viewer.api.get(f"/v1/users/{user.username}"), 404, "not_found")
    assert viewer.api.get(f"/v1/users/{new_username}").json()["user_id"] == user.user_id
    assert login(api, new_username, device_id=user.device_id).status_code == 200


def test_patch_me_errors(api: Api, user: User) -> None:
    taken = new_user(api.base_url)
    err = error_of(user.api.patch("/v1/me", json={"username": taken.username}), 409, "conflict")
    assert err["details"]["field"] == "username"
    for body, field in [
        ({"username": "NOPE"}, "username"),
        ({"username": 3}, "username"),
        ({"name": "n" * 65}, "name"),
        ({"name": ["x"]}, "name"),
        ({}, "name"),
    ]:
        assert error_of(user.api.patch("/v1/me", json=body), 400, "invalid_request")["details"]["field"] == field
    error_of(user.api.patch("/v1/me", data="{", headers={"Content-Type": "application/json"}), 400, "invalid_request")
    # Renaming to one's own name is not a conflict.
    assert user.api.patch("/v1/me", json={"username": user.username}).status_code == 200


def test_get_user_by_username(api: Api, user: User) -> None:
    other = new_user(api.base_url, name="Grace Hopper")
    r = user.api.get(f"/v1/users/{other.username}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["user_id"] == other.user_id
    assert body["username"] == other.username and body["name"] == "Grace Hopper"
    assert body["online"] is False
    assert body["last_seen"] is None  # never connected
    assert set(body) == {"user_id", "username", "name", "online", "last_seen"}
    error_of(user.api.get(f"/v1/users/{unique_name()}"), 404, "not_found")
    error_of(user.api.get("/v1/users/Not%20A%20Name"), 404, "not_found")


def test_contacts_sync(api: Api, user: User) -> None:
    a = new_user(api.base_url, name="A")
    b = new_user(api.base_url, name="B")
    names = [a.username, unique_name(), b.username, "INVALID NAME", a.username]
    r = user.api.post("/v1/contacts/sync", json={"usernames": names})
    assert r.status_code == 200, r.text
    contacts = sorted(r.json()["contacts"], key=lambda c: c["name"])
    assert contacts == [
        {"user_id": a.user_id, "username": a.username, "name": "A"},
        {"user_id": b.user_id, "username": b.username, "name": "B"},
    ]
    # 1000 is the limit, inclusive.
    many = [unique_name() for _ in range(999)] + [a.username]
    r = user.api.post("/v1/contacts/sync", json={"usernames": many})
    assert r.status_code == 200
    assert [c["user_id"] for c in r.json()["contacts"]] == [a.user_id]
    assert user.api.post("/v1/contacts/sync", json={"usernames": []}).json() == {"contacts": []}


def test_contacts_sync_errors(user: User) -> None:
    too_many = [f"user{i}" for i in range(1001)]
    for body in ({"usernames": too_many}, {"usernames": "alice"}, {"usernames": [1, 2]}, {}):
        err = error_of(user.api.post("/v1/contacts/sync", json=body), 400, "invalid_request")
        assert err["details"]["field"] == "usernames"


# ---------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------


def test_push_token_on_own_devices_only(stack: Stack, api: Api, user: User) -> None:
    web = user.login_device("web")
    r = web.api.put(f"/v1/me/devices/{user.device_id}/push-token", json={"push_token": "fcm-token-1"})
    assert r.status_code == 204, r.text
    r = user.api.put(f"/v1/me/devices/{user.device_id}/push-token", json={"push_token": "fcm-token-2"})
    assert r.status_code == 204
    other = new_user(api.base_url)
    error_of(user.api.put(f"/v1/me/devices/{other.device_id}/push-token", json={"push_token": "x"}), 404, "not_found")
    error_of(user.api.put("/v1/me/devices/nosuchdevice/push-token", json={"push_token": "x"}), 404, "not_found")
    for body in ({}, {"push_token": ""}, {"push_token": 12}, {"push_token": "t" * 4097}):
        err = error_of(user.api.put(f"/v1/me/devices/{user.device_id}/push-token", json=body), 400, "invalid_request")
        assert err["details"]["field"] == "push_token"
    events = topic_events(
        stack.kafka,
        "user.events.v1",
        user.user_id,
        lambda evs: sum(e["type"] == "device.push_token" for e in evs) >= 2,
    )
    tokens = [e["payload"]["push_token"] for e in events if e["type"] == "device.push_token"]
    assert tokens == ["fcm-token-1", "fcm-token-2"]


def test_login_with_push_token(stack: Stack, api: Api, user: User) -> None:
    r = login(api, user.username, device_type="web", push_token="fcm-at-login")
    assert r.status_code == 200
    did = r.json()["device_id"]
    events = topic_events(
        stack.kafka, "user.events.v1", user.user_id, lambda evs: any(e["type"] == "device.push_token" for e in evs)
    )
    push = [e["payload"] for e in events if e["type"] == "device.push_token"]
    assert push == [{"user_id": user.user_id, "device_id": did, "push_token": "fcm-at-login"}]


def test_device_removal_rules(api: Api, user: User) -> None:
    # user's first device is mobile: the primary one.
    web1 = user.login_device("web")
    web2 = user.login_device("web")
    web3 = user.login_device("web")
    assert devices_of(user)[user.device_id]["primary"] is True

    # A secondary device may not remove the primary.
    error_of(web1.api.delete(f"/v1/me/devices/{user.device_id}"), 403, "forbidden")
    # ...but another secondary one, yes.
    assert web1.api.delete(f"/v1/me/devices/{web2.device_id}").status_code == 204
    error_of(web2.api.get("/v1/me"), 401, "unauthorized")
    # The primary may remove any device.
    r = user.api.delete(f"/v1/me/devices/{web1.device_id}")
    assert r.status_code == 204
    error_of(web1.api.get("/v1/me"), 401, "unauthorized")
    error_of(api.post("/v1/auth/refresh", json={"refresh_token": web1.refresh_token}), 401, "unauthorized")
    # A device may remove itself.
    assert web3.api.delete(f"/v1/me/devices/{web3.device_id}").status_code == 204
    error_of(web3.api.get("/v1/me"), 401, "unauthorized")

    remaining = devices_of(user)
    assert set(remaining) == {user.device_id}
    # Removed devices are gone for good: no login with their id, no second removal.
    error_of(login(api, user.username, device_id=web1.device_id), 400, "invalid_request")
    error_of(user.api.delete(f"/v1/me/devices/{web1.device_id}"), 404, "not_found")
    other = new_user(api.base_url)
    error_of(user.api.delete(f"/v1/me/devices/{other.device_id}"), 404, "not_found")
    assert other.api.get("/v1/me").status_code == 200


def test_removing_the_primary_lets_the_next_mobile_device_be_primary(api: Api, user: User) -> None:
    assert user.api.delete(f"/v1/me/devices/{user.device_id}").status_code == 204
    web = user.login_device("web")
    mobile = user.login_device("mobile")
    listed = devices_of(web)
    assert listed[mobile.device_id]["primary"] is True
    assert listed[web.device_id]["primary"] is False


# ---------------------------------------------------------------------------
# limits, unknown routes, request ids, events
# ---------------------------------------------------------------------------


def test_payload_too_large(api: Api, user: User) -> None:
    # Above Nginx's limit (256 KiB) and above the profile service's own (64 KiB).
    for size in (300 * 1024, 100 * 1024):
        body = json.dumps({"usernames": ["x" * 30] * (size // 34)})
        assert len(body) > size - 1024
        r = user.api.post("/v1/contacts/sync", data=body, headers={"Content-Type": "application/json"})
        error_of(r, 413, "payload_too_large")
    r = api.post("/v1/auth/signup", data="{" + " " * (100 * 1024) + "}", headers={"Content-Type": "application/json"})
    error_of(r, 413, "payload_too_large")


def test_unknown_routes_and_methods(api: Api, user: User) -> None:
    error_of(user.api.get("/v1/nothing-here"), 404, "not_found")
    error_of(user.api.get("/v1/me/nothing-here"), 404, "not_found")
    error_of(api.get("/internal/auth", headers={"Authorization": f"Bearer {user.access_token}"}), 404, "not_found")
    error_of(api.get("/v1/auth/signup"), 405, "method_not_allowed")


def test_request_id_on_every_response(api: Api, user: User) -> None:
    responses = [
        signup(api),  # 201
        user.api.get("/v1/me"),  # 200
        user.api.put(f"/v1/me/devices/{user.device_id}/push-token", json={"push_token": "t"}),  # 204
        api.post("/v1/auth/signup", json={}),  # 400 from the service
        api.get("/v1/me"),  # 401 from nginx
        user.api.get("/v1/users/nobody-here"),  # 404
        signup(api, user.username),  # 409
    ]
    ids = [r.headers.get("X-Request-Id") for r in responses]
    assert all(ids), ids
    assert len(set(ids)) == len(ids)


def test_account_events_are_produced(stack: Stack, api: Api) -> None:
    u = new_user(api.base_url)
    web = u.login_device("web")
    assert web.api.post("/v1/auth/logout").status_code == 204
    assert u.api.patch("/v1/me", json={"name": "Renamed"}).status_code == 200
    wanted = ["user.registered", "device.registered", "device.registered", "device.logged_out", "user.updated"]
    events = topic_events(stack.kafka, "user.events.v1", u.user_id, lambda evs: len(evs) >= len(wanted))
    assert [e["type"] for e in events] == wanted
    assert events[0]["payload"] == {"user_id": u.user_id, "username": u.username, "name": u.name}
    assert events[1]["payload"] == {
        "user_id": u.user_id,
        "device_id": u.device_id,
        "device_type": "mobile",
        "primary": True,
    }
    assert events[2]["payload"]["primary"] is False
    assert events[3]["payload"] == {"user_id": u.user_id, "device_id": web.device_id}
    assert events[4]["payload"]["name"] == "Renamed"
    assert all(e["producer"] == "profile" for e in events)


def test_device_removal_and_refresh_reuse_events(stack: Stack, api: Api, user: User) -> None:
    web = user.login_device("web")
    assert user.api.delete(f"/v1/me/devices/{web.device_id}").status_code == 204
    assert api.post("/v1/auth/refresh", json={"refresh_token": user.refresh_token}).status_code == 200
    assert api.post("/v1/auth/refresh", json={"refresh_token": user.refresh_token}).status_code == 401
    events = topic_events(
        stack.kafka,
        "user.events.v1",
        user.user_id,
        lambda evs: any(e["type"] == "device.logged_out" for e in evs),
    )
    tail = [(e["type"], e["payload"].get("device_id")) for e in events[-2:]]
    assert tail == [("device.removed", web.device_id), ("device.logged_out", user.device_id)]

"""The HTTP adapters through Flask's test client on fake dependencies (no servers)."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

from services.profile.service import ProfileService

from .fakes import make_service

PW = "correct horse battery"


@pytest.fixture
def svc() -> ProfileService:
    return make_service(admin_username="root", admin_password="root-password")


@pytest.fixture
def client(svc: ProfileService) -> FlaskClient:
    return svc.create_app().test_client()


def error(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    assert resp.headers["X-Request-Id"]
    return dict(body["error"])


def signed_in(client: FlaskClient, username: str = "alice", password: str = PW) -> dict[str, str]:
    """Sign up (if needed), log in, and return the headers Nginx would set from /internal/auth."""
    client.post("/v1/auth/signup", json={"username": username, "password": password})
    tokens = client.post("/v1/auth/login", json={"username": username, "password": password}).get_json()
    gate = client.get("/internal/auth", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert gate.status_code == 200
    return {
        "X-User-Id": gate.headers["X-Auth-User"],
        "X-Device-Id": gate.headers["X-Auth-Device"],
        "X-User-Admin": gate.headers["X-Auth-Admin"],
        "X-Device-Type": gate.headers["X-Auth-Device-Type"],
        "X-Device-Primary": gate.headers["X-Auth-Primary"],
    }


def test_signup_login_and_the_gate(client: FlaskClient) -> None:
    r = client.post("/v1/auth/signup", json={"username": "alice", "password": PW, "name": "Alice"})
    assert r.status_code == 201
    assert set(r.get_json()) == {"user_id", "username", "name"}
    tokens = client.post("/v1/auth/login", json={"username": "alice", "password": PW}).get_json()
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        gate = client.open(
            "/internal/auth", method=method, headers={"Authorization": f"Bearer {tokens['access_token']}"}
        )
        assert gate.status_code == 200, method
        assert gate.headers["X-Auth-User"] == tokens["user_id"]
        assert gate.headers["X-Auth-Device"] == tokens["device_id"]
        assert gate.headers["X-Auth-Admin"] == "0"
        assert gate.headers["X-Auth-Device-Type"] == "mobile"
        assert gate.headers["X-Auth-Primary"] == "1"
    error(client.get("/internal/auth"), 401, "unauthorized")
    gate = client.get("/internal/auth", headers={"Authorization": "Bearer nope", "X-Auth-User": tokens["user_id"]})
    error(gate, 401, "unauthorized")
    assert "X-Auth-User" not in gate.headers


def test_admin_flag_in_the_gate(client: FlaskClient) -> None:
    assert signed_in(client, "root", "root-password")["X-User-Admin"] == "1"


@pytest.mark.parametrize("raw", ["{", "[]", "", "null", "3"])
def test_non_object_bodies_are_400(client: FlaskClient, raw: str) -> None:
    for path in ("/v1/auth/signup", "/v1/auth/login", "/v1/auth/refresh"):
        error(client.post(path, data=raw, content_type="application/json"), 400, "invalid_request")


def test_validation_errors_name_the_field(client: FlaskClient) -> None:
    err = error(client.post("/v1/auth/signup", json={"username": "Al", "password": PW}), 400, "invalid_request")
    assert err["details"] == {"field": "username"}
    err = error(client.post("/v1/auth/refresh", json={}), 400, "invalid_request")
    assert err["details"] == {"field": "refresh_token"}


def test_identity_comes_only_from_the_nginx_headers(client: FlaskClient) -> None:
    me = signed_in(client)
    assert client.get("/v1/me", headers=me).get_json()["username"] == "alice"
    # Upstream, X-Auth-* from a client mean nothing; only Nginx's X-User-Id/X-Device-Id count.
    error(client.get("/v1/me", headers={"X-Auth-User": me["X-User-Id"]}), 401, "unauthorized")
    # A user id in the body is ignored.
    r = client.patch("/v1/me", headers=me, json={"name": "A", "user_id": "someone-else"})
    assert r.get_json()["user_id"] == me["X-User-Id"]


def test_admin_routes_need_the_admin_header(client: FlaskClient) -> None:
    me = signed_in(client)
    error(client.post(f"/v1/admin/users/{me['X-User-Id']}/disable", headers=me), 403, "forbidden")
    root = signed_in(client, "root", "root-password")
    assert client.post(f"/v1/admin/users/{me['X-User-Id']}/disable", headers=root).status_code == 204
    assert client.post(f"/v1/admin/users/{me['X-User-Id']}/enable", headers=root).status_code == 204
    error(client.post("/v1/admin/users/nobody/enable", headers=root), 404, "not_found")


def test_body_limit(client: FlaskClient) -> None:
    me = signed_in(client)
    big = '{"usernames": ["' + "a" * (70 * 1024) + '"]}'
    error(
        client.post("/v1/contacts/sync", headers=me, data=big, content_type="application/json"),
        413,
        "payload_too_large",
    )


def test_devices_routes(client: FlaskClient) -> None:
    me = signed_in(client)
    listed = client.get("/v1/me/devices", headers=me).get_json()["devices"]
    assert [d["device_id"] for d in listed] == [me["X-Device-Id"]]
    assert set(listed[0]) >= {"device_id", "device_type", "primary", "online", "last_seen"}
    put = client.put(f"/v1/me/devices/{me['X-Device-Id']}/push-token", headers=me, json={"push_token": "t"})
    assert put.status_code == 204 and put.get_data() == b""
    err = error(
        client.put(f"/v1/me/devices/{me['X-Device-Id']}/push-token", headers=me, json={}), 400, "invalid_request"
    )
    assert err["details"] == {"field": "push_token"}
    error(client.delete("/v1/me/devices/unknown", headers=me), 404, "not_found")
    assert client.delete(f"/v1/me/devices/{me['X-Device-Id']}", headers=me).status_code == 204


def test_delete_me_needs_the_password(client: FlaskClient) -> None:
    me = signed_in(client)
    error(client.delete("/v1/me", headers=me, json={}), 400, "invalid_request")
    error(client.delete("/v1/me", headers=me, json={"password": "wrong password"}), 401, "unauthorized")
    assert client.delete("/v1/me", headers=me, json={"password": PW}).status_code == 204
    error(client.get("/v1/users/alice", headers=me), 404, "not_found")


def test_logout_route(client: FlaskClient) -> None:
    me = signed_in(client)
    assert client.post("/v1/auth/logout", headers=me).status_code == 204
    error(client.post("/v1/auth/logout"), 401, "unauthorized")


def test_a_locked_out_login_is_429_with_retry_after_per_forwarded_address() -> None:
    svc = make_service(login_failures_per_account=100, login_failures_per_address=3, login_lockout_s=30)
    client = svc.create_app().test_client()
    client.post("/v1/auth/signup", json={"username": "alice", "password": PW})
    far = {"X-Forwarded-For": "203.0.113.9"}
    for i in range(3):
        r = client.post("/v1/auth/login", json={"username": f"guess{i}", "password": "wrong password"}, headers=far)
        error(r, 401, "unauthorized")
    r = client.post("/v1/auth/login", json={"username": "alice", "password": PW}, headers=far)
    body = error(r, 429, "rate_limited")
    assert r.headers["Retry-After"] == "30" and body["details"] == {"retry_after_s": 30}
    # Another address (as Nginx forwards it) is not affected.
    r = client.post(
        "/v1/auth/login", json={"username": "alice", "password": PW}, headers={"X-Forwarded-For": "1.2.3.4"}
    )
    assert r.status_code == 200

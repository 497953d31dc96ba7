"""Refusals made before the WebSocket upgrade (plain HTTP answers)."""

from __future__ import annotations

from typing import Any

from services.gateway.service import Gateway, GatewayConfig

UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


class NullPublisher:
    def send(self, *a: Any, **kw: Any) -> None:
        return None


def client(origins: str = "https://chat.example") -> Any:
    gw = Gateway(GatewayConfig(instance_id="gw1", allowed_origins=origins), producer=NullPublisher())
    return gw.create_app().test_client()


def test_no_identity_is_401_before_upgrade() -> None:
    r = client().get("/v1/ws", headers=UPGRADE)
    assert r.status_code == 401
    assert r.get_json()["error"]["code"] == "unauthorized"


def test_user_without_device_is_401() -> None:
    r = client().get("/v1/ws", headers={**UPGRADE, "X-User-Id": "u1"})
    assert r.status_code == 401


def test_foreign_origin_is_403_before_upgrade() -> None:
    headers = {**UPGRADE, "X-User-Id": "u1", "X-Device-Id": "d1", "Origin": "https://evil.example"}
    r = client().get("/v1/ws", headers=headers)
    assert r.status_code == 403
    assert r.get_json()["error"]["code"] == "forbidden"


def test_health_and_metrics_are_served() -> None:
    c = client()
    assert c.get("/healthz").status_code == 200
    body = c.get("/metrics").get_data(as_text=True)
    assert "ws_connections" in body


def test_a_request_that_is_no_upgrade_is_400() -> None:
    headers = {**UPGRADE, "X-User-Id": "u1", "X-Device-Id": "d1", "Sec-WebSocket-Version": "8"}
    r = client().get("/v1/ws", headers=headers)
    assert r.status_code == 400
    assert r.get_json()["error"]["code"] == "invalid_request"


def test_a_full_gateway_refuses_the_upgrade_with_503() -> None:
    gw = Gateway(GatewayConfig(instance_id="gw1", worker_connections=1), producer=NullPublisher())
    gw.hub._conns["c0"] = object()  # type: ignore[assignment]  # one socket held: full
    r = gw.create_app().test_client().get("/v1/ws", headers={**UPGRADE, "X-User-Id": "u1", "X-Device-Id": "d1"})
    assert r.status_code == 503
    assert r.get_json()["error"]["code"] == "unavailable"

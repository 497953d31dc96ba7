"""REQUIRE_PRIMARY_ONLINE=true through Nginx: a secondary (web) device works only while
the user's primary (mobile) device is online.

The shared stack runs with the policy off (the contract's default); this module
restarts both gateway instances with it on, and restores them afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import requests

from helper.stack import Stack
from tests.support import User, WsClient, new_user


def _restart_gateways(stack: Stack, policy: str) -> None:
    stack.env["REQUIRE_PRIMARY_ONLINE"] = policy
    for i in range(1, stack.gateways + 1):
        stack.restart(f"gateway-{i}")


@pytest.fixture(scope="module")
def policy_on(stack: Stack) -> Iterator[Stack]:
    _restart_gateways(stack, "true")
    yield stack
    _restart_gateways(stack, "false")


def _wait_online(stack: Stack, user: User, online: bool) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        body = requests.get(
            f"{stack.base_url}/v1/users/{user.username}",
            headers={"Authorization": f"Bearer {user.access_token}"},
            timeout=5,
        ).json()
        if body["online"] is online:
            return
        time.sleep(0.1)
    raise AssertionError(f"{user.username} never became online={online}")


def _refused(ws: WsClient) -> dict:
    frame = ws.expect("error", timeout=10)
    assert ws.closed.wait(10), "a refused secondary socket must be closed"
    return frame


def test_secondary_refused_while_primary_offline_then_works_then_closed(policy_on: Stack) -> None:
    primary = new_user(policy_on.base_url, device_type="mobile")
    secondary = primary.login_device("web")

    # Primary offline: the web device's socket gets a clear error, then the close.
    refused = _refused(secondary.connect())
    assert refused["code"] == "forbidden"
    assert "primary" in refused["message"]

    # Primary online: the web device works on its own socket.
    phone = primary.connect()
    phone.send({"type": "ping"})
    phone.expect("pong")
    _wait_online(policy_on, primary, True)
    web = secondary.connect()
    web.send({"type": "ping"})
    web.expect("pong")

    # Primary goes offline: the web device's socket is closed, error frame first.
    phone.close()
    closed = _refused(web)
    assert closed["code"] == "forbidden"


def test_primary_device_is_never_refused(policy_on: Stack) -> None:
    primary = new_user(policy_on.base_url, device_type="mobile")
    ws = primary.connect()
    ws.send({"type": "ping"})
    assert ws.expect("pong")["type"] == "pong"
    assert not ws.closed.is_set()

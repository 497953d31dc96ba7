"""The WebSocket gateway, black-box through Nginx: upgrade checks, frames, errors, closes, balancing."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import websocket
from chatlib.topics import SESSION_EVENTS

from helper.stack import Stack
from tests.support import User, WsClient, new_user, topic_events


@pytest.fixture
def me(user: User) -> Iterator[User]:
    """The ``user`` fixture, its sockets closed after the test."""
    yield user
    for ws in user.sockets:
        ws.close()


def upgrade_status(url: str, headers: list[str] | None = None) -> int:
    """HTTP status of a WebSocket upgrade attempt (101 when accepted)."""
    try:
        ws = websocket.create_connection(url, header=headers or [], timeout=10)
    except websocket.WebSocketBadStatusException as exc:
        return int(exc.status_code)
    ws.close()
    return 101


def ws_gauge(stack: Stack, instance: int) -> float:
    """ws_connections of one gateway instance, read from its own /metrics."""
    text = requests.get(f"http://127.0.0.1:{stack.ports[f'gateway-{instance}']}/metrics", timeout=5).text
    match = re.search(r"^ws_connections (\S+)$", text, re.M)
    assert match, "ws_connections gauge missing"
    return float(match.group(1))


def pinged(ws: WsClient) -> None:
    ws.send({"type": "ping"})
    ws.expect("pong")


# -- the upgrade ---------------------------------------------------------------


def test_socket_with_authorization_header_answers_ping(me: User) -> None:
    pinged(me.connect())


def test_socket_with_query_token_answers_ping(me: User) -> None:
    pinged(me.connect(via_query=True))


def test_missing_or_invalid_token_is_refused_at_upgrade(stack: Stack, me: User) -> None:
    assert upgrade_status(stack.ws_url) == 401
    assert upgrade_status(stack.ws_url, ["Authorization: Bearer not-a-token"]) == 401
    assert upgrade_status(f"{stack.ws_url}?token=not-a-token") == 401
    # Identity headers sent by the client are not trusted.
    assert upgrade_status(stack.ws_url, [f"X-User-Id: {me.user_id}", f"X-Device-Id: {me.device_id}"]) == 401


def test_a_browser_socket_from_the_sites_own_page_is_accepted_and_a_foreign_one_refused(stack: Stack, me: User) -> None:
    # The stack's defaults: no origin listed beyond the site's own (which sits on a free port).
    pinged(me.connect(origin=stack.base_url))
    pinged(me.connect(suppress_origin=True))  # a mobile app sends no Origin
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        me.connect(origin="https://evil.example")
    assert refused.value.status_code == 403
    body = json.loads(refused.value.resp_body or b"{}")
    assert body["error"]["code"] == "forbidden"


# -- frames ------------------------------------------------------------------------


def test_bad_frames_get_error_frames_and_the_socket_keeps_working(me: User) -> None:
    ws = me.connect()
    ws.send("this is not json")
    assert ws.expect("error")["code"] == "invalid_request"
    ws.send({"type": "dance"})
    assert ws.expect("error")["code"] == "invalid_request"
    ws.send({"type": "message", "id": "m-missing-body", "to": "someone"})
    err = ws.expect("error")
    assert err["code"] == "invalid_request" and err["ref"] == "m-missing-body"
    ws.send({"type": "receipt", "conversation": "dm:x", "status": "read", "up_to_seq": 1})
    assert ws.expect("error")["code"] == "invalid_request"
    pinged(ws)


def test_over_size_body_is_payload_too_large_with_ref(me: User) -> None:
    ws = me.connect()
    ws.send({"type": "message", "id": "big-1", "to": "someone", "body": "x" * (16 * 1024 + 1)})
    err = ws.expect("error")
    assert err["code"] == "payload_too_large" and err["ref"] == "big-1"
    pinged(ws)


def test_over_size_frame_is_payload_too_large(me: User) -> None:
    ws = me.connect()
    ws.send(json.dumps({"type": "ping", "padding": "y" * (64 * 1024)}))
    assert ws.expect("error")["code"] == "payload_too_large"
    pinged(ws)


def test_receipt_and_typing_for_a_foreign_dm_are_forbidden(me: User) -> None:
    ws = me.connect()
    ws.send({"type": "receipt", "conversation": "dm:aaaa:bbbb", "status": "read", "up_to_seq": 1})
    assert ws.expect("error")["code"] == "forbidden"
    ws.send({"type": "typing", "conversation": "dm:aaaa:bbbb", "state": "start"})
    assert ws.expect("error")["code"] == "forbidden"
    pinged(ws)


def test_message_to_oneself_is_refused(me: User) -> None:
    ws = me.connect()
    ws.send({"type": "message", "id": "self-1", "to": me.user_id, "body": "hi me"})
    err = ws.expect("error")
    assert err["code"] == "invalid_request" and err["ref"] == "self-1"


def test_over_the_rate_frames_get_rate_limited_and_the_socket_stays_open(me: User) -> None:
    ws = me.connect()
    sent = 300  # far beyond the burst (twice GATEWAY_RATE_PER_SOCKET, 50/s by default)
    for _ in range(sent):
        ws.send({"type": "ping"})
    pongs = errors = 0
    while pongs + errors < sent:
        f = ws.frames.get(timeout=10)
        if f["type"] == "pong":
            pongs += 1
        else:
            assert f["type"] == "error" and f["code"] == "rate_limited", f
            errors += 1
    assert errors > 0 and pongs > 0
    assert not ws.closed.is_set()
    # Tokens come back with time: the same socket is answered again.
    deadline = time.monotonic() + 5
    while True:
        ws.send({"type": "ping"})
        f = ws.frames.get(timeout=5)
        if f["type"] == "pong":
            break
        assert time.monotonic() < deadline, "socket never answered again"
        time.sleep(0.1)


# -- closes ------------------------------------------------------------------------


def test_logout_closes_that_device_socket_only(stack: Stack, me: User) -> None:
    other_device = me.login_device("web")
    ws = me.connect()
    other = other_device.connect()
    pinged(ws)
    pinged(other)
    r = me.api.post("/v1/auth/logout")
    assert r.status_code == 204, r.text
    err = ws.expect("error")
    assert err["code"] == "unauthorized"
    assert ws.closed.wait(10), "the logged-out device's socket was not closed"
    pinged(other)
    other.close()
    # The logged-out token cannot open a new socket.
    assert upgrade_status(stack.ws_url, [f"Authorization: Bearer {me.access_token}"]) == 401


# -- instances ---------------------------------------------------------------------


def test_both_gateway_instances_hold_sockets(stack: Stack, me: User) -> None:
    # Nginx balances on the fewest active connections: keep opening sockets until both
    # instances hold more than before (sockets other tests left open may skew the start).
    before = {i: ws_gauge(stack, i) for i in (1, 2)}
    after = dict(before)
    for _ in range(60):
        pinged(me.connect())
        after = {i: ws_gauge(stack, i) for i in (1, 2)}
        if after[1] > before[1] and after[2] > before[2]:
            break
    assert after[1] > before[1] and after[2] > before[2], (before, after)


def test_gateways_hold_hundreds_of_sockets_at_once_and_answer_each(stack: Stack, me: User) -> None:
    # One device's token on every socket (a device may hold several): each socket is its own
    # upgrade through Nginx and its own token check, and each must answer its own ping.
    count = 300
    before = sum(ws_gauge(stack, i) for i in (1, 2))
    socks = []
    try:
        for _ in range(count):
            socks.append(
                websocket.create_connection(
                    stack.ws_url, header=[f"Authorization: Bearer {me.access_token}"], timeout=30
                )
            )
        assert sum(ws_gauge(stack, i) for i in (1, 2)) - before == count
        for ws in socks:
            ws.send('{"type":"ping"}')
        for ws in socks:
            while json.loads(ws.recv())["type"] != "pong":  # presence or other frames may come first
                pass
    finally:
        for ws in socks:
            ws.close()


def _nofile(pid: int) -> tuple[int, int]:
    """(soft, hard) open-file limit of a running process, from /proc."""
    with open(f"/proc/{pid}/limits") as f:
        row = next(line for line in f if line.startswith("Max open files"))
    soft, hard = row.split()[3:5]
    return int(soft), int(hard)


def test_services_raise_their_open_file_limit_for_their_connections(stack: Stack) -> None:
    # The gateway asks for GATEWAY_WORKER_CONNECTIONS (20000) + 1024 descriptors, as much as
    # its hard limit allows; every other service at least the 1024 a shell often gives.
    for key, want in (("gateway-1", 21024), ("gateway-2", 21024), ("profile", 2024)):
        pid = stack.procs[key].pid
        assert pid is not None
        soft, hard = _nofile(pid)
        assert soft >= min(want, hard), (key, soft, hard)


def test_presence_seen_through_profile(stack: Stack, me: User) -> None:
    viewer = new_user(stack.base_url)

    def profile() -> dict[str, Any]:
        r = viewer.api.get(f"/v1/users/{me.username}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_for(online: bool) -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while True:
            body = profile()
            if body["online"] is online:
                return body
            assert time.monotonic() < deadline, f"online never became {online}: {body}"
            time.sleep(0.1)

    assert profile()["online"] is False
    ws = me.connect()
    pinged(ws)
    wait_for(True)
    ws.close()
    body = wait_for(False)
    assert isinstance(body["last_seen"], int) and body["last_seen"] > 0


def test_graceful_stop_closes_sockets_with_1001_and_reports_them_offline(stack: Stack, me: User) -> None:
    ws = me.connect()
    pinged(ws)
    session = f"http://127.0.0.1:{stack.ports['session']}/internal/sessions/{me.user_id}"
    deadline = time.monotonic() + 10
    while not (state := requests.get(session, timeout=5).json())["online"]:
        assert time.monotonic() < deadline, state
        time.sleep(0.1)
    instance = int(state["devices"][0]["gateway"].removeprefix("gw"))
    stack.restart(f"gateway-{instance}")  # SIGTERM, then started again
    assert ws.closed.wait(10)
    assert ws.close_reason == "server shutting down"
    # The stopping instance reported the disconnect itself.
    events = topic_events(
        stack.kafka,
        SESSION_EVENTS.name,
        me.user_id,
        lambda evs: any(e["type"] == "session.disconnected" for e in evs),
    )
    (gone,) = [e["payload"] for e in events if e["type"] == "session.disconnected"]
    assert gone["gateway"] == f"gw{instance}" and gone["device_id"] == me.device_id
    deadline = time.monotonic() + 10
    while (state := requests.get(session, timeout=5).json())["online"]:
        assert time.monotonic() < deadline, state
        time.sleep(0.1)
    pinged(me.connect())

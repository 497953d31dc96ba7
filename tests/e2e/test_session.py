"""The session service with the real system: devices online while any socket is open, stale
disconnects, heartbeat reconciliation, silent and killed gateways.

Socket-driven tests go through Nginx as a client would. The state is read from the session
service's internal endpoint (``/internal/sessions/{user_id}``, not exposed by Nginx) and from
the events it publishes. Edge cases no real client can produce on demand (a disconnect that
arrives late, a gateway that never heartbeats) are produced on SESSION_EVENTS directly.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from chatlib.config import SharedConfig
from chatlib.kafka import Publisher
from chatlib.schemas import DeviceConnected, DeviceDisconnected, Event, GatewayHeartbeat, now_ms
from chatlib.topics import PRESENCE, SESSION_CHANGES, SESSION_EVENTS

from helper.stack import Stack
from services.session.service import UPKEEP_PART
from tests.support import User, WsClient, eventually, new_user, topic_events


@pytest.fixture
def me(user: User) -> Iterator[User]:
    yield user
    for ws in user.sockets:
        ws.close()


@pytest.fixture(scope="module")
def publisher(stack: Stack) -> Iterator[Publisher]:
    pub = Publisher(
        SharedConfig(kafka_bootstrap_servers=stack.kafka, kafka_wakeup_dir=str(stack.wakeup_dir)), "e2e-session"
    )
    yield pub
    pub.close()


def sessions(stack: Stack, user_id: str) -> dict[str, Any]:
    r = requests.get(f"http://127.0.0.1:{stack.ports['session']}/internal/sessions/{user_id}", timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def wait_sessions(
    stack: Stack, user_id: str, ok: Callable[[dict[str, Any]], bool], timeout: float = 10
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        state = sessions(stack, user_id)
        if ok(state):
            return state
        assert time.monotonic() < deadline, f"session state never matched: {state}"
        time.sleep(0.1)


def device(state: dict[str, Any], device_id: str) -> dict[str, Any]:
    return next(d for d in state["devices"] if d["device_id"] == device_id)


def pinged(ws: WsClient) -> None:
    ws.send({"type": "ping"})
    ws.expect("pong")


def produce(pub: Publisher, ev: Event, key: str) -> None:
    pub.publish(SESSION_EVENTS, ev, key)


# -- through real sockets -------------------------------------------------------


def test_device_is_online_while_any_of_its_sockets_is_open(stack: Stack, me: User) -> None:
    a = me.connect()
    b = me.connect()
    pinged(a)
    pinged(b)
    state = wait_sessions(stack, me.user_id, lambda s: s["online"] and device(s, me.device_id)["connections"] == 2)
    d = device(state, me.device_id)
    assert d["online"] and d["gateway"] in {"gw1", "gw2"} and d["primary"] is True and d["device_type"] == "mobile"
    a.close()
    state = wait_sessions(stack, me.user_id, lambda s: device(s, me.device_id)["connections"] == 1)
    assert state["online"] and device(state, me.device_id)["online"]
    b.close()
    state = wait_sessions(stack, me.user_id, lambda s: not s["online"])
    d = device(state, me.device_id)
    assert not d["online"] and d["last_seen"] > 0 and state["last_seen"] >= d["last_seen"]


def test_user_sessions_and_presence_are_published(stack: Stack, me: User) -> None:
    ws = me.connect()
    pinged(ws)
    wait_sessions(stack, me.user_id, lambda s: s["online"])
    ws.close()
    wait_sessions(stack, me.user_id, lambda s: not s["online"])
    changes = topic_events(
        stack.kafka,
        SESSION_CHANGES.name,
        me.user_id,
        lambda evs: any(not e["payload"]["online"] for e in evs),
    )
    online = [e["payload"] for e in changes if e["payload"]["online"]]
    assert online and online[0]["devices"][0]["device_id"] == me.device_id
    assert online[0]["devices"][0]["gateway"] in {"gw1", "gw2"}
    flips = topic_events(stack.kafka, PRESENCE.name, me.user_id, lambda evs: len(evs) >= 2)
    assert [e["payload"]["online"] for e in flips] == [True, False]


def test_killed_gateway_does_not_leave_its_devices_online(stack: Stack, me: User) -> None:
    # Open sockets until one lands on gw2, then kill -9 that instance and start it again.
    sockets = []
    for _ in range(60):
        ws = me.connect()
        pinged(ws)
        sockets.append(ws)
        count = len(sockets)
        # Once every socket is counted, the device's location is its newest socket's gateway.
        state = wait_sessions(
            stack, me.user_id, lambda s, n=count: s["online"] and device(s, me.device_id)["connections"] == n
        )
        if device(state, me.device_id)["gateway"] == "gw2":
            break
    assert device(sessions(stack, me.user_id), me.device_id)["gateway"] == "gw2"
    for ws in sockets[:-1]:
        ws.close()
    wait_sessions(stack, me.user_id, lambda s: device(s, me.device_id)["connections"] == 1)
    stack.restart("gateway-2", kill=True)
    assert sockets[-1].closed.wait(10)
    # The restarted instance's heartbeats no longer list the dead socket.
    state = wait_sessions(stack, me.user_id, lambda s: not s["online"], timeout=30)
    assert not device(state, me.device_id)["online"]


def test_a_killed_gateway_with_more_sockets_than_one_heartbeat_removes(stack: Stack, me: User) -> None:
    """Over UPKEEP_PART sockets on the killed instance: the restarted instance's first heartbeat
    removes a part of them and session's upkeep thread the rest, a part at a time, against the
    real database; the sockets on the other instance stay counted."""
    count = 1100  # Nginx balances sockets to the instance with the fewest (least_conn): ~550 each
    sockets = [me.connect() for _ in range(count)]
    try:
        wait_sessions(stack, me.user_id, lambda s: device(s, me.device_id)["connections"] == count, timeout=60)
        stack.restart("gateway-2", kill=True)
        eventually(lambda: sum(ws.closed.is_set() for ws in sockets) > UPKEEP_PART, timeout=30, what="closes")
        time.sleep(1)  # every socket of the killed instance has seen its end by now
        gone = sum(ws.closed.is_set() for ws in sockets)
        assert gone > UPKEEP_PART, f"only {gone} sockets were on the killed instance"
        state = wait_sessions(
            stack,
            me.user_id,
            lambda s: s["online"] and device(s, me.device_id)["connections"] == count - gone,
            timeout=60,
        )
        assert device(state, me.device_id)["gateway"] == "gw1"
    finally:
        for ws in sockets:
            ws.close()


# -- edge cases produced on the topic ------------------------------------------------


def test_late_disconnect_of_an_old_socket_keeps_the_newer_one(stack: Stack, publisher: Publisher) -> None:
    user, dev, gw = f"u-{uuid.uuid4().hex}", "d1", "gw1"
    now = now_ms()
    produce(publisher, DeviceConnected(user_id=user, device_id=dev, gateway=gw, conn_id="old", ts=now - 1000), user)
    produce(publisher, DeviceConnected(user_id=user, device_id=dev, gateway=gw, conn_id="new", ts=now), user)
    produce(publisher, DeviceDisconnected(user_id=user, device_id=dev, gateway=gw, conn_id="old", ts=now + 10), user)
    produce(publisher, DeviceConnected(user_id=user, device_id="marker", gateway=gw, conn_id="m", ts=now + 20), user)
    # The marker device shows all four events were applied.
    state = wait_sessions(stack, user, lambda s: any(d["device_id"] == "marker" for d in s["devices"]))
    d = device(state, dev)
    assert d["online"] and d["conn_id"] == "new" and d["connections"] == 1
    produce(publisher, DeviceDisconnected(user_id=user, device_id=dev, gateway=gw, conn_id="new", ts=now + 30), user)
    produce(publisher, DeviceDisconnected(user_id=user, device_id="marker", gateway=gw, conn_id="m", ts=now + 40), user)
    wait_sessions(stack, user, lambda s: not s["online"])


def test_heartbeat_removes_connections_its_gateway_no_longer_holds(stack: Stack, publisher: Publisher) -> None:
    user, gw = f"u-{uuid.uuid4().hex}", f"gwx-{uuid.uuid4().hex[:8]}"
    now = now_ms()
    produce(publisher, DeviceConnected(user_id=user, device_id="d1", gateway=gw, conn_id="c1", ts=now - 20_000), user)
    produce(publisher, DeviceConnected(user_id=user, device_id="d2", gateway=gw, conn_id="c2", ts=now - 20_000), user)
    wait_sessions(stack, user, lambda s: s["online"] and len(s["devices"]) == 2)
    produce(publisher, GatewayHeartbeat(gateway=gw, connections=[(user, "d2", "c2")], ts=now), gw)
    state = wait_sessions(stack, user, lambda s: not device(s, "d1")["online"])
    assert device(state, "d2")["online"] and state["online"]
    produce(publisher, GatewayHeartbeat(gateway=gw, connections=[], ts=now + 1), gw)
    wait_sessions(stack, user, lambda s: not s["online"])


@pytest.mark.slow
def test_silent_gateway_connections_expire(stack: Stack, publisher: Publisher) -> None:
    user, gw = f"u-{uuid.uuid4().hex}", f"gwdead-{uuid.uuid4().hex[:8]}"
    produce(publisher, DeviceConnected(user_id=user, device_id="d1", gateway=gw, conn_id="c1", ts=now_ms()), user)
    wait_sessions(stack, user, lambda s: s["online"])
    # SESSION_GATEWAY_EXPIRY_S is 15 s by default.
    state = wait_sessions(stack, user, lambda s: not s["online"], timeout=30)
    assert not device(state, "d1")["online"]
    flips = topic_events(stack.kafka, PRESENCE.name, user, lambda evs: len(evs) >= 2)
    assert [e["payload"]["online"] for e in flips] == [True, False]


def test_a_message_routed_before_the_routers_listed_a_new_socket_reaches_it_when_they_do(stack: Stack) -> None:
    """The routers' session view lags behind a connect (under a reconnect storm, by seconds; here
    session is stopped). A message stored after the device's replay and its catch-up, and routed
    while the view did not list the socket yet, goes to push only; once the view lists the socket
    the router sends it the newest message of each recent conversation, rather than leaving it for
    the next message of that conversation to reveal."""
    alice, bob = new_user(stack.base_url), new_user(stack.base_url)
    a1 = alice.connect()
    gid = alice.api.post("/v1/groups", json={"name": "lag", "members": [bob.user_id]}).json()["group_id"]
    session = stack.procs["session"]
    session.signal(signal.SIGSTOP)
    try:
        b1 = bob.connect()
        # persistence replays to the socket at once and looks again 1 s later; both are over by now
        time.sleep(3)
        dm_id = a1.send_message(to=bob.user_id, body="while the view lags")
        group_id = a1.send_message(group=gid, body="to the group while the view lags")
        a1.expect("ack", id=dm_id)
        a1.expect("ack", id=group_id)
        # the window is real: neither reaches the open socket while the routers do not know it
        assert b1.nothing("message", 1.5)
    finally:
        session.signal(signal.SIGCONT)
    got = {b1.expect("message", timeout=30)["id"], b1.expect("message", timeout=30)["id"]}
    assert got == {dm_id, group_id}

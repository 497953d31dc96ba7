"""Routing decisions of the message-router and its Kafka adapters."""

from __future__ import annotations

from typing import Any

import pytest
from chatlib.routing import Outbox
from chatlib.schemas import (
    Deliver,
    MessageStored,
    PresenceRoute,
    PushRequest,
    ReceiptStored,
    SessionDevice,
    StoredMessage,
    TypingSignal,
    UserSessions,
    dm_conversation,
)

from services.message_router import logic
from services.message_router.service import MessageRouter, MessageRouterConfig
from tests.unit.persistence.fakes import FakePublisher

AB = dm_conversation("alice", "bob")


class FakeSessions:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def online(self, user: str, *devices: tuple[str, str]) -> None:
        self.data[user] = UserSessions(
            user_id=user,
            devices=[SessionDevice(device_id=d, gateway=g, conn_id=f"{d}-c", connected_at=1) for d, g in devices],
            online=bool(devices),
            last_seen=1,
        )


@pytest.fixture
def router() -> MessageRouter:
    return MessageRouter(MessageRouterConfig(), sessions=FakeSessions(), publisher=FakePublisher())


def msg(
    seq: int = 1, sender: str = "alice", device: str = "a-phone", conv: str = AB, body: str = "hello"
) -> StoredMessage:
    to = "bob" if sender == "alice" else "alice"
    return StoredMessage(
        message_id=f"m{seq}",
        id=f"c{seq}",
        conversation=conv,
        seq=seq,
        sender=sender,
        from_device=device,
        to=to,
        body=body,
        ts=seq,
    )


def delivers(router: MessageRouter) -> list[tuple[str, Deliver]]:
    return [(t, ev) for t, ev, _ in router.publisher.sent if isinstance(ev, Deliver)]  # type: ignore[attr-defined]


def targets(d: Deliver) -> set[tuple[str, str]]:
    return {(t.user_id, t.device_id) for t in d.targets}


# -- pure decisions --------------------------------------------------------------------------


def test_message_goes_to_every_recipient_device_and_the_senders_other_devices() -> None:
    s = FakeSessions()
    s.online("bob", ("b-phone", "gw1"), ("b-web", "gw2"))
    s.online("alice", ("a-phone", "gw1"), ("a-web", "gw1"))
    tg, pushes = logic.route_message(msg(), s.get)
    assert {g: {(d.user_id, d.device_id) for d in ds} for g, ds in tg.items()} == {
        "gw1": {("bob", "b-phone"), ("alice", "a-web")},
        "gw2": {("bob", "b-web")},
    }
    [push] = pushes
    assert (push.user_id, push.exclude_devices, push.preview, push.sender, push.seq) == (
        "bob",
        ["b-phone", "b-web"],
        "hello",
        "alice",
        1,
    )


def test_offline_recipient_gets_only_a_push_with_a_short_preview() -> None:
    s = FakeSessions()
    tg, [push] = logic.route_message(msg(body="x" * 500), s.get)
    assert tg == {} and push.exclude_devices == [] and push.preview == "x" * 100


def test_group_and_malformed_conversations_route_nothing() -> None:
    s = FakeSessions()
    s.online("bob", ("b", "gw1"))
    assert logic.route_message(msg(conv="group:g"), s.get) == ({}, [])
    assert logic.route_message(msg(conv="dm:bob:carol"), s.get) == ({}, [])  # sender not a party


def test_receipt_goes_to_the_peer_and_the_readers_other_devices() -> None:
    s = FakeSessions()
    s.online("alice", ("a-phone", "gw1"))
    s.online("bob", ("b-phone", "gw2"), ("b-web", "gw2"))
    r = ReceiptStored(conversation=AB, user_id="bob", device_id="b-phone", status="read", up_to_seq=4)
    tg = logic.route_receipt(r, s.get)
    assert {g: sorted(d.device_id for d in ds) for g, ds in tg.items()} == {"gw1": ["a-phone"], "gw2": ["b-web"]}
    assert logic.receipt_frame_of(r) == {
        "type": "receipt",
        "conversation": AB,
        "user_id": "bob",
        "status": "read",
        "up_to_seq": 4,
    }


def test_typing_only_to_the_peer_and_only_from_a_party() -> None:
    s = FakeSessions()
    s.online("alice", ("a-phone", "gw1"), ("a-web", "gw2"))
    s.online("bob", ("b-phone", "gw2"))
    t = TypingSignal(conversation=AB, user_id="alice", device_id="a-phone", state="start")
    assert {g: [d.device_id for d in ds] for g, ds in logic.route_typing(t, s.get).items()} == {"gw2": ["b-phone"]}
    stranger = TypingSignal(conversation=AB, user_id="carol", device_id="c", state="start")
    assert logic.route_typing(stranger, s.get) == {}


def test_presence_to_the_named_users_online_devices() -> None:
    s = FakeSessions()
    s.online("bob", ("b-phone", "gw1"))
    s.online("carol", ("c-phone", "gw1"))
    route = PresenceRoute(user_id="alice", online=True, last_seen=9, to_users=["bob", "carol", "dave", "alice"])
    assert {(d.user_id, d.device_id) for d in logic.route_presence(route, s.get)["gw1"]} == {
        ("bob", "b-phone"),
        ("carol", "c-phone"),
    }


def test_outbox_merges_a_burst_per_gateway_and_keeps_order() -> None:
    s = FakeSessions()
    s.online("bob", ("b-phone", "gw1"))
    box = Outbox()
    for i in range(1, 4):
        box.add(msg(i).frame(), logic.route_message(msg(i), s.get)[0])
    s.online("alice", ("a-web", "gw1"))
    box.add(msg(4).frame(), logic.route_message(msg(4), s.get)[0])  # a different target set: new record
    out = box.delivers()
    assert [[f["seq"] for f in d.frames] for _, d in out] == [[1, 2, 3], [4]]
    small = Outbox(max_bytes=300)
    for i in range(1, 4):
        small.add(msg(i).frame(), logic.route_message(msg(i), s.get)[0])
    assert len(small.delivers()) == 3


# -- adapters --------------------------------------------------------------------------------------


def test_on_stored_sends_one_deliver_per_gateway_and_pushes(router: MessageRouter) -> None:
    router.sessions.online("bob", ("b-phone", "gw1"), ("b-web", "gw2"))  # type: ignore[attr-defined]
    router.sessions.online("alice", ("a-phone", "gw1"), ("a-web", "gw1"))  # type: ignore[attr-defined]
    router.on_stored([MessageStored(message=msg(1)), MessageStored(message=msg(2))])
    got = {t: (targets(d), [f["seq"] for f in d.frames]) for t, d in delivers(router)}
    assert got == {
        "gateway.gw1.v1": ({("bob", "b-phone"), ("alice", "a-web")}, [1, 2]),
        "gateway.gw2.v1": ({("bob", "b-web")}, [1, 2]),
    }
    pushes = router.publisher.to("push.requests.v1")  # type: ignore[attr-defined]
    assert [(p.user_id, p.seq) for p in pushes] == [("bob", 1), ("bob", 2)]
    assert router.publisher.flushes == 1  # type: ignore[attr-defined]


def test_on_stored_ignores_group_conversations(router: MessageRouter) -> None:
    router.sessions.online("bob", ("b-phone", "gw1"))  # type: ignore[attr-defined]
    router.on_stored(
        [
            MessageStored(message=msg(1, conv="group:g")),
            ReceiptStored(conversation="group:g", user_id="bob", device_id="b", status="read", up_to_seq=1),
        ]
    )
    assert router.publisher.sent == []  # type: ignore[attr-defined]


def test_on_stored_routes_receipts(router: MessageRouter) -> None:
    router.sessions.online("alice", ("a-phone", "gw2"))  # type: ignore[attr-defined]
    router.on_stored([ReceiptStored(conversation=AB, user_id="bob", device_id="b", status="delivered", up_to_seq=3)])
    [(topic, d)] = delivers(router)
    assert topic == "gateway.gw2.v1" and d.frames[0]["status"] == "delivered" and targets(d) == {("alice", "a-phone")}
    assert router.publisher.of(PushRequest) == []  # type: ignore[attr-defined]


def test_on_signals_and_on_route(router: MessageRouter) -> None:
    router.sessions.online("bob", ("b-phone", "gw1"))  # type: ignore[attr-defined]
    router.on_signals(
        [
            TypingSignal(conversation=AB, user_id="alice", device_id="a", state="start"),
            TypingSignal(conversation="group:g", user_id="alice", device_id="a", state="start"),
        ]
    )
    router.on_route([PresenceRoute(user_id="alice", online=False, last_seen=7, to_users=["bob"])])
    frames = [f for _, d in delivers(router) for f in d.frames]
    assert frames == [
        {"type": "typing", "conversation": AB, "user_id": "alice", "state": "start"},
        {"type": "presence", "user_id": "alice", "online": False, "last_seen": 7},
    ]


# -- a socket the session view lists late ----------------------------------------------------------


def test_a_socket_the_view_lists_late_gets_the_newest_message_it_was_not_routed(router: MessageRouter) -> None:
    # bob's phone connected, but the view does not list it yet: the message goes to push only
    router.on_stored([MessageStored(message=msg(1)), MessageStored(message=msg(2))])
    assert delivers(router) == [] and len(router.publisher.of(PushRequest)) == 2  # type: ignore[attr-defined]
    router.sessions.online("bob", ("b-phone", "gw1"))  # type: ignore[attr-defined]
    router.on_sessions_update(router.sessions.get("bob"), None)
    [(topic, d)] = delivers(router)
    # the newest one is enough: the gateway asks persistence for any gap before it
    assert topic == "gateway.gw1.v1" and targets(d) == {("bob", "b-phone")} and [f["seq"] for f in d.frames] == [2]
    # a change that lists no new socket (presence, last_seen) sends nothing
    before = router.sessions.get("bob")
    router.on_sessions_update(before, before)
    assert len(delivers(router)) == 1


def test_the_message_is_noted_before_the_devices_are_looked_up(router: MessageRouter) -> None:
    """A view update landing between the lookup and the note would find nothing to send."""
    seen: list[list[Any]] = []
    lookup = router.sessions.get

    def get(user: str) -> Any:
        seen.append(router.recent.for_user(user))
        return lookup(user)

    router.sessions.get = get  # type: ignore[method-assign]
    router.on_stored([MessageStored(message=msg(5))])
    assert seen and all(frames and frames[0]["seq"] == 5 for frames in seen)

"""group-router fan-out: one Deliver per gateway, the right devices, pushes, receipts, typing, group events."""

from __future__ import annotations

from typing import Any

import pytest
from chatlib.routing import Outbox
from chatlib.schemas import (
    Deliver,
    DeviceRef,
    Event,
    GroupChanged,
    GroupMember,
    GroupPushRequest,
    GroupSnapshot,
    MessageStored,
    PushRequest,
    ReceiptStored,
    SessionDevice,
    StoredMessage,
    TypingSignal,
    UserSessions,
)

from services.group_router.logic import SenderLog
from services.group_router.service import GroupRouter, GroupRouterConfig
from tests.unit.group.fakes import FakePublisher


class FakeView:
    def __init__(self, data: dict[str, Event] | None = None):
        self.data = dict(data or {})

    def get(self, key: str) -> Event | None:
        return self.data.get(key)


def sessions(user: str, *devices: tuple[str, str]) -> UserSessions:
    return UserSessions(
        user_id=user,
        devices=[SessionDevice(device_id=d, gateway=gw, conn_id=f"c-{d}", connected_at=1) for d, gw in devices],
        online=bool(devices),
        last_seen=1,
    )


def group(gid: str, *members: str, deleted: bool = False) -> GroupChanged:
    snap = GroupSnapshot(
        group_id=gid,
        name="g",
        owner=members[0],
        members=[GroupMember(user_id=u, role="owner" if i == 0 else "member") for i, u in enumerate(members)],
        created_ts=1,
        deleted=deleted,
    )
    return GroupChanged(group=snap, event="created", users=list(members), ts=1)


def message(
    gid: str = "g1", seq: int = 1, sender: str = "alice", device: str = "a-phone", body: str = "hi"
) -> MessageStored:
    return MessageStored(
        message=StoredMessage(
            message_id=f"m{seq}",
            id=f"c{seq}",
            conversation=f"group:{gid}",
            seq=seq,
            sender=sender,
            from_device=device,
            group=gid,
            body=body,
            ts=1000 + seq,
        )
    )


@pytest.fixture
def router() -> GroupRouter:
    view = FakeView(
        {
            "alice": sessions("alice", ("a-phone", "gw1"), ("a-web", "gw2")),
            "bob": sessions("bob", ("b-phone", "gw1")),
            "carol": sessions("carol", ("c-phone", "gw2"), ("c-web", "gw2")),
            "dave": sessions("dave"),  # offline
            "erin": sessions("erin", ("e-phone", "gw1")),  # not in the group
        }
    )
    groups = FakeView(
        {"g1": group("g1", "alice", "bob", "carol", "dave"), "gone": group("gone", "alice", "bob", deleted=True)}
    )
    return GroupRouter(GroupRouterConfig(view_wait_s=0), sessions=view, groups=groups, producer=FakePublisher())


def delivers(router: GroupRouter) -> list[tuple[str, Deliver]]:
    return [(topic, ev) for topic, ev, _ in router.producer.sent if isinstance(ev, Deliver)]  # type: ignore[attr-defined]


def pushes(router: GroupRouter) -> list[PushRequest]:
    """Every per-user request the group push requests stand for."""
    return [r for g in router.producer.of(GroupPushRequest) for r in g.requests()]  # type: ignore[attr-defined]


def refs(d: Deliver) -> set[tuple[str, str]]:
    return {(t.user_id, t.device_id) for t in d.targets}


def test_one_deliver_per_gateway_with_all_its_targets(router: GroupRouter) -> None:
    router.on_traffic([message()])
    out = delivers(router)
    assert sorted(topic for topic, _ in out) == ["gateway.gw1.v1", "gateway.gw2.v1"]
    by_topic = {topic: d for topic, d in out}
    # the sending device is skipped; the sender's other device is included
    assert refs(by_topic["gateway.gw1.v1"]) == {("bob", "b-phone")}
    assert refs(by_topic["gateway.gw2.v1"]) == {("alice", "a-web"), ("carol", "c-phone"), ("carol", "c-web")}
    for d in by_topic.values():
        assert [f["type"] for f in d.frames] == ["message"] and d.frames[0]["seq"] == 1
        assert d.frames[0]["group"] == "g1" and d.frames[0]["from"] == "alice"


def test_a_burst_in_one_group_is_one_record_per_gateway_in_order(router: GroupRouter) -> None:
    router.on_traffic([message(seq=s) for s in (1, 2, 3)])
    out = delivers(router)
    assert len(out) == 2
    for _, d in out:
        assert [f["seq"] for f in d.frames] == [1, 2, 3]


def test_different_target_sets_keep_per_gateway_order() -> None:
    box = Outbox()
    ab = {"gw1": [DeviceRef(user_id="a", device_id="1"), DeviceRef(user_id="b", device_id="2")]}
    a = {"gw1": [DeviceRef(user_id="a", device_id="1")]}
    box.add({"seq": 1}, ab)
    box.add({"seq": 2}, a)
    box.add({"seq": 3}, ab)
    assert [[f["seq"] for f in d.frames] for _, d in box.delivers()] == [[1], [2], [3]]


def test_outbox_splits_large_records() -> None:
    box = Outbox(max_bytes=2000)
    t = {"gw1": [DeviceRef(user_id="a", device_id="1")]}
    for i in range(4):
        box.add({"seq": i, "body": "x" * 900}, t)
    frames = [[f["seq"] for f in d.frames] for _, d in box.delivers()]
    assert frames == [[0, 1], [2, 3]]


def test_one_push_request_names_every_other_member_excluding_online_devices(router: GroupRouter) -> None:
    router.on_traffic([message(body="y" * 300)])
    by_user = {p.user_id: p for p in pushes(router)}
    assert set(by_user) == {"bob", "carol", "dave"}  # never the sender
    assert by_user["dave"].exclude_devices == []
    assert by_user["carol"].exclude_devices == ["c-phone", "c-web"]
    p = by_user["dave"]
    assert (p.conversation, p.message_id, p.seq, p.sender, p.ts) == ("group:g1", "m1", 1, "alice", 1001)
    assert p.preview == "y" * 100
    sent = [(ev, key) for _, ev, key in router.producer.sent if isinstance(ev, GroupPushRequest)]  # type: ignore[attr-defined]
    assert [key for _, key in sent] == ["group:g1"]  # one record for the whole group


def test_dm_traffic_and_unknown_or_deleted_groups_are_ignored(router: GroupRouter) -> None:
    dm = message()
    dm = MessageStored(
        message=dm.message.model_copy(update={"conversation": "dm:alice:bob", "group": None, "to": "bob"})
    )
    router.on_traffic([dm, message(gid="unknown"), message(gid="gone")])
    assert router.producer.sent == []  # type: ignore[attr-defined]


def test_system_owner_gets_nothing(router: GroupRouter) -> None:
    router.groups.data["chan"] = group("chan", "system", "bob")  # type: ignore[attr-defined]
    router.on_traffic([message(gid="chan", sender="bob", device="b-phone")])
    assert [p.user_id for p in pushes(router)] == []
    assert delivers(router) == []  # bob's only device sent it


def test_receipts_of_messages_it_did_not_route_go_to_every_member(router: GroupRouter) -> None:
    r = ReceiptStored(conversation="group:g1", user_id="alice", device_id="a-web", status="read", up_to_seq=7)
    router.on_traffic([r])
    out = {topic: d for topic, d in delivers(router)}
    assert refs(out["gateway.gw1.v1"]) == {("alice", "a-phone"), ("bob", "b-phone")}
    assert refs(out["gateway.gw2.v1"]) == {("carol", "c-phone"), ("carol", "c-web")}
    assert out["gateway.gw1.v1"].frames == [
        {"type": "receipt", "conversation": "group:g1", "user_id": "alice", "status": "read", "up_to_seq": 7}
    ]
    assert pushes(router) == []


def test_receipt_from_non_member_is_dropped(router: GroupRouter) -> None:
    r = ReceiptStored(conversation="group:g1", user_id="erin", device_id="e-phone", status="read", up_to_seq=1)
    router.on_traffic([r])
    assert delivers(router) == []


def test_typing_to_other_members_only(router: GroupRouter) -> None:
    router.on_traffic(
        [
            TypingSignal(conversation="group:g1", user_id="bob", device_id="b-phone", state="start"),
            TypingSignal(conversation="group:g1", user_id="erin", device_id="e-phone", state="start"),
            TypingSignal(conversation="dm:alice:bob", user_id="bob", device_id="b-phone", state="start"),
        ]
    )
    out = {topic: d for topic, d in delivers(router)}
    assert refs(out["gateway.gw1.v1"]) == {("alice", "a-phone")}
    assert refs(out["gateway.gw2.v1"]) == {("alice", "a-web"), ("carol", "c-phone"), ("carol", "c-web")}
    assert out["gateway.gw1.v1"].frames == [
        {"type": "typing", "conversation": "group:g1", "user_id": "bob", "state": "start"}
    ]


def test_group_events_reach_members_and_removed_users(router: GroupRouter) -> None:
    base = group("g2", "alice", "bob")
    removed = GroupChanged(group=base.group, event="member_removed", users=["erin"], actor="alice", ts=5)
    router.on_group_changes([removed])
    out = {topic: d for topic, d in delivers(router)}
    assert refs(out["gateway.gw1.v1"]) == {("alice", "a-phone"), ("bob", "b-phone"), ("erin", "e-phone")}
    frame = out["gateway.gw1.v1"].frames[0]
    assert frame["type"] == "group_event" and frame["event"] == "member_removed" and frame["group_id"] == "g2"
    assert frame["users"] == ["erin"] and frame["group"]["members"][0] == {"user_id": "alice", "role": "owner"}


def test_deleted_group_event_reaches_former_members(router: GroupRouter) -> None:
    gone = group("g3", "bob", "erin", deleted=True)
    router.on_group_changes([GroupChanged(group=gone.group, event="deleted", users=["bob", "erin"], ts=9)])
    ((topic, d),) = delivers(router)
    assert topic == "gateway.gw1.v1" and refs(d) == {("bob", "b-phone"), ("erin", "e-phone")}
    assert d.frames[0]["event"] == "deleted"


def test_broker_failure_raises_so_the_batch_is_retried(router: GroupRouter) -> None:
    class Failing:
        def get(self, timeout: float | None = None) -> Any:
            raise OSError("broker away")

    class Pub(FakePublisher):
        def send(self, topic: Any, ev: Event, key: str | None = None) -> Any:
            return Failing()

    router.producer = Pub()
    with pytest.raises(OSError):
        router.on_traffic([message()])


def test_sender_who_left_still_syncs_own_devices(router: GroupRouter) -> None:
    router.on_traffic([message(sender="erin", device="e-web")])
    out = {topic: d for topic, d in delivers(router)}
    assert ("erin", "e-phone") in refs(out["gateway.gw1.v1"])
    assert "erin" not in {p.user_id for p in pushes(router)}


def test_receipts_go_to_the_senders_of_the_covered_messages_and_the_readers_other_devices(
    router: GroupRouter,
) -> None:
    router.on_traffic(
        [message(seq=1, sender="bob", device="b-phone"), message(seq=2, sender="carol", device="c-phone")]
    )
    router.producer.sent.clear()  # type: ignore[attr-defined]
    # alice read seq 2 only (she had read 1): carol hears of it, bob does not
    r = ReceiptStored(
        conversation="group:g1", user_id="alice", device_id="a-web", status="read", up_to_seq=2, after_seq=1
    )
    router.on_traffic([r])
    told = set().union(*(refs(d) for _, d in delivers(router)))
    assert told == {("alice", "a-phone"), ("carol", "c-phone"), ("carol", "c-web")}


def test_sender_log_knows_a_range_only_when_it_remembers_every_seq() -> None:
    log = SenderLog(keep=3)
    for seq, sender in enumerate(["a", "b", "c", "d"], start=1):
        log.add("group:g", seq, sender)
    assert log.senders("group:g", 1, 4) == {"b", "c", "d"}
    assert log.senders("group:g", 0, 4) is None  # seq 1 was forgotten
    assert log.senders("group:other", 0, 1) is None


def test_a_socket_the_view_lists_late_gets_the_newest_group_message_it_was_not_routed(router: GroupRouter) -> None:
    router.on_traffic([message(seq=1), message(seq=2)])
    assert not any("dave" in {t.user_id for t in d.targets} for _, d in delivers(router))
    routed = len(delivers(router))
    dave = sessions("dave", ("d-phone", "gw2"))
    router.sessions.data["dave"] = dave  # type: ignore[attr-defined]
    router.on_sessions_update(dave, sessions("dave"))
    [(topic, d)] = delivers(router)[routed:]
    assert topic == "gateway.gw2.v1" and refs(d) == {("dave", "d-phone")} and [f["seq"] for f in d.frames] == [2]
    # erin is in no group that spoke: her new socket gets nothing
    router.on_sessions_update(sessions("erin", ("e-web", "gw1")), sessions("erin"))
    assert len(delivers(router)) == routed + 1


def test_the_group_message_is_noted_before_the_devices_are_looked_up(router: GroupRouter) -> None:
    seen: list[tuple[str, list[Any]]] = []
    lookup = router.sessions.get

    def get(user: str) -> Any:
        seen.append((user, router.recent.for_user(user)))
        return lookup(user)

    router.sessions.get = get  # type: ignore[method-assign]
    router.on_traffic([message(seq=9)])
    assert {u for u, _ in seen} >= {"bob", "carol", "dave"}
    assert all(frames and frames[0]["seq"] == 9 for _, frames in seen)

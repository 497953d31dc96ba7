"""Receipts and offsets, connect replay, replay requests, group visibility, device removal, presence."""

from __future__ import annotations

from chatlib.schemas import (
    Deliver,
    DeviceRemoved,
    PresenceChanged,
    PresenceRoute,
    ReceiptStored,
    UserUnregistered,
    dm_conversation,
)

from services.persistence.logic import Offsets
from services.persistence.service import Persistence
from tests.unit.persistence.conftest import connected, dm, gmsg, make_service, receipt, replay_request, set_group
from tests.unit.persistence.test_messages import frames_to

AB = dm_conversation("alice", "bob")
G = "group:g1"


def send_dms(
    svc: Persistence, n: int, sender: str = "alice", to: str = "bob", start: int = 0, device: str | None = None
) -> None:
    svc.on_inbound([dm(sender=sender, to=to, cid=f"{sender}-{start + i}", device=device) for i in range(n)])


def receipts(svc: Persistence) -> list[tuple[str, str, str, int]]:
    return [(r.user_id, r.device_id, r.status, r.up_to_seq) for r in svc.publisher.of(ReceiptStored)]  # type: ignore[attr-defined]


def delivers(svc: Persistence) -> list[Deliver]:
    return svc.publisher.of(Deliver)  # type: ignore[attr-defined, no-any-return]


# -- offsets -----------------------------------------------------------------------------


def test_delivered_receipt_raises_device_and_user_offsets(svc: Persistence) -> None:
    send_dms(svc, 3)
    svc.on_inbound([receipt("bob", AB, "delivered", 2)])
    assert svc.store.device_offsets[("bob", "bob-phone", AB)] == Offsets(delivered=2, read=0)  # type: ignore[attr-defined]
    assert svc.store.user_offsets[("bob", AB)] == Offsets(delivered=2, read=0)  # type: ignore[attr-defined]
    assert receipts(svc) == [("bob", "bob-phone", "delivered", 2)]


def test_read_implies_delivered_and_is_reported_once(svc: Persistence) -> None:
    send_dms(svc, 3)
    svc.on_inbound([receipt("bob", AB, "read", 3)])
    assert svc.store.device_offsets[("bob", "bob-phone", AB)] == Offsets(delivered=3, read=3)  # type: ignore[attr-defined]
    assert receipts(svc) == [("bob", "bob-phone", "read", 3)]


def test_offsets_never_go_backwards(svc: Persistence) -> None:
    send_dms(svc, 5)
    svc.on_inbound([receipt("bob", AB, "read", 4)])
    svc.on_inbound([receipt("bob", AB, "delivered", 2), receipt("bob", AB, "read", 1)])
    assert svc.store.device_offsets[("bob", "bob-phone", AB)] == Offsets(delivered=4, read=4)  # type: ignore[attr-defined]
    assert receipts(svc) == [("bob", "bob-phone", "read", 4)]


def test_user_offset_is_the_max_over_devices(svc: Persistence) -> None:
    send_dms(svc, 5)
    svc.on_inbound([receipt("bob", AB, "read", 5, device="tablet")])
    svc.on_inbound([receipt("bob", AB, "read", 2, device="phone")])
    assert svc.store.user_offsets[("bob", AB)] == Offsets(5, 5)  # type: ignore[attr-defined]
    assert svc.store.device_offsets[("bob", "phone", AB)] == Offsets(2, 2)  # type: ignore[attr-defined]
    assert receipts(svc) == [("bob", "tablet", "read", 5)]  # the phone catching up is no news


def test_delivered_beyond_read_in_one_poll_reports_both(svc: Persistence) -> None:
    send_dms(svc, 6)
    svc.on_inbound([receipt("bob", AB, "read", 2), receipt("bob", AB, "delivered", 6)])
    assert sorted(receipts(svc)) == [("bob", "bob-phone", "delivered", 6), ("bob", "bob-phone", "read", 2)]


def test_receipt_beyond_the_last_message_is_clamped(svc: Persistence) -> None:
    send_dms(svc, 2)
    svc.on_inbound([receipt("bob", AB, "read", 1_000_000)])
    assert svc.store.user_offsets[("bob", AB)] == Offsets(2, 2)  # type: ignore[attr-defined]


def test_receipt_for_someone_elses_conversation_is_forbidden(svc: Persistence) -> None:
    send_dms(svc, 2)
    svc.on_inbound(
        [receipt("carol", AB, "read", 2), receipt("carol", "garbage", "read", 1), receipt("carol", G, "read", 1)]
    )
    assert [f["code"] for f in frames_to(svc, "carol", kind="error")] == ["forbidden"] * 3
    assert receipts(svc) == [] and svc.store.user_offsets == {}  # type: ignore[attr-defined]


def test_group_member_receipts_are_stored(svc: Persistence) -> None:
    set_group(svc, ["alice", "bob"])
    svc.on_inbound([gmsg("alice", cid="1"), gmsg("alice", cid="2")])
    svc.on_inbound([receipt("bob", G, "read", 2)])
    assert receipts(svc) == [("bob", "bob-phone", "read", 2)]


# -- connect replay ----------------------------------------------------------------------------


def test_connect_replays_pending_messages_in_order_with_a_full_sync(svc: Persistence) -> None:
    send_dms(svc, 3)
    send_dms(svc, 2, to="carol", start=10)
    send_dms(svc, 1, sender="bob", to="carol")  # not alice's
    svc.on_inbound([receipt("alice", dm_conversation("alice", "carol"), "delivered", 2, device="laptop")])
    svc.publisher.clear()  # type: ignore[attr-defined]
    svc.on_inbound([dm(sender="bob", to="alice", cid="b1")])  # seq 4 in a:b
    svc.publisher.clear()  # type: ignore[attr-defined]
    svc.on_session_events([connected("alice", device="laptop", conn="k1")])
    [d] = delivers(svc)
    assert d.initial and d.conn_id == "k1" and [(t.user_id, t.device_id) for t in d.targets] == [("alice", "laptop")]
    assert [(f["conversation"], f["seq"]) for f in d.frames] == [(AB, 1), (AB, 2), (AB, 3), (AB, 4)]
    assert d.sync == {AB: 4, dm_conversation("alice", "carol"): 2}


def test_connect_skips_what_the_device_has_and_sends_its_own_messages_as_acks(svc: Persistence) -> None:
    send_dms(svc, 2, device="alice-phone")  # 1, 2 from this very device
    send_dms(svc, 2, sender="bob", to="alice")  # 3, 4
    send_dms(svc, 1, device="alice-laptop", start=10)  # 5, from her other device
    send_dms(svc, 1, device="alice-phone", start=20)  # 6, from this device again
    svc.on_inbound([receipt("alice", AB, "delivered", 3)])
    svc.publisher.clear()  # type: ignore[attr-defined]
    svc.on_session_events([connected("alice")])
    [d] = delivers(svc)
    assert [(f["type"], f["seq"]) for f in d.frames] == [("message", 4), ("message", 5), ("ack", 6)]
    assert d.frames[2]["id"] == "alice-20"
    assert d.sync == {AB: 6}


def test_catch_up_after_connect_sends_what_was_stored_since_the_snapshot() -> None:
    svc = make_service(connect_catchup_ms=50)
    send_dms(svc, 2, sender="bob", to="alice")
    svc.on_session_events([connected("alice", conn="k7")])
    send_dms(svc, 2, sender="bob", to="alice", start=10)  # 3, 4: maybe routed before the router saw alice
    send_dms(svc, 1, sender="carol", to="alice")  # a new conversation: 1
    svc.publisher.clear()  # type: ignore[attr-defined]
    assert svc.run_due_catchups(now=0) == 0  # not due yet
    assert svc.run_due_catchups(now=10**9) == 1
    got = {d.sync and next(iter(d.sync)): ([f["seq"] for f in d.frames], d.sync, d.conn_id) for d in delivers(svc)}
    assert got == {
        AB: ([3, 4], {AB: 4}, "k7"),
        dm_conversation("alice", "carol"): ([1], {dm_conversation("alice", "carol"): 1}, "k7"),
    }
    svc.publisher.clear()  # type: ignore[attr-defined]
    assert svc.run_due_catchups(now=10**9) == 0  # once per connect


def test_a_poll_of_connects_replays_to_every_socket_each_its_own_device_offsets() -> None:
    """A reconnect storm's poll: many users, several sockets of one device, one device behind
    another of the same user; each socket gets exactly what its device misses."""
    svc = make_service(connect_catchup_ms=50)
    send_dms(svc, 3, sender="bob", to="alice")  # a:b 1..3
    send_dms(svc, 2, sender="alice", to="carol", device="alice-phone")  # a:c 1..2
    svc.on_inbound([receipt("alice", AB, "delivered", 2, device="laptop")])
    svc.on_inbound([receipt("carol", dm_conversation("alice", "carol"), "delivered", 1)])
    svc.publisher.clear()  # type: ignore[attr-defined]
    svc.on_session_events(
        [
            connected("alice", conn="p1", gateway="gw1"),
            connected("alice", device="laptop", conn="l1"),
            connected("carol", conn="c1"),
            connected("alice", conn="p2", gateway="gw1"),  # a second socket of the same device
            connected("dave", conn="d1"),
        ]
    )
    by_conn = {d.conn_id: d for d in delivers(svc)}
    assert sorted(by_conn) == ["c1", "d1", "l1", "p1", "p2"]
    frames = {c: [(f["conversation"], f["type"], f["seq"]) for f in d.frames] for c, d in by_conn.items()}
    AC = dm_conversation("alice", "carol")
    phone = [(AB, "message", 1), (AB, "message", 2), (AB, "message", 3), (AC, "ack", 1), (AC, "ack", 2)]
    assert sorted(frames["p1"]) == sorted(frames["p2"]) == sorted(phone)
    assert sorted(frames["l1"]) == sorted([(AB, "message", 3), (AC, "message", 1), (AC, "message", 2)])
    assert frames["c1"] == [(AC, "message", 2)]
    assert frames["d1"] == []
    assert all(d.initial for d in by_conn.values())
    assert by_conn["p1"].sync == by_conn["l1"].sync == {AB: 3, AC: 2} and by_conn["c1"].sync == {AC: 2}
    assert {c: d.targets[0].device_id for c, d in by_conn.items()} == {
        "p1": "alice-phone", "p2": "alice-phone", "l1": "laptop", "c1": "carol-phone", "d1": "dave-phone"
    }  # fmt: skip
    # A catch-up for every socket, read together when they are due.
    send_dms(svc, 1, sender="bob", to="alice", start=10)  # a:b 4
    svc.publisher.clear()  # type: ignore[attr-defined]
    assert svc.run_due_catchups(now=10**9) == 5
    caught = sorted((d.conn_id, [f["seq"] for f in d.frames]) for d in delivers(svc))
    assert caught == [("l1", [4]), ("p1", [4]), ("p2", [4])]


def test_user_without_conversations_gets_an_empty_initial_sync(svc: Persistence) -> None:
    svc.on_session_events([connected("dave")])
    [d] = delivers(svc)
    assert (d.initial, d.frames, d.sync) == (True, [], {})


def test_large_replay_is_split_initial_first_and_covers_everything() -> None:
    svc = make_service(deliver_max_bytes=16 * 1024)
    for batch in range(4):
        svc.on_inbound([dm(sender="bob", to="alice", cid=f"{batch}-{i}", body="x" * 1000) for i in range(25)])
    svc.publisher.clear()  # type: ignore[attr-defined]
    svc.on_session_events([connected("alice")])
    ds = delivers(svc)
    assert len(ds) > 1 and ds[0].initial and not any(d.initial for d in ds[1:])
    assert all(d.sync is not None and d.conn_id == "conn-1" for d in ds)
    seqs = [f["seq"] for d in ds for f in d.frames]
    assert seqs == list(range(1, 101))
    # each record's sync says exactly how far it got; the last one reaches the end
    assert [d.sync[AB] for d in ds] == [d.frames[-1]["seq"] for d in ds]  # type: ignore[index]
    assert ds[-1].sync == {AB: 100}


# -- replay requests ----------------------------------------------------------------------------


def test_replay_request_fills_the_gap_and_syncs_up_to(svc: Persistence) -> None:
    send_dms(svc, 3, sender="bob", to="alice")
    send_dms(svc, 2, device="alice-phone")  # 4, 5 from the asking device: acks
    svc.publisher.clear()  # type: ignore[attr-defined]
    svc.on_inbound([replay_request("alice", AB, after=1, up_to=5)])
    [d] = delivers(svc)
    assert d.conn_id == "conn-9" and not d.initial and d.sync == {AB: 5}
    assert [(f["type"], f["seq"]) for f in d.frames] == [("message", 2), ("message", 3), ("ack", 4), ("ack", 5)]


def test_replay_request_of_a_stranger_gets_only_the_sync(svc: Persistence) -> None:
    send_dms(svc, 3)
    svc.publisher.clear()  # type: ignore[attr-defined]
    svc.on_inbound([replay_request("carol", AB, after=0, up_to=3)])
    [d] = delivers(svc)
    assert (d.frames, d.sync) == ([], {AB: 3})


def test_replay_request_after_messages_in_the_same_poll_sees_them(svc: Persistence) -> None:
    svc.on_inbound([dm(sender="bob", to="alice", cid="1"), replay_request("alice", AB, after=0, up_to=1)])
    replay = [d for d in delivers(svc) if d.conn_id == "conn-9"]
    assert [f["seq"] for f in replay[0].frames] == [1]


# -- group visibility ---------------------------------------------------------------------------


def test_group_member_reads_from_joining_and_keeps_history_until_removal(svc: Persistence) -> None:
    set_group(svc, ["alice", "bob"], ts=100)
    svc.on_inbound([gmsg("alice", cid="1"), gmsg("alice", cid="2")])  # 1, 2: before carol
    set_group(svc, ["alice", "bob", "carol"], ts=200)
    svc.on_inbound([gmsg("alice", cid="3"), gmsg("carol", cid="4")])  # 3, 4
    set_group(svc, ["alice", "bob"], ts=300)
    svc.on_inbound([gmsg("alice", cid="5")])  # 5: after carol left
    svc.publisher.clear()  # type: ignore[attr-defined]
    svc.on_session_events([connected("carol", device="tablet")])
    [d] = delivers(svc)
    assert [f["seq"] for f in d.frames] == [3, 4]
    assert d.sync == {G: 5}
    svc.publisher.clear()  # type: ignore[attr-defined]
    svc.on_inbound([replay_request("carol", G, after=0, up_to=5)])
    [d] = delivers(svc)
    assert [f["seq"] for f in d.frames] == [3, 4] and d.sync == {G: 5}


def test_redelivered_group_snapshots_do_not_move_ranges(svc: Persistence) -> None:
    from tests.unit.persistence.conftest import group_change

    first = group_change(["alice", "bob"], ts=100)
    svc.groups.put(first)  # type: ignore[attr-defined]
    svc.on_group_changes([first])
    svc.on_inbound([gmsg("alice", cid="1")])
    set_group(svc, ["alice"], ts=200)  # bob removed after seq 1
    svc.on_group_changes([first])  # the old snapshot again (at-least-once)
    bob = svc.store.get_ranges_of_user("bob")  # type: ignore[attr-defined]
    assert [(r.from_seq, r.to_seq) for r in bob] == [(1, 1)]
    set_group(svc, ["alice", "bob"], ts=300)  # re-added later: a new range after seq 1
    bob = sorted(svc.store.get_ranges_of_user("bob"), key=lambda r: r.from_seq)  # type: ignore[attr-defined]
    assert [(r.from_seq, r.to_seq) for r in bob] == [(1, 1), (2, None)]


# -- device removal, unregistration --------------------------------------------------------------


def test_removed_device_loses_its_queue_and_unregistered_user_all_of_theirs(svc: Persistence) -> None:
    send_dms(svc, 2)
    svc.on_inbound(
        [receipt("bob", AB, "delivered", 1, device="phone"), receipt("bob", AB, "delivered", 2, device="tablet")]
    )
    svc.on_user_events([DeviceRemoved(user_id="bob", device_id="tablet")])
    assert set(svc.store.device_offsets) == {("bob", "phone", AB)}  # type: ignore[attr-defined]
    svc.on_user_events([UserUnregistered(user_id="bob")])
    assert svc.store.device_offsets == {}  # type: ignore[attr-defined]
    assert len(svc.store.messages) == 2  # type: ignore[attr-defined]  (alice keeps her history)


# -- presence -------------------------------------------------------------------------------------


def test_presence_goes_to_dm_peers_and_small_group_co_members() -> None:
    svc = make_service(presence_max_group=3)
    send_dms(svc, 1, sender="alice", to="bob")
    set_group(svc, ["alice", "carol"], group="small")
    set_group(svc, ["alice", "dave", "x1", "x2"], group="big")
    svc.publisher.clear()  # type: ignore[attr-defined]
    svc.on_presence(
        [
            PresenceChanged(user_id="alice", online=True, last_seen=5),
            PresenceChanged(user_id="zed", online=False, last_seen=6),
        ]
    )
    [route] = svc.publisher.of(PresenceRoute)  # type: ignore[attr-defined]
    assert (route.user_id, route.online, route.last_seen, route.to_users) == ("alice", True, 5, ["bob", "carol"])
    assert svc.publisher.sent[0][0] == "chat.route.v1" and svc.publisher.sent[0][2] == "alice"  # type: ignore[attr-defined]

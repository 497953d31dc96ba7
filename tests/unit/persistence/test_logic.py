"""Pure rules of persistence."""

from __future__ import annotations

import pytest
from chatlib.schemas import DeviceRef, StoredMessage

from services.persistence import logic
from services.persistence.logic import MemberRange, Offsets, ReceiptState
from tests.unit.persistence.conftest import group_change


def msg(seq: int, conv: str = "dm:a:b", sender: str = "a", device: str = "a1", body: str = "x") -> StoredMessage:
    return StoredMessage(
        message_id=f"m{seq}",
        id=f"c{seq}",
        conversation=conv,
        seq=seq,
        sender=sender,
        from_device=device,
        to="b",
        body=body,
        ts=seq,
    )


@pytest.mark.parametrize(
    ("current", "status", "up_to", "expected"),
    [
        (Offsets(0, 0), "delivered", 5, Offsets(5, 0)),
        (Offsets(5, 0), "delivered", 3, Offsets(5, 0)),
        (Offsets(5, 2), "read", 4, Offsets(5, 4)),
        (Offsets(3, 2), "read", 7, Offsets(7, 7)),
        (Offsets(7, 7), "read", 1, Offsets(7, 7)),
    ],
)
def test_advance_never_backwards_and_read_implies_delivered(
    current: Offsets, status: str, up_to: int, expected: Offsets
) -> None:
    assert logic.advance(current, status, up_to) == expected  # type: ignore[arg-type]


def test_receipt_events_only_for_advances() -> None:
    states = {
        ("u", "c1"): ReceiptState(Offsets(2, 2), Offsets(5, 5), read_device="d1", delivered_device="d1"),
        ("u", "c2"): ReceiptState(Offsets(2, 2), Offsets(2, 2)),
        ("u", "c3"): ReceiptState(Offsets(2, 1), Offsets(9, 1), delivered_device="d2"),
    }
    got = [(e.conversation, e.status, e.up_to_seq, e.device_id) for e in logic.receipt_events(states)]
    assert got == [("c1", "read", 5, "d1"), ("c3", "delivered", 9, "d2")]


def test_history_page_over_dense_and_split_ranges() -> None:
    assert logic.history_page([(1, 120)], None, 50) == ([(71, 120)], 71)
    assert logic.history_page([(1, 120)], 71, 50) == ([(21, 70)], 21)
    assert logic.history_page([(1, 120)], 21, 50) == ([(1, 20)], None)
    assert logic.history_page([(1, 120)], 1, 50) == ([], None)
    assert logic.history_page([], None, 50) == ([], None)
    # a member who left and came back: two ranges, a page may span both
    assert logic.history_page([(3, 5), (10, 12)], None, 5) == ([(4, 5), (10, 12)], 4)
    assert logic.history_page([(3, 5), (10, 12)], 4, 5) == ([(3, 3)], None)
    assert logic.history_page([(3, 5), (10, 12)], 999, 2) == ([(11, 12)], 11)


def test_visible_intervals_clip_and_merge() -> None:
    ranges = [
        MemberRange("r1", "group:g", "u", from_seq=3, to_seq=5),
        MemberRange("r2", "group:g", "u", from_seq=6, to_seq=None),
        MemberRange("r3", "group:g", "u", from_seq=20, to_seq=None),
    ]
    assert logic.visible_intervals(ranges, 10) == [(3, 10)]
    assert logic.visible_intervals([MemberRange("r", "group:g", "u", from_seq=11)], 10) == []
    assert logic.clip([(1, 10), (20, 30)], 5, 25) == [(6, 10), (20, 25)]
    assert logic.size([(6, 10), (20, 25)]) == 11


def test_group_change_opens_at_joining_and_closes_at_removal() -> None:
    opened, closed = logic.apply_group_change([], group_change(["a", "b"], ts=100), last_seq=7)
    assert {(r.user_id, r.from_seq, r.to_seq) for r in opened} == {("a", 8, None), ("b", 8, None)}
    assert closed == []
    _, closed = logic.apply_group_change(opened, group_change(["a"], ts=200), last_seq=12)
    assert [(r.user_id, r.from_seq, r.to_seq, r.closed_ts) for r in closed] == [("b", 8, 12, 200)]
    # the whole group deleted: everyone's range closes
    _, closed = logic.apply_group_change(opened, group_change(["a", "b"], ts=300, deleted=True), last_seq=15)
    assert sorted(r.user_id for r in closed) == ["a", "b"]


def test_group_change_ignores_stale_snapshots() -> None:
    opened, _ = logic.apply_group_change([], group_change(["a", "b"], ts=100), last_seq=0)
    old_before_join = group_change(["a"], ts=50)
    assert logic.apply_group_change(opened, old_before_join, last_seq=3) == ([], [])
    b_closed = [
        r if r.user_id == "a" else MemberRange(r.range_id, r.conversation, "b", 1, 3, 100, 200, r.joined_ts)
        for r in opened
    ]
    # the snapshot that still listed b, delivered again after b's removal
    assert logic.apply_group_change(b_closed, group_change(["a", "b"], ts=100), last_seq=3) == ([], [])


def test_chunk_frames_respects_the_byte_budget_and_order() -> None:
    frames = [msg(i, body="y" * 300).frame() for i in range(1, 21)]
    chunks = logic.chunk_frames(frames, 2000)
    assert [f["seq"] for c in chunks for f in c] == list(range(1, 21))
    assert all(sum(logic.frame_bytes(f) for f in c) <= 2000 for c in chunks)
    assert logic.chunk_frames([msg(1, body="z" * 5000).frame()], 100) == [[msg(1, body="z" * 5000).frame()]]


def test_connect_delivers_single_record() -> None:
    replay = logic.ConnectReplay(
        messages={"dm:a:b": [msg(3), msg(4)]}, last={"dm:a:b": 4, "dm:a:c": 9}, delivered={"dm:a:b": 2, "dm:a:c": 9}
    )
    [d] = logic.connect_delivers(replay, DeviceRef(user_id="a", device_id="a2"), "k", 10_000)
    assert d.initial and d.conn_id == "k" and d.sync == {"dm:a:b": 4, "dm:a:c": 9}
    assert [f["seq"] for f in d.frames] == [3, 4]


def test_connect_delivers_split_syncs_only_as_far_as_sent() -> None:
    body = "q" * 400
    replay = logic.ConnectReplay(
        messages={
            "dm:a:b": [msg(i, body=body) for i in range(5, 11)],
            "dm:a:c": [msg(i, "dm:a:c", body=body) for i in (2, 3)],
        },
        last={"dm:a:b": 12, "dm:a:c": 3, "dm:a:d": 1},
        delivered={"dm:a:b": 4, "dm:a:c": 1},
    )
    ds = logic.connect_delivers(replay, DeviceRef(user_id="a", device_id="a2"), "k", 1500)
    first = ds[0]
    assert first.initial and set(first.sync or {}) == {"dm:a:b", "dm:a:c", "dm:a:d"}
    assert first.sync["dm:a:b"] == first.frames[-1]["seq"]  # type: ignore[index]
    assert first.sync["dm:a:c"] == 1 and first.sync["dm:a:d"] == 1  # type: ignore[index]
    final: dict[str, int] = {}
    for d in ds:
        final.update(d.sync or {})
    assert final == {"dm:a:b": 12, "dm:a:c": 3, "dm:a:d": 1}
    sent = [(f["conversation"], f["seq"]) for d in ds for f in d.frames]
    assert sent == [("dm:a:b", s) for s in range(5, 11)] + [("dm:a:c", 2), ("dm:a:c", 3)]


def test_replay_turns_own_device_messages_into_acks() -> None:
    me = DeviceRef(user_id="a", device_id="a1")
    frames = [logic.message_or_ack(m, me) for m in (msg(1), msg(2, device="a9"), msg(3, sender="b", device="a1"))]
    assert [f["type"] for f in frames] == ["ack", "message", "message"]
    [d] = logic.replay_delivers("dm:a:b", [msg(1), msg(2, device="a9")], me, "k", 7, 10_000)
    assert d.sync == {"dm:a:b": 7} and not d.initial


def test_authorise_rules() -> None:
    assert logic.authorise_dm("a", "b", logic.KnownUser("b")) is None
    assert logic.authorise_dm("a", "b", None).code.value == "not_found"  # type: ignore[union-attr]
    assert logic.authorise_dm("a", "b", logic.KnownUser("b", deleted=True)).code.value == "not_found"  # type: ignore[union-attr]
    assert logic.authorise_dm("a", "a", logic.KnownUser("a")).code.value == "invalid_request"  # type: ignore[union-attr]
    snap = group_change(["a", "b"]).group
    assert logic.authorise_group("a", snap) is None
    assert logic.authorise_group("c", snap).code.value == "forbidden"  # type: ignore[union-attr]
    assert logic.authorise_group("a", None).code.value == "not_found"  # type: ignore[union-attr]

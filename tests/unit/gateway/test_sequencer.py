"""The per-socket sequencer (delivery protocol, point 4)."""

from __future__ import annotations

from typing import Any

from services.gateway.logic import MAX_BUFFERED, REPLAY_RETRY_S, ReplayAsk, Sequencer, frame_position

C = "dm:a:b"
G = "group:g1"


def msg(seq: int, conv: str = C) -> dict[str, Any]:
    return {"type": "message", "conversation": conv, "seq": seq, "body": f"m{seq}"}


def ack(seq: int, conv: str = C) -> dict[str, Any]:
    return {"type": "ack", "id": f"c{seq}", "conversation": conv, "seq": seq, "message_id": f"x{seq}", "ts": 1}


def seqs(frames: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(f["conversation"], f["seq"]) for f in frames]


def ready(sync: dict[str, int] | None = None, now: float = 0.0) -> Sequencer:
    s = Sequencer(now=now)
    out = s.deliver([], sync or {}, initial=True, now=now)
    assert out.frames == [] and out.asks == []
    return s


def test_frame_position_only_for_seq_carrying_frames() -> None:
    assert frame_position(msg(3)) == (C, 3)
    assert frame_position(ack(4)) == (C, 4)
    assert frame_position({"type": "typing", "conversation": C}) is None
    assert frame_position({"type": "message", "conversation": C, "seq": True}) is None
    assert frame_position({"type": "pong"}) is None


def test_before_initial_sync_seq_frames_are_buffered_and_others_written() -> None:
    s = Sequencer()
    typing = {"type": "typing", "conversation": C, "user_id": "a", "state": "start"}
    out = s.deliver([msg(5), typing, msg(6)])
    assert out.frames == [typing]
    assert out.asks == []
    assert s.buffered == 2
    assert not s.ready


def test_initial_sync_writes_replay_then_buffered_live_frames_in_order() -> None:
    s = Sequencer()
    s.deliver([msg(6)])  # live, arrived before the replay
    out = s.deliver([msg(3), msg(4), msg(5)], {C: 5}, initial=True)
    assert seqs(out.frames) == [(C, 3), (C, 4), (C, 5), (C, 6)]
    assert s.ready and s.hw[C] == 6 and s.buffered == 0
    assert out.asks == []


def test_initial_sync_drops_duplicates_of_replayed_frames() -> None:
    s = Sequencer()
    s.deliver([msg(4)])  # the same message arrives live and in the replay
    out = s.deliver([msg(3), msg(4)], {C: 4}, initial=True)
    assert seqs(out.frames) == [(C, 3), (C, 4)]


def test_buffered_ack_below_sync_is_written_not_dropped() -> None:
    # Persistence's replay leaves out the device's own messages (it gets acks); an ack
    # held back before the initial sync must still reach the socket.
    s = Sequencer()
    s.deliver([ack(7)])
    out = s.deliver([msg(6)], {C: 7}, initial=True)
    assert [(f["type"], f["seq"]) for f in out.frames] == [("message", 6), ("ack", 7)]
    assert s.hw[C] == 7


def test_split_replay_parts_before_initial_are_kept() -> None:
    s = Sequencer()
    assert s.deliver([msg(1), msg(2)]).frames == []  # first part, initial=False, no sync
    out = s.deliver([msg(3)], {C: 3, G: 9}, initial=True)
    assert seqs(out.frames) == [(C, 1), (C, 2), (C, 3)]
    assert s.hw == {C: 3, G: 9}


def test_initial_sync_with_nothing_pending_sets_high_water() -> None:
    s = ready({C: 10})
    out = s.deliver([msg(11)])
    assert seqs(out.frames) == [(C, 11)]


def test_initial_sync_asks_for_gap_left_in_buffer() -> None:
    s = Sequencer()
    s.deliver([msg(9)])
    out = s.deliver([], {C: 5}, initial=True, now=1.0)
    assert out.frames == []
    assert out.asks == [ReplayAsk(C, 5, 8)]


def test_consecutive_frame_is_written_at_once() -> None:
    s = ready({C: 2})
    out = s.deliver([msg(3)])
    assert seqs(out.frames) == [(C, 3)] and out.asks == []
    assert s.hw[C] == 3


def test_duplicates_are_dropped() -> None:
    s = ready({C: 2})
    s.deliver([msg(3)])
    out = s.deliver([msg(3), msg(2), msg(1)])
    assert out.frames == [] and out.asks == []


def test_new_conversation_starting_at_one_needs_no_replay() -> None:
    s = ready({})
    out = s.deliver([msg(1, G)])
    assert seqs(out.frames) == [(G, 1)] and out.asks == []


def test_unknown_conversation_beyond_one_is_buffered_and_asked_from_zero() -> None:
    s = ready({})
    out = s.deliver([msg(57, G)], now=2.0)
    assert out.frames == []
    assert out.asks == [ReplayAsk(G, 0, 56)]


def test_gap_buffers_and_asks_once() -> None:
    s = ready({C: 2})
    out = s.deliver([msg(5)], now=1.0)
    assert out.frames == [] and out.asks == [ReplayAsk(C, 2, 4)]
    # A frame inside the asked range does not ask again.
    out = s.deliver([msg(4)], now=1.1)
    assert out.frames == [] and out.asks == []


def test_gap_extending_beyond_asked_range_asks_again_from_high_water() -> None:
    s = ready({C: 2})
    s.deliver([msg(4)], now=1.0)  # asks (2, 3)
    out = s.deliver([msg(7)], now=1.1)
    assert out.asks == [ReplayAsk(C, 2, 6)]


def test_replay_answer_fills_gap_and_flushes_buffered_consecutive_frames() -> None:
    s = ready({C: 2})
    s.deliver([msg(5), msg(6)], now=1.0)
    out = s.deliver([msg(3), msg(4)], {C: 4}, now=1.2)
    assert seqs(out.frames) == [(C, 3), (C, 4), (C, 5), (C, 6)]
    assert s.hw[C] == 6 and s.buffered == 0 and s.asked == {}


def test_replay_answer_without_frames_skips_invisible_range() -> None:
    # A group member who joined late: the missing seqs are not visible; sync still says up_to.
    s = ready({})
    s.deliver([msg(40, G)], now=1.0)
    out = s.deliver([], {G: 39}, now=1.1)
    assert seqs(out.frames) == [(G, 40)]


def test_sync_drops_buffered_frames_at_or_below_high_water() -> None:
    s = ready({C: 2})
    s.deliver([msg(3)])
    s.deliver([msg(6)], now=1.0)
    out = s.deliver([msg(3), msg(4), msg(5)], {C: 5}, now=1.1)
    assert seqs(out.frames) == [(C, 4), (C, 5), (C, 6)]


def test_partial_answer_asks_for_the_rest() -> None:
    s = ready({C: 2})
    s.deliver([msg(8)], now=1.0)  # asks (2, 7)
    s.asked[C] = (4, 1.0)  # pretend the outstanding ask only reached 4
    out = s.deliver([msg(3), msg(4)], {C: 4}, now=1.5)
    assert seqs(out.frames) == [(C, 3), (C, 4)]
    assert out.asks == [ReplayAsk(C, 4, 7)]


def test_ask_again_after_retry_interval_if_gap_still_open() -> None:
    s = ready({C: 2})
    s.deliver([msg(5)], now=10.0)
    assert s.tick(10.0 + REPLAY_RETRY_S - 0.1).asks == []
    out = s.tick(10.0 + REPLAY_RETRY_S)
    assert out.asks == [ReplayAsk(C, 2, 4)]
    # and not again right after
    assert s.tick(10.0 + REPLAY_RETRY_S + 0.1).asks == []


def test_no_retry_once_gap_filled() -> None:
    s = ready({C: 2})
    s.deliver([msg(4)], now=0.0)
    s.deliver([msg(3)], now=0.5)
    assert s.asked == {}
    assert s.tick(100.0).asks == []


def test_conversations_are_independent() -> None:
    s = ready({C: 1, G: 1})
    out = s.deliver([msg(3, C), msg(2, G)], now=1.0)
    assert seqs(out.frames) == [(G, 2)]
    assert out.asks == [ReplayAsk(C, 1, 2)]


def test_ack_and_messages_share_the_order() -> None:
    s = ready({C: 1})
    out = s.deliver([ack(3)], now=1.0)  # seq 2 (from the other side) is missing
    assert out.frames == [] and out.asks == [ReplayAsk(C, 1, 2)]
    out = s.deliver([msg(2)])
    assert [(f["type"], f["seq"]) for f in out.frames] == [("message", 2), ("ack", 3)]


def test_initial_sync_overdue_asks_for_resync_with_backoff() -> None:
    s = Sequencer(now=0.0, initial_retry_s=10.0)
    assert not s.tick(9.9).resync
    assert s.tick(10.0).resync
    assert not s.tick(29.9).resync
    assert s.tick(30.0).resync  # then 20 s later
    assert not s.tick(69.9).resync
    assert s.tick(70.0).resync  # then 40 s later
    assert s.tick(130.0).resync  # capped at 60 s
    s.deliver([], {}, initial=True)
    assert not s.tick(1000.0).resync


def test_overflow_when_too_much_is_held_back() -> None:
    s = Sequencer(max_buffered=3)
    assert not s.deliver([msg(1), msg(2), msg(3)]).overflow
    assert s.deliver([msg(4)]).overflow


def test_default_buffer_limit_is_generous() -> None:
    assert MAX_BUFFERED >= 1000


def test_a_second_initial_sync_only_adds_what_is_missing() -> None:
    # Persistence's catch-up replay after a connect repeats what was sent and adds what
    # was stored while the routers' session view lagged.
    s = Sequencer(now=0.0)
    out = s.deliver([msg(1), msg(2)], {C: 2}, initial=True, now=5.0)
    assert [f["seq"] for f in out.frames] == [1, 2]
    out = s.deliver([msg(1), msg(2), msg(3)], {C: 3}, initial=True, now=6.0)
    assert [f["seq"] for f in out.frames] == [3]
    assert s.hw[C] == 3


def test_gap_is_asked_for_only_after_the_grace_period() -> None:
    s = Sequencer(now=0.0, gap_grace_s=0.3)
    s.deliver([], {C: 2}, initial=True, now=0.0)
    # seq 4 overtook seq 3 (an own ack is one hop, a peer's message two): no ask yet.
    out = s.deliver([ack(4)], now=1.0)
    assert out.frames == [] and out.asks == []
    assert s.tick(1.2).asks == []
    # seq 3 arrives within the grace: both written in order, nothing asked, gap forgotten.
    out = s.deliver([msg(3)], now=1.25)
    assert seqs(out.frames) == [(C, 3), (C, 4)] and out.asks == []
    assert s.gaps == {} and s.tick(5.0).asks == []


def test_gap_still_open_after_the_grace_is_asked_for_by_tick() -> None:
    s = Sequencer(now=0.0, gap_grace_s=0.3)
    s.deliver([], {C: 2}, initial=True, now=0.0)
    assert s.deliver([msg(5)], now=1.0).asks == []
    assert s.tick(1.29).asks == []
    assert s.tick(1.3).asks == [ReplayAsk(C, 2, 4)]
    assert s.tick(1.4).asks == []  # asked once; re-asked only after REPLAY_RETRY_S

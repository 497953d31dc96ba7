"""The open-loop plan: evenly spaced from one t0, senders in turn, cut per worker in time order."""

from __future__ import annotations

import itertools

from bench.schedule import open_loop, split

T0 = 1_000_000_000_000


def test_rate_times_seconds_messages_evenly_spaced_from_t0() -> None:
    plan = open_loop(200, 1.5, list(range(10)), T0)
    assert len(plan) == 300
    assert [p.i for p in plan] == list(range(300))
    assert plan[0].at_ns == T0
    gaps = {b.at_ns - a.at_ns for a, b in itertools.pairwise(plan)}
    assert gaps == {5_000_000}  # 1/200 s


def test_each_sender_sends_in_turn_at_the_lowest_per_socket_rate() -> None:
    senders = list(range(100))
    plan = open_loop(1000, 2, senders, T0)
    by_sender: dict[int, list[int]] = {}
    for p in plan:
        by_sender.setdefault(p.sender, []).append(p.at_ns)
    assert set(by_sender) == set(senders)
    assert {len(v) for v in by_sender.values()} == {20}
    # Every socket sends every 100/1000 s, never in a burst.
    for times in by_sender.values():
        assert {b - a for a, b in itertools.pairwise(times)} == {100_000_000}
    # Consecutive messages come from different sockets.
    assert all(a.sender != b.sender for a, b in itertools.pairwise(plan))


def test_same_seed_same_plan() -> None:
    assert open_loop(50, 1, [1, 2, 3], T0) == open_loop(50, 1, [1, 2, 3], T0)


def test_nothing_to_plan() -> None:
    assert open_loop(0, 10, [1, 2], T0) == []
    assert open_loop(10, 10, [], T0) == []


def test_split_by_owner_keeps_time_order() -> None:
    plan = open_loop(100, 1, list(range(8)), T0)
    parts = split(plan, lambda sender: sender % 3)
    assert set(parts) == {0, 1, 2}
    assert sorted(p.i for part in parts.values() for p in part) == [p.i for p in plan]
    for owner, part in parts.items():
        assert all(p.sender % 3 == owner for p in part)
        assert [p.at_ns for p in part] == sorted(p.at_ns for p in part)

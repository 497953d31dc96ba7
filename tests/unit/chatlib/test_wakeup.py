"""Fetch wake-ups: doorbells registered per topic, rings naming the record, and what a consumer waits for."""

from __future__ import annotations

import os
import time
from pathlib import Path

from chatlib.wakeup import Doorbell, FetchWait, Pending, Ring, Ringer


def test_a_ring_reaches_every_doorbell_of_its_topic_and_names_the_record(tmp_path: Path) -> None:
    a = Doorbell(tmp_path, ["t1", "t2"])
    b = Doorbell(tmp_path, ["t1"])
    c = Doorbell(tmp_path, ["t3"])
    ringer = Ringer(tmp_path)
    try:
        ringer.ring("t1", 2, 41)
        ringer.ring("t2", 0, 7)
        assert a.wait(1) == [Ring("t1", 2, 41), Ring("t2", 0, 7)]
        assert b.wait(1) == [Ring("t1", 2, 41)]
        assert c.wait(0.05) == []  # not its topic: it sleeps out its wait
    finally:
        for bell in (a, b, c):
            bell.close()


def test_a_wait_drains_every_pending_ring_at_once(tmp_path: Path) -> None:
    bell = Doorbell(tmp_path, ["t"])
    ringer = Ringer(tmp_path)
    try:
        for offset in range(5):
            ringer.ring("t", 0, offset)
        assert [r.offset for r in bell.wait(1)] == [0, 1, 2, 3, 4]
        assert bell.wait(0.05) == []
    finally:
        bell.close()


def test_a_gone_doorbell_is_unregistered_by_the_next_ring(tmp_path: Path) -> None:
    bell = Doorbell(tmp_path, ["t"])
    ringer = Ringer(tmp_path)
    # Its process died: the socket is gone but the registration file was left behind.
    bell._sock.close()
    assert os.listdir(tmp_path / "t") == [bell.id]
    ringer.ring("t", 0, 1)
    assert os.listdir(tmp_path / "t") == []


def test_close_removes_the_registration_and_wake_interrupts_a_wait(tmp_path: Path) -> None:
    bell = Doorbell(tmp_path, ["t"])
    bell.wake()
    assert bell.wait(5) == []  # woken (a bare wake-up names no record), not timed out
    bell.close()
    assert os.listdir(tmp_path / "t") == []


def test_pending_keeps_fetching_until_the_announced_record_is_read() -> None:
    p = Pending(grace_s=0.5)
    p.announce("t", 0, 10, now=0.0)
    assert p.outstanding(0.1)
    p.read("t", 0, 10)  # read up to offset 9: offset 10 still missing
    assert p.outstanding(0.1)
    p.read("t", 0, 11)
    assert not p.outstanding(0.1)


def test_pending_ignores_a_ring_for_a_record_already_read() -> None:
    p = Pending()
    p.read("t", 3, 100)
    p.announce("t", 3, 99, now=0.0)  # the fetch under way when it was rung found it
    assert not p.outstanding(0.0)


def test_pending_gives_up_on_a_record_that_never_comes() -> None:
    p = Pending(grace_s=0.5)
    p.announce("t", 1, 5, now=0.0)  # e.g. its partition went to another group member
    assert p.outstanding(0.4)
    assert not p.outstanding(0.6)


def test_pending_tracks_the_highest_announced_offset_per_partition() -> None:
    p = Pending()
    p.announce("t", 0, 3, now=0.0)
    p.announce("t", 0, 9, now=0.0)
    p.announce("t", 0, 5, now=0.0)
    p.read("t", 0, 6)
    assert p.outstanding(0.0)
    p.read("t", 0, 10)
    assert not p.outstanding(0.0)


def test_a_ring_that_is_not_one_decodes_to_nothing() -> None:
    assert Ring.decode(b"") is None
    assert Ring.decode(b"t x y") is None
    assert Ring.decode(Ring("a.b.v1", 1, 2).encode()) == Ring("a.b.v1", 1, 2)


def test_a_consumer_reading_one_kind_of_key_is_rung_only_for_those_records(tmp_path: Path) -> None:
    dms = Doorbell(tmp_path, ["stored"], {"stored": b"dm:"})
    groups = Doorbell(tmp_path, ["stored"], {"stored": b"group:"})
    every = Doorbell(tmp_path, ["stored"])
    ringer = Ringer(tmp_path)
    try:
        ringer.ring("stored", 0, 1, b"dm:a:b")
        ringer.ring("stored", 0, 2, b"group:g1")
        ringer.ring("stored", 0, 3, None)
        assert [r.offset for r in dms.wait(1)] == [1]
        assert [r.offset for r in groups.wait(1)] == [2]
        assert [r.offset for r in every.wait(1)] == [1, 2, 3]
    finally:
        for bell in (dms, groups, every):
            bell.close()


def test_the_fetch_wait_doubles_on_a_miss_and_narrows_after_a_quiet_spell() -> None:
    w = FetchWait(floor_ms=1, cap_ms=16, decay_s=30)
    for expected in (2, 4, 8, 16, 16):
        w.missed(now=0.0)
        assert w.ms == expected
    assert not w.tick(now=10.0)  # not quiet long enough
    assert w.tick(now=31.0) and w.ms == 12
    assert w.tick(now=62.0) and w.ms == 9
    w.missed(now=63.0)
    assert w.ms == 16


def test_the_fetch_wait_never_narrows_below_its_floor() -> None:
    w = FetchWait(floor_ms=1, decay_s=1)
    w.missed(now=0.0)
    for t in range(2, 20, 2):
        w.tick(now=float(t))
    assert w.ms == 1


def test_positions_and_high_watermarks_are_read_from_the_consumers_state() -> None:
    from types import SimpleNamespace

    from chatlib.kafka import _positions
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    def state(high: int | None, position: int | None) -> SimpleNamespace:
        pos = None if position is None else OffsetAndMetadata(position, "", -1)
        return SimpleNamespace(highwater=high, has_valid_position=pos is not None, position=pos)

    a, b, c, d = (TopicPartition("t", p) for p in range(4))
    consumer = SimpleNamespace(
        _subscription=SimpleNamespace(
            assignment={a: state(10, 7), b: state(5, 5), c: state(None, 3), d: state(9, None)}
        )
    )
    # a has records past its position, b is read up to its high watermark, c was never
    # fetched (no high watermark yet); d has no position yet, so it is left out.
    assert _positions(consumer) == [(a, 7, 10), (b, 5, 5), (c, 3, None)]  # type: ignore[arg-type]
    assert _positions(SimpleNamespace()) == []  # type: ignore[arg-type]


def test_an_announcement_outlives_the_empty_fetches_that_widen_the_wait_to_its_cap() -> None:
    from chatlib.wakeup import FetchWait

    # A broker that needs the widest wait to find the records: every fetch until then comes
    # back empty after its full wait, and the consumer must still be fetching when it gets there.
    wait, spent = FetchWait(floor_ms=1), 0.0
    while wait.ms < wait.cap_ms:
        spent += wait.ms / 1000
        wait.missed(spent)
    p = Pending()
    p.announce("t", 0, 7, now=0.0)
    assert p.outstanding(spent + wait.cap_ms / 1000)


def test_a_consumer_is_current_only_when_every_owned_partition_is_read_to_its_high_watermark() -> None:
    from types import SimpleNamespace

    from chatlib.kafka import ConsumerWorker
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    a, b = TopicPartition("t", 0), TopicPartition("t", 1)

    def consumer(states: dict[TopicPartition, tuple[int | None, int | None]]) -> SimpleNamespace:
        assignment = {
            tp: SimpleNamespace(
                highwater=high,
                has_valid_position=pos is not None,
                position=None if pos is None else OffsetAndMetadata(pos, "", -1),
            )
            for tp, (high, pos) in states.items()
        }
        return SimpleNamespace(_subscription=SimpleNamespace(assignment=assignment))

    current = ConsumerWorker._is_current
    quiet = Pending()
    assert current(consumer({a: (5, 5), b: (0, 0)}), {a, b}, quiet)  # type: ignore[arg-type]
    assert not current(consumer({a: (5, 4), b: (0, 0)}), {a, b}, quiet)  # type: ignore[arg-type]
    assert not current(consumer({a: (None, 0), b: (0, 0)}), {a, b}, quiet)  # never fetched  # type: ignore[arg-type]
    assert not current(consumer({a: (5, 5), b: (3, None)}), {a, b}, quiet)  # no position yet  # type: ignore[arg-type]
    assert not current(consumer({}), set(), quiet)  # a group still joining  # type: ignore[arg-type]
    rung = Pending()
    rung.announce("t", 0, 5, now=time.monotonic())  # a producer rang for offset 5: not read yet
    assert not current(consumer({a: (5, 5), b: (0, 0)}), {a, b}, rung)  # type: ignore[arg-type]

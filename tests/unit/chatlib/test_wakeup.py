"""Fetch wake-ups: doorbells registered per topic, rings naming the record, and what a consumer waits for."""

from __future__ import annotations

import os
from pathlib import Path

from chatlib.wakeup import Doorbell, Pending, Ring, Ringer


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

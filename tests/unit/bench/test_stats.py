"""Latency summaries: nearest-rank percentiles, and messages that never arrived ranked last."""

from __future__ import annotations

from bench.stats import percentile, summary, times_floor


def test_nearest_rank_returns_a_measured_value() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 99.9) == 100.0
    assert percentile([3.0, 7.0], 50) == 3.0  # never interpolated to 5


def test_missing_messages_rank_above_every_measured_one() -> None:
    values = [float(v) for v in range(1, 100)]  # 99 arrived, 1 never did
    assert percentile(values, 50, missing=1) == 50.0
    assert percentile(values, 99, missing=1) == 99.0
    assert percentile(values, 99.9, missing=1) is None  # falls on the missing one
    # Half of them lost: the median itself is unknown, not the median of the survivors.
    assert percentile([1.0, 2.0], 50, missing=3) is None


def test_no_samples_at_all() -> None:
    assert percentile([], 50) is None
    s = summary([])
    assert s["n"] == 0 and s["p50"] is None and s["max"] is None and s["mean"] is None


def test_summary_counts_and_max() -> None:
    s = summary([5.0, 1.0, 3.0])
    assert s == {"n": 3, "missing": 0, "p50": 3.0, "p99": 5.0, "p99.9": 5.0, "max": 5.0, "mean": 3.0}
    lossy = summary([5.0, 1.0, 3.0], missing=1)
    assert lossy["missing"] == 1 and lossy["max"] is None and lossy["p50"] == 3.0 and lossy["p99"] is None


def test_multiple_of_the_floor() -> None:
    assert times_floor(35.0, 1.4) == 25.0
    assert times_floor(None, 1.4) is None
    assert times_floor(35.0, None) is None
    assert times_floor(35.0, 0.0) is None

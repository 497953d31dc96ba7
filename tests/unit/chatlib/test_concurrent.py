"""run_together: independent calls at the same time, results in order, failures raised after all ran."""

from __future__ import annotations

import threading

import pytest
from chatlib.concurrent import run_together


def test_calls_overlap_and_results_come_back_in_call_order() -> None:
    both_started = threading.Barrier(2, timeout=5)

    def first() -> str:
        both_started.wait()  # only passes if the second call runs at the same time
        return "a"

    def second() -> str:
        both_started.wait()
        return "b"

    assert run_together(first, second) == ["a", "b"]


def test_a_failure_is_raised_after_every_call_finished() -> None:
    done: list[str] = []

    def fails() -> None:
        raise ValueError("boom")

    def slow() -> None:
        done.append("slow")

    with pytest.raises(ValueError, match="boom"):
        run_together(fails, slow)
    assert done == ["slow"]


def test_one_call_runs_inline() -> None:
    assert run_together(lambda: threading.current_thread()) == [threading.current_thread()]

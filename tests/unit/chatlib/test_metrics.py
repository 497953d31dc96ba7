"""Shared metrics: remembered labeled children count into the same series."""

from __future__ import annotations

from chatlib import metrics
from prometheus_client import REGISTRY


def test_child_is_the_labeled_series_and_is_remembered() -> None:
    labels = {"direction": "out", "type": "test_child_frame"}
    before = REGISTRY.get_sample_value("ws_frames_total", labels) or 0
    one = metrics.child(metrics.WS_FRAMES, "out", "test_child_frame")
    assert metrics.child(metrics.WS_FRAMES, "out", "test_child_frame") is one
    one.inc()
    metrics.WS_FRAMES.labels("out", "test_child_frame").inc()
    assert REGISTRY.get_sample_value("ws_frames_total", labels) == before + 2
    assert metrics.child(metrics.WS_FRAMES, "in", "test_child_frame") is not one

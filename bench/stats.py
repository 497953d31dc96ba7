"""Latency summaries that count what never arrived.

An open-loop benchmark must not drop the messages that were too slow to
arrive before the phase ended: dropping them would make an overloaded
system look faster than a healthy one. :func:`summary` therefore takes the
number of missing samples and ranks them above every measured one (as if
their latency were infinite); a percentile that falls on them is ``None``,
shown as "> budget" in the report.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

#: The percentiles every latency figure reports.
PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 50.0), ("p99", 99.0), ("p99.9", 99.9))


def percentile(sorted_values: Sequence[float], p: float, missing: int = 0) -> float | None:
    """Nearest-rank percentile ``p`` (0-100) of ``sorted_values`` plus ``missing`` infinite samples.

    Nearest rank (the smallest value with at least p % of the samples at or
    below it) never interpolates between two samples, so every figure is a
    latency that was actually measured. ``None`` when the rank falls on a
    missing sample or when there are no samples at all.
    """
    n = len(sorted_values) + missing
    if n == 0:
        return None
    rank = max(1, math.ceil(p / 100 * n))
    if rank > len(sorted_values):
        return None
    return sorted_values[rank - 1]


def summary(values_ms: Iterable[float], missing: int = 0) -> dict[str, float | int | None]:
    """n, missing, p50, p99, p99.9, max and mean (ms, 0.01 ms resolution).

    ``max`` is ``None`` as soon as one sample is missing; ``mean`` is over
    the measured samples only. Nothing is ever NaN (the figures go to JSON).
    """
    values = sorted(values_ms)
    out: dict[str, float | int | None] = {"n": len(values), "missing": missing}
    for name, p in PERCENTILES:
        out[name] = _round(percentile(values, p, missing))
    out["max"] = _round(values[-1]) if values and not missing else None
    out["mean"] = _round(statistics.fmean(values)) if values else None
    return out


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def times_floor(value: float | None, floor_p50: float | None) -> float | None:
    """``value`` as a multiple of the echo floor's p50 (one decimal), if both are known."""
    if value is None or floor_p50 is None or floor_p50 <= 0:
        return None
    return round(value / floor_p50, 1)

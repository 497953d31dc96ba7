"""The open-loop send plan: when each message is due, and from which socket.

Every worker process gets the part of one common plan that its sockets send.
Planned times are absolute ``CLOCK_MONOTONIC`` nanoseconds from one ``t0``
(the clock is system-wide, so a recipient in another process can subtract
the planned time it finds in the message from its own arrival time). A
sender that falls behind still stamps the *planned* time, so a stalled
system is charged for the wait (no coordinated omission).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Planned:
    """Message ``i`` of a phase: due at ``at_ns``, sent by socket ``sender``."""

    i: int
    at_ns: int
    sender: int


def open_loop(rate: float, seconds: float, senders: Sequence[int], t0_ns: int, seed: int = 1) -> list[Planned]:
    """``rate`` messages per second for ``seconds``, evenly spaced from ``t0_ns``.

    Senders take turns in one shuffled order, so each socket sends exactly
    every ``len(senders) / rate`` seconds: the per-socket rate is as low as
    the total allows (the gateway limits frames per socket), and consecutive
    messages come from different sockets, processes and gateways.
    """
    if rate <= 0 or seconds <= 0 or not senders:
        return []
    order = list(senders)
    random.Random(seed).shuffle(order)
    count = round(rate * seconds)
    step = 1e9 / rate
    return [Planned(i, t0_ns + round(i * step), order[i % len(order)]) for i in range(count)]


def split(plan: Sequence[Planned], owner_of: Callable[[int], int]) -> dict[int, list[Planned]]:
    """The plan cut by owner (worker index of each sender), each part in time order."""
    parts: dict[int, list[Planned]] = {}
    for p in plan:
        parts.setdefault(owner_of(p.sender), []).append(p)
    for part in parts.values():
        part.sort(key=lambda p: p.at_ns)
    return parts

"""CPU time of process trees from /proc, between two snapshots.

Each process of the stack is a tree: an Nginx master and its workers, a
service's gunicorn master and its worker, the load generator's workers. A
phase's CPU for one tree is the sum, over the tree, of ``utime + stime``
(user and system time of every thread) plus ``cutime + cstime`` (children
that exited and were reaped), taken after the phase minus before it. Counting
reaped children keeps a worker that exits mid-phase: its time moves from its
own line to its parent's ``cutime`` and the sum does not drop.

The parsing and the tree arithmetic are pure functions over snapshots, so
they are tested without running processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    """One process's line in /proc/<pid>/stat, the fields that matter here (times in clock ticks)."""

    pid: int
    ppid: int
    comm: str
    ticks: int  # utime + stime of every thread of the process
    child_ticks: int  # cutime + cstime: reaped children
    start: int  # start time (ticks after boot): tells a reused pid apart


Snapshot = Mapping[int, ProcStat]


def parse_stat(text: str) -> ProcStat:
    """Parse /proc/<pid>/stat. ``comm`` may hold spaces and parentheses: split at the last ')'."""
    head, _, rest = text.rpartition(")")
    pid_s, _, comm = head.partition(" (")
    f = rest.split()
    # f[0] is field 3 (state) of proc(5): ppid is field 4, utime..cstime 14-17, starttime 22.
    return ProcStat(
        pid=int(pid_s),
        ppid=int(f[1]),
        comm=comm,
        ticks=int(f[11]) + int(f[12]),
        child_ticks=int(f[13]) + int(f[14]),
        start=int(f[19]),
    )


def snapshot(proc: Path = Path("/proc")) -> dict[int, ProcStat]:
    """Every process on the machine now (processes that vanish while reading are skipped)."""
    out: dict[int, ProcStat] = {}
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            st = parse_stat((proc / entry.name / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue
        out[st.pid] = st
    return out


def parse_machine_busy(text: str) -> int:
    """Busy clock ticks of all CPUs from /proc/stat's first line (everything but idle and iowait).

    Guest time is already inside user time, so it is not added again.
    """
    f = text.split("\n", 1)[0].split()
    if f[0] != "cpu":
        raise ValueError("not /proc/stat")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[1:9])
    return user + nice + system + irq + softirq + steal


def machine_busy(proc: Path = Path("/proc")) -> int:
    """Busy ticks of the whole machine so far: with the trees, tells what *other* processes used."""
    return parse_machine_busy((proc / "stat").read_text())


def children_map(snap: Snapshot) -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for st in snap.values():
        kids.setdefault(st.ppid, []).append(st.pid)
    return kids


def tree(snap: Snapshot, root: int) -> list[int]:
    """``root`` and all its descendants present in ``snap`` (empty if ``root`` is not)."""
    if root not in snap:
        return []
    kids = children_map(snap)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def tree_ticks(snap: Snapshot, root: int, reaped: bool = True) -> int:
    """Clock ticks of ``root``'s tree: every member's own time, plus reaped children's if ``reaped``."""
    total = 0
    for pid in tree(snap, root):
        st = snap[pid]
        total += st.ticks + (st.child_ticks if reaped else 0)
    return total


def own_ticks(snap: Snapshot, pids: Iterable[int]) -> dict[int, int]:
    """Each process's own ticks (no children), for the processes present in ``snap``."""
    return {pid: snap[pid].ticks for pid in pids if pid in snap}


def tree_seconds(before: Snapshot, after: Snapshot, roots: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds of each named tree between two snapshots.

    Members present in ``after`` but not in ``before`` (started during the
    phase) count from zero. A root that is gone in ``after`` gives 0: its
    time went to a parent outside the tree, and the report shows the zero
    rather than a negative figure.
    """
    out: dict[str, float] = {}
    for name, root in roots.items():
        if root not in after:
            out[name] = 0.0
            continue
        end = 0
        start = 0
        for pid in tree(after, root):
            a = after[pid]
            end += a.ticks + a.child_ticks
            b = before.get(pid)
            if b is not None and b.start == a.start:
                start += b.ticks + b.child_ticks
        # Members alive before but gone after were reaped inside the tree: their time
        # is now in a parent's child_ticks, so their "before" must be subtracted too.
        alive_after = {(pid, after[pid].start) for pid in tree(after, root)}
        for pid in tree(before, root):
            b = before[pid]
            if (pid, b.start) not in alive_after:
                start += b.ticks + b.child_ticks
        out[name] = max(0.0, (end - start) / CLK_TCK)
    return out


def split_seconds(before: Snapshot, after: Snapshot, root: int) -> dict[str, float]:
    """A tree's seconds split into the root itself ("master") and its descendants ("workers")."""
    own = 0
    if root in after and root in before:
        own = after[root].ticks - before[root].ticks
    total = tree_seconds(before, after, {"all": root})["all"]
    return {"master": own / CLK_TCK, "workers": max(0.0, total - own / CLK_TCK)}


def busiest(before: Snapshot, after: Snapshot, pids: Iterable[int]) -> list[tuple[int, float]]:
    """``pids`` by their own CPU seconds between the snapshots, busiest first."""
    rows = []
    for pid in pids:
        a, b = after.get(pid), before.get(pid)
        if a is None or b is None or a.start != b.start:
            continue
        rows.append((pid, (a.ticks - b.ticks) / CLK_TCK))
    rows.sort(key=lambda r: r[1], reverse=True)
    return rows

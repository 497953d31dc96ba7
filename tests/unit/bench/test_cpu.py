"""CPU accounting over process trees: /proc parsing and the arithmetic between two snapshots."""

from __future__ import annotations

import os
import subprocess
import sys

from bench import cpu
from bench.cpu import ProcStat, busiest, parse_stat, split_seconds, tree, tree_seconds

T = cpu.CLK_TCK


def p(pid: int, ppid: int, ticks: int, child: int = 0, start: int = 100) -> ProcStat:
    return ProcStat(pid=pid, ppid=ppid, comm=f"p{pid}", ticks=ticks, child_ticks=child, start=start)


def snap(*procs: ProcStat) -> dict[int, ProcStat]:
    return {x.pid: x for x in procs}


def test_parse_stat_with_a_command_name_holding_spaces_and_parentheses() -> None:
    line = (
        "4242 (nginx: worker (x) ) S 4241 4241 4241 0 -1 4194560 1 0 0 0 "
        "700 300 50 25 20 0 1 0 123456 1000 10 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0"
    )
    st = parse_stat(line)
    assert st == ProcStat(pid=4242, ppid=4241, comm="nginx: worker (x) ", ticks=1000, child_ticks=75, start=123456)


def test_a_tree_sums_the_master_and_its_workers() -> None:
    before = snap(p(10, 1, 100), p(11, 10, 500), p(12, 10, 50), p(20, 1, 7))
    after = snap(p(10, 1, 100 + T), p(11, 10, 500 + 3 * T), p(12, 10, 50 + T), p(20, 1, 7 + 9 * T))
    assert sorted(tree(after, 10)) == [10, 11, 12]
    assert tree_seconds(before, after, {"nginx": 10, "other": 20}) == {"nginx": 5.0, "other": 9.0}
    assert split_seconds(before, after, 10) == {"master": 1.0, "workers": 4.0}


def test_a_worker_started_during_the_phase_counts_from_zero() -> None:
    before = snap(p(10, 1, 0))
    after = snap(p(10, 1, 0), p(13, 10, 2 * T))
    assert tree_seconds(before, after, {"svc": 10}) == {"svc": 2.0}


def test_a_worker_that_exited_keeps_its_time_through_the_parent() -> None:
    # The worker had used 1 s before; it used 2 s more, exited and was reaped: its total
    # 3 s is now in the master's child ticks, and the phase is charged only the 2 s.
    before = snap(p(10, 1, 0), p(11, 10, 1 * T))
    after = snap(p(10, 1, 0, child=3 * T))
    assert tree_seconds(before, after, {"svc": 10}) == {"svc": 2.0}


def test_a_reused_pid_is_a_new_process() -> None:
    before = snap(p(10, 1, 0), p(11, 10, 5 * T, start=100))
    after = snap(p(10, 1, 0, child=6 * T), p(11, 10, 1 * T, start=900))
    # Old 11: 5 s before, 6 s at exit -> 1 s in the phase; new 11: 1 s.
    assert tree_seconds(before, after, {"svc": 10}) == {"svc": 2.0}


def test_a_root_that_is_gone_reports_zero() -> None:
    assert tree_seconds(snap(p(10, 1, 5)), snap(), {"svc": 10}) == {"svc": 0.0}


def test_busiest_ranks_own_time_and_skips_new_or_reused_pids() -> None:
    before = snap(p(10, 1, 0), p(11, 1, 0), p(12, 1, 0, start=1))
    after = snap(p(10, 1, T), p(11, 1, 3 * T), p(12, 1, 9 * T, start=2), p(13, 1, 9 * T))
    assert busiest(before, after, [10, 11, 12, 13]) == [(11, 3.0), (10, 1.0)]


def test_the_live_snapshot_sees_this_process_and_its_child() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        now = cpu.snapshot()
        assert now[os.getpid()].ppid == os.getppid()
        assert child.pid in tree(now, os.getpid())
        assert tree_seconds(now, cpu.snapshot(), {"me": os.getpid()})["me"] >= 0
    finally:
        child.kill()
        child.wait()


def test_machine_busy_time_leaves_out_idle_and_iowait() -> None:
    stat = "cpu  100 20 30 5000 70 4 6 8 50 0\ncpu0 50 10 15 2500 35 2 3 4 25 0\n"
    assert cpu.parse_machine_busy(stat) == 100 + 20 + 30 + 4 + 6 + 8
    assert cpu.machine_busy() > 0

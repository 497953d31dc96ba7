"""The supervision policy of `make run` (helper.supervisor), on a fake clock and fake processes:
what is said, when a process is started again, and when the system gives up."""

from __future__ import annotations

from pathlib import Path

from helper.supervisor import Policy, Recipe, Supervisor, describe_exit


class FakeProc:
    """A process that is alive until the test ends it."""

    pids = iter(range(100, 10_000))

    def __init__(self, name: str):
        self.name = name
        self.log = Path(f"/var/log/{name}.log")
        self.pid: int | None = None
        self.returncode: int | None = None
        self.started = False

    def start(self) -> None:
        self.started = True
        self.pid = next(self.pids)

    def alive(self) -> bool:
        return self.started and self.returncode is None

    def kill(self) -> None:
        self.returncode = -9


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    """A supervisor watching one process, with everything it says and starts recorded."""

    def __init__(self, policy: Policy | None = None, ready: bool = True):
        self.clock = Clock()
        self.lines: list[str] = []
        self.started: list[FakeProc] = []
        self.ready = ready
        self.sup = Supervisor(self.lines.append, policy, clock=self.clock, on_start=lambda _n, _p: None)
        self.proc = FakeProc("persistence")
        self.proc.start()
        self.sup.watch("persistence", self.proc, Recipe(self.make, lambda: self.ready))

    def make(self) -> FakeProc:
        proc = FakeProc("persistence")
        self.started.append(proc)
        return proc

    def current(self) -> FakeProc:
        proc = self.sup.watched["persistence"].proc
        assert isinstance(proc, FakeProc)
        return proc

    def advance(self, seconds: float) -> str | None:
        self.clock.now += seconds
        return self.sup.tick()


def test_a_killed_process_is_started_again_after_a_second_and_the_console_says_so() -> None:
    rig = Rig()
    assert rig.sup.tick() is None and rig.lines == []
    rig.proc.kill()
    assert rig.advance(0.1) is None
    assert rig.lines == ["persistence exited (signal 9); restarting in 1 s"]
    assert rig.advance(0.5) is None and rig.started == []  # still backing off
    assert rig.advance(0.6) is None
    assert len(rig.started) == 1 and rig.current().alive()
    assert rig.advance(0.2) is None  # ready: said once
    assert rig.lines[-1].startswith(f"persistence is back (pid {rig.current().pid}, ready ")


def test_the_backoff_doubles_while_a_process_keeps_dying_soon_after_its_start() -> None:
    rig = Rig(Policy(max_exits=10))
    delays = []
    for _ in range(6):
        rig.current().kill()
        rig.advance(0.1)
        delays.append(rig.lines[-1].rsplit("restarting in ", 1)[1])
        rig.advance(20)  # past any backoff: started again
        rig.advance(0.1)  # ready
    assert delays == ["1 s", "2 s", "4 s", "8 s", "16 s", "16 s"]


def test_a_process_that_stayed_up_starts_its_backoff_over() -> None:
    rig = Rig(Policy(stable_s=30, max_exits=10))
    for _ in range(3):
        rig.current().kill()
        rig.advance(0.1)
        rig.advance(20)
        rig.advance(0.1)
    assert rig.lines[-2].endswith("restarting in 4 s")
    rig.advance(31)  # a long quiet spell
    rig.current().kill()
    rig.advance(0.1)
    assert rig.lines[-1] == "persistence exited (signal 9); restarting in 1 s"


def test_a_process_that_keeps_crashing_stops_the_system_with_its_name() -> None:
    rig = Rig(Policy(max_exits=5, window_s=60))
    reasons = []
    for _ in range(5):
        rig.current().returncode = 3
        reasons.append(rig.advance(0.1))
        rig.advance(8)
        rig.advance(0.1)
    assert reasons[:4] == [None] * 4
    assert reasons[4] is not None
    assert reasons[4].startswith("persistence keeps crashing (5 exits within 60 s, the last: code 3)")
    assert "persistence.log" in reasons[4]


def test_exits_spread_over_more_than_the_window_never_give_up() -> None:
    rig = Rig(Policy(max_exits=3, window_s=60))
    for _ in range(6):
        rig.current().kill()
        assert rig.advance(0.1) is None
        rig.advance(30)
        rig.advance(0.1)


def test_a_restarted_process_that_never_gets_ready_is_killed_and_counted() -> None:
    rig = Rig(Policy(ready_timeout_s=90), ready=False)
    rig.proc.kill()
    rig.advance(0.1)
    rig.advance(1.1)
    first = rig.current()
    assert first.alive()
    rig.advance(60)
    assert first.alive() and not any("back" in line for line in rig.lines)
    rig.advance(31)
    assert not first.alive()
    assert rig.lines[-2] == "persistence not ready 90 s after its start; killing it"
    assert rig.lines[-1] == "persistence exited (not ready); restarting in 2 s"


def test_exit_statuses_read_as_the_console_shows_them() -> None:
    assert describe_exit(-9) == "signal 9"
    assert describe_exit(3) == "code 3"
    assert describe_exit(0) == "code 0"

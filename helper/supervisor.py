"""Keeps every process of a running stack alive: what ``make run`` does once it is up.

A process that exits without being asked to (``kill -9`` included) is started
again after a backoff — 1 s, then 2, 4, 8, 16 s for a process that keeps
dying soon after its start, back to 1 s once it stayed up for
:attr:`Policy.stable_s` — and the console says so. A process that keeps
crashing (:attr:`Policy.max_exits` exits within :attr:`Policy.window_s`)
stops the whole system with a message naming it: starting it yet again would
only hide the fault. The embedded Kafka broker, MongoDB and Nginx are watched
like the services; what "ready" means for each, and what must follow a
restart (the broker comes back empty: its topics are created again), is the
stack's :class:`Recipe`.

Why not supervisord, the usual tool: the stop guarantees ``make run`` gives
(no process and no port left even when the runner itself is killed with
SIGKILL) rest on every child getting the parent-death signal from the runner
that started it, which supervisord does not set; supervisord gives up only on
a process that fails within ``startsecs`` of its start (one that crashes
after ten seconds is restarted forever) and then keeps the rest running,
where a crash loop here must stop the system; and a restarted broker needs
its topics before the services may use it, a restarted service counts as back
only once its ``/healthz`` answers. The tests and the fault campaign run the
same supervision inside their own process (:meth:`helper.stack.Stack.supervise`).

The policy is plain code over a clock, so the unit tests drive it with a fake
one (tests/unit/test_supervisor.py).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol


class Process(Protocol):
    """What the supervisor needs of a process (``helper.infra.Proc``)."""

    name: str
    log: Path

    def start(self) -> None: ...

    def alive(self) -> bool: ...

    def kill(self) -> None: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def returncode(self) -> int | None: ...


@dataclass(frozen=True)
class Policy:
    """When to start a process again, and when to give up."""

    #: Wait before the first restart; doubled for each exit that follows soon after a start.
    first_backoff_s: float = 1.0
    max_backoff_s: float = 16.0
    #: This many exits of one process within ``window_s`` stop the whole system.
    max_exits: int = 5
    window_s: float = 60.0
    #: A process that stayed up this long starts its backoff from ``first_backoff_s`` again.
    stable_s: float = 30.0
    #: A restarted process that is not ready after this long is killed (and counted as an exit).
    ready_timeout_s: float = 90.0


@dataclass
class Recipe:
    """How to start one process again, and how to tell that it serves."""

    make: Callable[[], Process]
    #: True once the new process serves; may do what a restart needs first (and return
    #: False to be asked again at the next look, e.g. while the broker does not answer yet).
    ready: Callable[[], bool]


def describe_exit(returncode: int | None) -> str:
    """``signal 9`` for a process killed by a signal, ``code 3`` for one that exited."""
    if returncode is None:
        return "unknown status"
    return f"signal {-returncode}" if returncode < 0 else f"code {returncode}"


@dataclass
class Watched:
    """One supervised process and its history."""

    name: str
    proc: Process
    recipe: Recipe
    state: Literal["up", "waiting", "starting"] = "up"
    #: When the current process started (``up`` and ``starting``), or when it exited (``waiting``).
    since: float = 0.0
    #: When a ``waiting`` process is started again.
    due: float = 0.0
    #: Exits within the policy's window (monotonic times).
    exits: deque[float] = field(default_factory=deque)
    #: Exits in a row that came soon after a start: the backoff's exponent.
    streak: int = 0
    restarts: int = 0


class Supervisor:
    """Watches processes; :meth:`tick` restarts what died and says why the system must stop, if it must.

    Call :meth:`tick` often (the runner calls it on every child exit and at
    least every 200 ms) from the thread that started the processes: each child
    gets its parent-death signal from the thread that forked it.
    """

    def __init__(
        self,
        say: Callable[[str], None],
        policy: Policy | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_start: Callable[[str, Process], None] | None = None,
    ):
        self.say = say
        self.policy = policy or Policy()
        self.clock = clock
        #: Called with every process started again (the stack records it as the current one).
        self.on_start = on_start
        self.watched: dict[str, Watched] = {}

    def watch(self, name: str, proc: Process, recipe: Recipe) -> None:
        """Supervise ``proc`` (already running) under ``name``."""
        self.watched[name] = Watched(name, proc, recipe, since=self.clock())

    def tick(self) -> str | None:
        """One look at every process. Returns why the whole system must stop, else None."""
        for w in list(self.watched.values()):
            reason = self._look(w)
            if reason is not None:
                return reason
        return None

    def _look(self, w: Watched) -> str | None:
        now = self.clock()
        if w.state in ("up", "starting") and not w.proc.alive():
            return self._exited(w, now, describe_exit(w.proc.returncode))
        if w.state == "waiting" and now >= w.due:
            w.proc = w.recipe.make()
            w.proc.start()
            w.state, w.since = "starting", now
            w.restarts += 1
            if self.on_start is not None:
                self.on_start(w.name, w.proc)
        elif w.state == "starting":
            if w.recipe.ready():
                w.state = "up"
                self.say(f"{w.name} is back (pid {w.proc.pid}, ready {self.clock() - w.since:.1f} s after its start)")
            elif now - w.since > self.policy.ready_timeout_s:
                self.say(f"{w.name} not ready {self.policy.ready_timeout_s:.0f} s after its start; killing it")
                w.proc.kill()
                return self._exited(w, now, "not ready")
        return None

    def _exited(self, w: Watched, now: float, how: str) -> str | None:
        p = self.policy
        w.exits.append(now)
        while w.exits and now - w.exits[0] > p.window_s:
            w.exits.popleft()
        if len(w.exits) >= p.max_exits:
            return (
                f"{w.name} keeps crashing ({len(w.exits)} exits within {p.window_s:.0f} s, the last: {how});"
                f" see {w.proc.log}"
            )
        if w.state == "up" and now - w.since >= p.stable_s:
            w.streak = 0
        delay = min(p.max_backoff_s, p.first_backoff_s * 2**w.streak)
        w.streak += 1
        w.state, w.since, w.due = "waiting", now, now + delay
        self.say(f"{w.name} exited ({how}); restarting in {delay:g} s")
        return None

"""Command line behind ``make run``, ``make infra`` and ``make run-<service>``.

    python -m helper.run all            # everything, in the foreground
    python -m helper.run infra          # Kafka, MongoDB, topics, Nginx only
    python -m helper.run service NAME   # one service in the foreground

Reads .env (created from .env.tmpl by make). Once up, it keeps every process
running: one that dies is started again with backoff, and the console says so
(``helper.supervisor``); one that keeps crashing stops the system. Ctrl-C or
SIGTERM stops every process it started; so does the kernel if this runner is
killed outright (each child gets SIGTERM when its parent dies, see
``helper.infra.Proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
from pathlib import Path

from .infra import ROOT
from .stack import SERVICES, Stack, StartInterrupted, load_dotenv, spec

#: What profile logs (once, at the first start) when it generated the administrator's password.
GENERATED_PASSWORD = "created with a generated password"


class StopSignals:
    """SIGINT and SIGTERM only set ``stack.stop_requested`` and wake :meth:`wait`.

    The handler does nothing else: a handler that takes a lock (``Event.set``)
    deadlocks when a second signal lands while the first is inside it, which
    is what ``make`` does on Ctrl-C or a group kill (it forwards another
    SIGTERM). The kernel writes each signal's number to a pipe
    (``signal.set_wakeup_fd``), so the main loop wakes at once without polling;
    SIGCHLD gets a handler that does nothing for the same reason: a child that
    dies wakes the supervisor at once.
    """

    def __init__(self, stack: Stack):
        self.stack = stack
        self._read, write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)
        signal.signal(signal.SIGCHLD, self._child)

    def _handler(self, signum: int, frame: object) -> None:
        self.stack.stop_requested = True

    def _child(self, signum: int, frame: object) -> None:
        """Only wakes :meth:`wait` (through the wakeup pipe)."""

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds or until a signal; True once a stop was requested."""
        if not self.stack.stop_requested:
            select.select([self._read], [], [], timeout)
            try:
                os.read(self._read, 512)
            except BlockingIOError:
                pass
        return self.stack.stop_requested


def say(line: str) -> None:
    print(line, flush=True)


def _supervise(stack: Stack, signals: StopSignals) -> int:
    """Keep every process running until a stop is requested or one keeps crashing."""
    supervisor = stack.supervisor(say)
    code = 0
    while not signals.wait(0.2):
        reason = supervisor.tick()
        if reason is not None:
            say(f"stopping: {reason}")
            code = 1
            break
    print("stopping every process...", flush=True)
    stack.stop()
    print("stopped.", flush=True)
    return code


def generated_password_line(profile_log: Path, start: int) -> str | None:
    """The message profile logged in this run when it generated the administrator's password.

    Only what was written since ``start`` (the log's size before this run) is
    read: the password is generated at the first start only, and an old line
    must not be shown as if it were still valid.
    """
    if not profile_log.exists():
        return None
    with profile_log.open("rb") as f:
        f.seek(start)
        for raw in f:
            line = raw.decode("utf-8", "replace")
            if GENERATED_PASSWORD not in line:
                continue
            try:
                return str(json.loads(line).get("message", line.strip()))
            except ValueError:
                return line.strip()
    return None


def up_banner(stack: Stack, password_line: str | None) -> str:
    """What the console shows once everything is up: where to go, where things are."""
    admin = stack.env.get("ADMIN_USERNAME", "")
    if not admin:
        admin_line = "none (ADMIN_USERNAME is empty)"
    elif password_line:
        admin_line = f"{admin}\n    {password_line}"
    elif stack.env.get("ADMIN_PASSWORD"):
        admin_line = f"{admin} (password: ADMIN_PASSWORD in .env)"
    else:
        admin_line = f"{admin} (its password was generated and shown at the first start)"
    data = f"{stack.var / 'mongo'} (MongoDB)" if stack.embedded_mongo else stack.mongo_url
    lines = [
        f"chat backend up: {stack.base_url}",
        f"  tester page:    {stack.base_url}/",
        f"  API reference:  {stack.base_url}/docs/",
        f"  WebSocket:      {stack.ws_url}",
        f"  logs:           {stack.var / 'log'}",
        f"  data:           {data}",
        f"  administrator:  {admin_line}",
        f"  services:       {', '.join(stack.service_names())}; gateways: {stack.gateways}",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="helper.run")
    parser.add_argument("what", choices=["all", "infra", "service", "topics"])
    parser.add_argument("name", nargs="?")
    args = parser.parse_args(argv)
    values = load_dotenv(ROOT / ".env")
    stack = Stack.from_env(values)
    # From here on a signal, even one during start-up, stops whatever was started:
    # the handler only asks; starting checks between steps (see Stack._spawn).
    signals = StopSignals(stack)
    try:
        if args.what == "topics":
            stack.create_topics()
            print("topics ready")
            return 0
        if args.what == "service":
            if not args.name:
                parser.error("service needs a NAME: " + ", ".join(s.name for s in SERVICES))
            s = spec(args.name)
            env = stack.service_env(s.name, 1 if s.name == "gateway" else None)
            if s.name == "gateway" and values.get("GATEWAY_INSTANCE_ID"):
                env["GATEWAY_INSTANCE_ID"] = values["GATEWAY_INSTANCE_ID"]
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, "-m", f"services.{s.package}"], env)  # noqa: S606
        if args.what == "infra":
            stack.start_infra(nginx=True)
            print(
                f"infrastructure up: Kafka {stack.kafka}, MongoDB {stack.mongo_url}, Nginx {stack.base_url}", flush=True
            )
            print("start services with make run-<service>; Ctrl-C stops.", flush=True)
            return _supervise(stack, signals)
        print("starting Kafka, MongoDB, services and Nginx...", flush=True)
        profile_log = stack.var / "log" / "profile.log"
        log_start = profile_log.stat().st_size if profile_log.exists() else 0
        stack.start_all()
        print(up_banner(stack, generated_password_line(profile_log, log_start)), flush=True)
        return _supervise(stack, signals)
    except StartInterrupted:
        print("signal during start-up: stopping what was started...", flush=True)
        stack.stop()
        return 130
    except Exception as exc:  # noqa: BLE001 - report plainly, stop what was started
        print(f"error: {exc}", file=sys.stderr, flush=True)
        stack.stop()
        return 1


if __name__ == "__main__":
    sys.exit(main())

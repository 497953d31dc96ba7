"""`make run` driven as a user drives it: started in its own session, its console read,
stopped with the signals a terminal or a process manager sends, and checked to
leave nothing behind. Used by test_make_run.py and test_newcomer.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from helper.infra import free_port, listen_ports_below, port_open
from helper.stack import SERVICES

#: The settings .env.tmpl documents as ports, besides the gateways' (GATEWAY_PORT + i).
PORT_SETTINGS = ["PUBLIC_PORT", "EMBEDDED_KAFKA_PORT", "EMBEDDED_MONGO_PORT"] + [
    f"{s.package.upper()}_PORT" for s in SERVICES if s.name != "gateway"
]


def procs_with_env(marker: str) -> list[int]:
    """PIDs of live processes whose environment contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker.encode() in env and state != "Z":
            found.append(int(entry.name))
    return found


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return f"{pid} (gone)"


def kill_leftovers(marker: str) -> None:
    """After a failure, leave no stray system behind to slow the rest of the suite."""
    for pid in procs_with_env(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def free_ports(gateways: int = 2) -> dict[str, str]:
    """Every documented port setting on a free port (GATEWAY_PORT with ``gateways`` free in a row)."""
    while True:
        gateway = free_port()
        below = gateway + gateways <= listen_ports_below()  # see helper.infra.free_port
        if below and not any(port_open(gateway + i) for i in range(1, gateways)):
            break
    taken = {gateway + i for i in range(gateways)}
    ports = {"GATEWAY_PORT": str(gateway)}
    for name in PORT_SETTINGS:
        while (p := free_port()) in taken:
            pass
        taken.add(p)
        ports[name] = str(p)
    return ports


def all_ports(ports: dict[str, str], gateways: int = 2) -> list[int]:
    gateway = int(ports["GATEWAY_PORT"])
    return [int(ports[n]) for n in PORT_SETTINGS] + [gateway + i for i in range(gateways)]


class MakeRun:
    """One `make run` in its own session (as `setsid make run`), its console collected by a thread."""

    def __init__(self, cwd: Path, env: dict[str, str], marker: str):
        self.cwd = cwd
        self.env = env
        self.marker = marker
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> MakeRun:
        self.proc = subprocess.Popen(
            ["make", "--no-print-directory", "run"],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        """Wait until the console shows ``text``; fail with the console if make ends or time runs out."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output:
                return
            if self.proc.poll() is not None and self._reader is not None:
                self._reader.join(2)
                if text in self.output:
                    return
                raise AssertionError(f"make run ended ({self.proc.returncode}) before {text!r}:\n{self.output[-4000:]}")
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} within {timeout:.0f}s:\n{self.output[-4000:]}")

    def signal_group(self, sig: int) -> None:
        """What a terminal's Ctrl-C (SIGINT) or `kill -- -PGID` does: the signal to make and the runner."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def runner_pid(self) -> int:
        """The helper.run process make started (make's child)."""
        assert self.proc is not None
        for pid in procs_with_env(self.marker):
            try:
                stat = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == self.proc.pid and "helper.run" in cmdline(pid):
                return pid
        raise AssertionError(f"no helper.run under make {self.proc.pid}")

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return code

    def left_behind(self, ports: list[int], timeout: float = 60) -> list[str]:
        """What is still running or listening once every process had ``timeout`` seconds to go."""
        deadline = time.monotonic() + timeout
        while True:
            procs = [cmdline(p) for p in procs_with_env(self.marker)]
            listening = [f"port {p}" for p in ports if port_open(p)]
            if (not procs and not listening) or time.monotonic() > deadline:
                return procs + listening
            time.sleep(0.5)

    def kill(self) -> None:
        """Leave nothing running after a failed test."""
        if self.proc is not None and self.proc.poll() is None:
            self.signal_group(signal.SIGKILL)
        kill_leftovers(self.marker)

"""`make run` as a user runs it: it comes up, serves signup and login through
Nginx, and on SIGTERM stops every process it started."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import requests

from helper.infra import ROOT, free_port, port_open
from helper.stack import SERVICES


def _procs_with_env(marker: str) -> list[int]:
    """PIDs of live processes whose environment contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if marker.encode() in env and state != "Z":
            found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return f"{pid} (gone)"


def _two_free_ports() -> int:
    while True:
        p = free_port()
        if p < 65000 and not port_open(p + 1):
            return p


def _kill_leftovers(marker: str) -> None:
    """After a failure, leave no stray system behind to slow the rest of the suite."""
    for pid in _procs_with_env(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _make_run_env(var: Path) -> dict[str, str]:
    gateway = _two_free_ports()
    taken = {gateway, gateway + 1}

    def port() -> str:
        # Never hand a service the second gateway's port (the gateways use GATEWAY_PORT + i).
        while (p := free_port()) in taken:
            pass
        taken.add(p)
        return str(p)

    env = dict(os.environ)
    env.update(
        {
            "VAR_DIR": str(var),
            "PUBLIC_PORT": port(),
            "EMBEDDED_KAFKA_PORT": port(),
            "EMBEDDED_MONGO_PORT": port(),
            "GATEWAY_PORT": str(gateway),
            "GATEWAY_INSTANCES": "2",
            "KAFKA_BOOTSTRAP_SERVERS": "",
            "MONGO_URL": "",
            "GATEWAY_ALLOWED_ORIGINS": "*",
        }
    )
    for s in SERVICES:
        if s.name != "gateway":
            env[f"{s.package.upper()}_PORT"] = port()
    return env


def _start_make_run(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["make", "--no-print-directory", "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_make_run_serves_and_stops_clean(tmp_path: Path, stack: object) -> None:
    # `stack` is requested so the suite's own system is already up: this proves
    # `make run` works next to it on other ports, as on a developer machine.
    var = tmp_path / "var"
    env = _make_run_env(var)
    base = f"http://127.0.0.1:{env['PUBLIC_PORT']}"
    make = _start_make_run(env)
    output: list[str] = []
    try:
        deadline = time.monotonic() + 180
        assert make.stdout is not None
        while time.monotonic() < deadline:
            line = make.stdout.readline()
            if not line:
                break
            output.append(line)
            if "chat backend up" in line:
                break
        assert any(base in line for line in output), "".join(output)

        r = requests.post(f"{base}/v1/auth/signup", json={"username": "makerun", "password": "password123"}, timeout=10)
        assert r.status_code == 201, r.text
        r = requests.post(
            f"{base}/v1/auth/login",
            json={"username": "makerun", "password": "password123", "device_type": "mobile"},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        token = r.json()["access_token"]
        me = requests.get(f"{base}/v1/me", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert me.json()["username"] == "makerun"
        started = _procs_with_env(str(var))
        assert len(started) >= 4  # make, helper, kafka, mongo, nginx, services...
    finally:
        os.killpg(make.pid, signal.SIGTERM)
        try:
            rest, _ = make.communicate(timeout=60)
            output.append(rest)
        except subprocess.TimeoutExpired:
            os.killpg(make.pid, signal.SIGKILL)
            _kill_leftovers(str(var))
            raise
    assert "stopped." in "".join(output), "".join(output)[-3000:]
    time.sleep(0.5)
    assert _procs_with_env(str(var)) == [], "processes left running after make run stopped"
    assert not port_open(int(env["PUBLIC_PORT"]))
    # Data lives under VAR_DIR and survives for the next start.
    assert (var / "mongo").is_dir()


def test_a_signal_during_start_up_stops_what_was_started(tmp_path: Path, stack: object) -> None:
    var = tmp_path / "var"
    env = _make_run_env(var)
    make = _start_make_run(env)
    try:
        assert make.stdout is not None
        for line in make.stdout:
            if "starting Kafka" in line:
                break
        # Wait until some of the system is up, but not all of it.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (var / "log" / "profile.log").exists():
            time.sleep(0.1)
        assert (var / "log" / "profile.log").exists()
        os.killpg(make.pid, signal.SIGTERM)
        rest, _ = make.communicate(timeout=60)
    except BaseException:
        os.killpg(make.pid, signal.SIGKILL)
        _kill_leftovers(str(var))
        raise
    assert "signal during start-up: stopping what was started" in rest, rest[-3000:]
    time.sleep(0.5)
    leftovers = _procs_with_env(str(var))
    names = [_cmdline(pid) for pid in leftovers]
    _kill_leftovers(str(var))
    assert names == [], "processes left running after a signal during start-up"

"""`make run` as a user runs it: it comes up and says where everything is, serves
signup and login through Nginx, stops every process it started on SIGTERM,
even when stopped hard, keeps every group and conversation across a restart, and starts
again a process that dies (kill -9 of a service, of MongoDB).

Each test runs `make run` next to the suite's own system (the `stack` fixture),
on other ports, as on a developer machine, with VAR_DIR in a temporary directory
(its path marks every process the run starts).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import requests

from helper.infra import ROOT
from tests.faults import CarefulClient
from tests.integration.makerun import MakeRun, all_ports, cmdline, free_ports, procs_with_env
from tests.support import Api, User, WsClient, dm_id, eventually, history, new_user

UP = "Ctrl-C stops everything."


def _make_run_env(var: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(free_ports())
    env.update(
        {
            "VAR_DIR": str(var),
            "GATEWAY_INSTANCES": "2",
            "KAFKA_BOOTSTRAP_SERVERS": "",
            "MONGO_URL": "",
        }
    )
    return env


def _make_run(var: Path, env: dict[str, str]) -> MakeRun:
    return MakeRun(ROOT, env, str(var)).start()


def test_make_run_serves_and_stops_clean(tmp_path: Path, stack: object) -> None:
    var = tmp_path / "var"
    env = _make_run_env(var)
    env["ADMIN_PASSWORD"] = ""
    base = f"http://127.0.0.1:{env['PUBLIC_PORT']}"
    run = _make_run(var, env)
    try:
        run.wait_for(UP, 180)
        # The console says where to go and where things are, and shows the generated password.
        console = run.output
        assert f"tester page:    {base}/" in console
        assert f"API reference:  {base}/docs/" in console
        assert f"logs:           {var / 'log'}" in console
        assert f"data:           {var / 'mongo'}" in console
        assert "administrator:  admin" in console
        shown = next(line for line in run.lines if "created with a generated password" in line)
        password = shown.rsplit(": ", 1)[1].strip()
        r = requests.post(
            f"{base}/v1/auth/login", json={"username": "admin", "password": password, "device_type": "web"}, timeout=10
        )
        assert r.status_code == 200, r.text

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
        assert len(procs_with_env(str(var))) >= 4  # make, helper, kafka, mongo, nginx, services...
        run.signal_group(signal.SIGTERM)
        run.wait(60)
    except BaseException:
        run.kill()
        raise
    assert "stopped." in run.output, run.output[-3000:]
    assert run.left_behind(all_ports(env), timeout=10) == [], "left running after make run stopped"
    # Data lives under VAR_DIR and survives for the next start.
    assert (var / "mongo").is_dir()


def test_a_signal_during_start_up_stops_what_was_started(tmp_path: Path, stack: object) -> None:
    var = tmp_path / "var"
    env = _make_run_env(var)
    run = _make_run(var, env)
    try:
        run.wait_for("starting Kafka", 120)
        # Wait until some of the system is up, but not all of it.
        eventually(lambda: (var / "log" / "profile.log").exists(), timeout=60, what="services starting")
        run.signal_group(signal.SIGTERM)
        run.wait(60)
    except BaseException:
        run.kill()
        raise
    assert "signal during start-up: stopping what was started" in run.output, run.output[-3000:]
    leftovers = run.left_behind(all_ports(env), timeout=10)
    run.kill()
    assert leftovers == [], "left running after a signal during start-up"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_hard_stops_leave_no_process_and_no_port(tmp_path: Path, stack: object) -> None:
    """As a process manager stops it when it is in a hurry: SIGTERM to the group twice in
    quick succession (what `make` adds on top of a group kill), then SIGKILL of the runner.
    Nothing may be left, whether it was starting or up: the next start needs the ports."""
    var = tmp_path / "var"
    env = _make_run_env(var)
    ports = all_ports(env)
    for moment in ("starting", "up"):
        run = _make_run(var, env)
        try:
            if moment == "starting":
                run.wait_for("starting Kafka", 120)
                log = var / "log" / "group.log"
                start = log.stat().st_size if log.exists() else 0
                eventually(lambda: log.exists() and log.stat().st_size > start, timeout=60, what="services starting")
            else:
                run.wait_for(UP, 180)
            runner = run.runner_pid()
            run.signal_group(signal.SIGTERM)
            time.sleep(0.05)
            run.signal_group(signal.SIGTERM)
            time.sleep(0.3)
            os.kill(runner, signal.SIGKILL)
            run.wait(30)
            leftovers = run.left_behind(ports, timeout=60)
        except BaseException:
            run.kill()
            raise
        run.kill()
        assert leftovers == [], f"left behind after a hard stop while {moment}"


def _login(base: str, user: User) -> User:
    """The same user and device with fresh tokens (after a restart, as a client would)."""
    r = Api(base).post("/v1/auth/refresh", json={"refresh_token": user.refresh_token})
    assert r.status_code == 200, r.text
    body = r.json()
    user.access_token, user.refresh_token = body["access_token"], body["refresh_token"]
    return user


def _exchange(a: WsClient, b: WsClient, c: WsClient, bob: User, group_id: str, conv_dm: str, tag: str) -> None:
    """One direct message alice -> bob and one group message bob -> the group, each acked and delivered."""
    dm = a.send_message(to=bob.user_id, body=f"dm {tag}")
    a.expect("ack", id=dm, timeout=15)
    assert b.expect("message", id=dm, timeout=15)["conversation"] == conv_dm
    gm = b.send_message(group=group_id, body=f"group {tag}")
    b.expect("ack", id=gm, timeout=15)
    a.expect("message", id=gm, timeout=15)
    c.expect("message", id=gm, timeout=15)


@pytest.mark.timeout(900)
def test_a_restart_keeps_groups_and_conversations(tmp_path: Path, stack: object) -> None:
    """Groups and conversations made before a restart carry messages as soon as it is up.

    The embedded broker starts empty each time while MongoDB keeps its data: the
    owners of the compacted topics (groups, sessions) must put them back before the
    views built from them report up.
    """
    var = tmp_path / "var"
    env = _make_run_env(var)
    base = f"http://127.0.0.1:{env['PUBLIC_PORT']}"
    run = _make_run(var, env)
    sockets: list[WsClient] = []
    try:
        run.wait_for(UP, 180)
        alice, bob, carol = (new_user(base) for _ in range(3))
        r = alice.api.post("/v1/groups", json={"name": "before", "members": [bob.user_id, carol.user_id]})
        assert r.status_code == 201, r.text
        group_id = r.json()["group_id"]
        conv_dm, conv_group = dm_id(alice, bob), f"group:{group_id}"
        sockets = [alice.connect(), bob.connect(), carol.connect()]
        _exchange(*sockets, bob, group_id, conv_dm, "before")
        seen_before = Api(base, alice.access_token).get(f"/v1/users/{carol.username}").json()["last_seen"]
        for ws in sockets:
            ws.close()
        run.signal_group(signal.SIGINT)  # Ctrl-C
        run.wait(60)
        assert "stopped." in run.output, run.output[-3000:]

        run = _make_run(var, env)
        run.wait_for(UP, 180)
        alice, bob, carol = (_login(base, u) for u in (alice, bob, carol))
        # Sessions came back too: carol's last sighting is known before she reconnects.
        assert Api(base, alice.access_token).get(f"/v1/users/{carol.username}").json()["last_seen"] >= seen_before
        sockets = [alice.connect(), bob.connect(), carol.connect()]
        _exchange(*sockets, bob, group_id, conv_dm, "after")
        for conv, who in ((conv_dm, alice), (conv_group, carol)):
            bodies = [m["body"] for m in history(who, conv)["messages"]]
            kind = "dm" if conv == conv_dm else "group"
            assert bodies == [f"{kind} after", f"{kind} before"], f"history of {conv}: {bodies}"
        for ws in sockets:
            ws.close()
        run.signal_group(signal.SIGINT)
        run.wait(60)
    except BaseException:
        for ws in sockets:
            ws.close()
        run.kill()
        raise
    assert run.left_behind(all_ports(env), timeout=10) == []


def _pid_of(var: Path, needle: str) -> int:
    """The process the runner started whose command line contains ``needle`` (the leader of its
    process group: a service may have workers of its own)."""
    found = [p for p in procs_with_env(str(var)) if needle in cmdline(p) and _leads_its_group(p)]
    assert len(found) == 1, f"{needle}: {[cmdline(p) for p in found]}"
    return found[0]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_make_run_starts_again_what_dies(tmp_path: Path, stack: object) -> None:
    """kill -9 of a service and of MongoDB under `make run`: the console says each exited and is
    back, and messages flow again between careful clients without anyone stepping in."""
    var = tmp_path / "var"
    env = _make_run_env(var)
    base = f"http://127.0.0.1:{env['PUBLIC_PORT']}"
    ws_url = base.replace("http://", "ws://") + "/v1/ws"
    run = _make_run(var, env)
    clients: list[CarefulClient] = []
    try:
        run.wait_for(UP, 180)
        alice, bob = new_user(base), new_user(base)
        r = alice.api.post("/v1/groups", json={"name": "supervised", "members": [bob.user_id]})
        assert r.status_code == 201, r.text
        group_id = r.json()["group_id"]
        a, b = CarefulClient(alice, ws_url).start(), CarefulClient(bob, ws_url).start()
        clients = [a, b]

        def flows(tag: str) -> None:
            dm = a.send([bob.user_id], to=bob.user_id)
            gm = b.send([alice.user_id], group=group_id)
            eventually(lambda: _delivered(a, dm, b) and _delivered(b, gm, a), 120, f"messages after {tag}")

        flows("start")
        # Not the broker here: its loss while running is tests/e2e/test_faults.py's (see the reason it is
        # marked xfail there); a restart of make run, where it also starts empty, is covered above.
        for key, needle in (("persistence", "services.persistence"), ("mongo", "secantusd")):
            os.kill(_pid_of(var, needle), signal.SIGKILL)
            run.wait_for(f"{key} exited (signal 9); restarting in 1 s", 60)
            run.wait_for(f"{key} is back", 120)
            flows(f"kill -9 of {key}")
        assert "stopping:" not in run.output
        for c in clients:
            c.stop()
        run.signal_group(signal.SIGINT)
        run.wait(60)
    except BaseException:
        for c in clients:
            c.stop()
        run.kill()
        raise
    assert "stopped." in run.output, run.output[-3000:]
    assert run.left_behind(all_ports(env), timeout=10) == []


def _leads_its_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except OSError:
        return False


def _delivered(sender: CarefulClient, cid: str, to: CarefulClient) -> bool:
    with sender.lock:
        acks = sender.acks.get(cid)
    return bool(acks) and acks[0][0] in to.received

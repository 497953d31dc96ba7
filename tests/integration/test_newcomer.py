"""The README as a newcomer runs it: `git clone`, then `make run`, on this machine.

A real clone of the committed tree (a file that exists only in a working copy
is missing there too), `.env.tmpl`'s values as they are except the port
settings it documents (moved to free ports, as a user with port 8080 taken
would, so CI can run this beside other stacks), and `make run` from the
clone's root: it creates its own virtualenv and installs the pinned packages
(from the package index, as on a fresh machine), starts everything, and must
then serve the tester page, the API reference, signup, login and a WebSocket
message through Nginx. Ctrl-C must leave nothing it started behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import requests

from helper.infra import ROOT
from tests.integration.makerun import MakeRun, all_ports, free_ports
from tests.support import Api, new_user

#: Settings a newcomer's shell does not have: whatever the test process has of them is dropped.
PROJECT_SETTINGS = {"VAR_DIR", "PYTHONPATH", "VIRTUAL_ENV", "STACK_ONLY", "GATEWAY_INSTANCE_ID", "KEEP_TEST_VAR"}


def _settings(env_tmpl: str) -> set[str]:
    keys = set()
    for line in env_tmpl.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            keys.add(line.split("=", 1)[0].strip())
    return keys


@pytest.mark.slow
@pytest.mark.timeout(2100)  # a fresh virtualenv and every pinned package, from the package index
def test_a_fresh_clone_runs_as_the_readme_says(tmp_path: Path) -> None:
    clone = tmp_path / "chat"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    assert not (clone / ".venv").exists() and not (clone / ".env").exists()
    readme = (clone / "README.md").read_text()
    assert "make run" in readme and "make test" in readme

    # .env as .env.tmpl has it, but for the ports (a user edits the documented port settings).
    template = (clone / ".env.tmpl").read_text()
    ports = free_ports(gateways=int(_value(template, "GATEWAY_INSTANCES")))
    lines = []
    for line in template.splitlines():
        key = line.split("=", 1)[0].strip()
        lines.append(f"{key}={ports[key]}" if key in ports and "=" in line else line)
    (clone / ".env").write_text("\n".join(lines) + "\n")
    assert _value(template, "VAR_DIR") == "var"  # relative: the newcomer's case

    env = {k: v for k, v in os.environ.items() if k not in _settings(template) | PROJECT_SETTINGS}
    base = f"http://127.0.0.1:{ports['PUBLIC_PORT']}"
    run = MakeRun(clone, env, str(clone)).start()
    try:
        # A fresh virtualenv and every pinned package first (minutes, at the package index's pace),
        # then the system itself.
        run.wait_for("starting Kafka", 1500)
        run.wait_for("Ctrl-C stops everything.", 300)
        assert (clone / ".venv" / "bin" / "python").exists()
        assert f"tester page:    {base}/" in run.output and f"API reference:  {base}/docs/" in run.output
        assert "created with a generated password" in run.output  # ADMIN_PASSWORD is empty in .env.tmpl

        page = requests.get(f"{base}/", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        reference = requests.get(f"{base}/docs/", timeout=10)
        assert reference.status_code == 200 and "text/html" in reference.headers["Content-Type"]
        alice, bob = new_user(base), new_user(base)
        assert Api(base, alice.access_token).get("/v1/me").json()["username"] == alice.username
        a, b = alice.connect(), bob.connect()
        try:
            cid = a.send_message(to=bob.user_id, body="hello, newcomer")
            a.expect("ack", id=cid, timeout=30)
            assert b.expect("message", id=cid, timeout=30)["body"] == "hello, newcomer"
        finally:
            a.close()
            b.close()

        run.signal_group(signal.SIGINT)  # Ctrl-C
        run.wait(90)
        assert "stopped." in run.output, run.output[-3000:]
        assert run.left_behind(all_ports(ports), timeout=30) == [], "left running after Ctrl-C"
        assert (clone / "var" / "mongo").is_dir() and (clone / "var" / "log" / "profile.log").is_file()
    except BaseException:
        run.kill()
        raise
    finally:
        shutil.rmtree(clone, ignore_errors=True)


def _value(env_tmpl: str, key: str) -> str:
    for line in env_tmpl.splitlines():
        if line.startswith(f"{key}="):
            return line.split("=", 1)[1].strip()
    raise AssertionError(f"{key} is not in .env.tmpl")

"""A service that cannot reach Kafka or MongoDB at start says so and exits non-zero;
a bad setting stops it naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helper.infra import ROOT, free_port
from helper.stack import SERVICES, Stack

EXISTING = [s for s in SERVICES if s.exists()]


def _run(package: str, extra: dict[str, str], stack: Stack) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(ROOT / "libs"), str(ROOT)]),
            "KAFKA_BOOTSTRAP_SERVERS": stack.kafka,
            "MONGO_URL": stack.mongo_url,
            "STARTUP_TIMEOUT_S": "1",
            "PROFILE_JWT_SECRET": "x" * 32,
            "GATEWAY_INSTANCE_ID": "gw-startup-test",
            f"{package.upper()}_PORT": str(free_port()),
            "GATEWAY_PORT": str(free_port()),
        }
    )
    env.update(extra)
    return subprocess.run(
        [sys.executable, "-m", f"services.{package}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("svc", EXISTING, ids=[s.name for s in EXISTING])
def test_exits_nonzero_when_kafka_is_unreachable(svc, stack: Stack) -> None:  # type: ignore[no-untyped-def]
    closed = free_port()
    res = _run(svc.package, {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{closed}"}, stack)
    assert res.returncode != 0
    assert f"Kafka broker at 127.0.0.1:{closed} is unreachable" in res.stderr


@pytest.mark.parametrize("svc", EXISTING[:3], ids=[s.name for s in EXISTING[:3]])
def test_exits_nonzero_when_mongo_is_unreachable(svc, stack: Stack) -> None:  # type: ignore[no-untyped-def]
    closed = free_port()
    res = _run(svc.package, {"MONGO_URL": f"mongodb://127.0.0.1:{closed}/?retryWrites=false"}, stack)
    assert res.returncode != 0
    assert "MongoDB at" in res.stderr and "unreachable" in res.stderr


def test_bad_setting_names_the_variable(stack: Stack) -> None:
    svc = EXISTING[0]
    res = _run(svc.package, {"KAFKA_SESSION_TIMEOUT_MS": "soon"}, stack)
    assert res.returncode == 2
    assert "KAFKA_SESSION_TIMEOUT_MS" in res.stderr

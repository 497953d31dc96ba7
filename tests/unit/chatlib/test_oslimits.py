"""Raising the open-file limit, with the OS calls replaced."""

from __future__ import annotations

import resource

import pytest
from chatlib.oslimits import raise_open_file_limit


@pytest.fixture
def limits(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[int, int]]:
    state = {"nofile": (1024, 20000)}
    monkeypatch.setattr(resource, "getrlimit", lambda _which: state["nofile"])
    monkeypatch.setattr(resource, "setrlimit", lambda _which, value: state.update(nofile=value))
    return state


def test_the_soft_limit_rises_to_what_is_wanted(limits: dict[str, tuple[int, int]]) -> None:
    assert raise_open_file_limit(5000) == 5000
    assert limits["nofile"] == (5000, 20000)


def test_never_above_the_hard_limit(limits: dict[str, tuple[int, int]]) -> None:
    assert raise_open_file_limit(65536) == 20000
    assert limits["nofile"] == (20000, 20000)


def test_a_higher_limit_is_left_alone(limits: dict[str, tuple[int, int]]) -> None:
    limits["nofile"] = (30000, 40000)
    assert raise_open_file_limit(5000) == 30000
    assert limits["nofile"] == (30000, 40000)


def test_a_real_process_started_with_a_low_limit_gets_what_it_asks_for() -> None:
    # No OS call replaced: a child starts at a 512 soft limit (a low shell's), asks for more.
    import os
    import subprocess
    import sys
    from pathlib import Path

    import chatlib

    libs = str(Path(chatlib.__file__).resolve().parents[1])

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    code = (
        "import resource; from chatlib.oslimits import raise_open_file_limit; "
        f"got = raise_open_file_limit({want}); "
        "print(got, resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard)),
        env={**os.environ, "PYTHONPATH": libs},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [str(want), str(want)]

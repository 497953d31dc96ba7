"""pytest plugin: session fixtures that start the real system on free loopback ports.

- ``stack``: Kafka (Tansu), MongoDB (SecantusDB), every service that exists
  (two gateway instances) and Nginx, started once per test session.
- ``api``: a factory of :class:`tests.support.Api` clients against Nginx.
- ``user``: a fresh signed-up and logged-in user (``tests.support.User``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from helper.stack import Stack
from tests.support import Api, User, new_user


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    var = Path(tempfile.mkdtemp(prefix="chat-test-"))
    st = Stack.for_tests(var, gateways=2)
    try:
        st.start_all()
    except Exception:
        st.stop()
        _dump_logs(var)
        raise
    yield st
    st.stop()
    if os.environ.get("KEEP_TEST_VAR"):
        print(f"test data kept in {var}")
    else:
        shutil.rmtree(var, ignore_errors=True)


def _dump_logs(var: Path) -> None:
    for log in sorted((var / "log").glob("*.log")):
        print(f"===== {log.name} =====")
        print(log.read_text(errors="replace")[-3000:])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """A failed test that used the stack gets what the services logged lately (warnings and
    errors, and each log's last lines) in its report: CI keeps nothing else of the stack."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed or call.when != "call":
        return
    funcargs = getattr(item, "funcargs", {})
    # A stack of the test's own (make run in a temporary folder) first, then the session's.
    tmp = funcargs.get("tmp_path")
    if isinstance(tmp, Path):
        for logs in sorted({p.parent for p in tmp.glob("**/log/*.log")}):
            report.sections.append((f"logs of {logs}", _recent_logs(logs)))
    st = funcargs.get("stack")
    if isinstance(st, Stack):
        report.sections.append(("session stack's logs", _recent_logs(st.var / "log")))


def _recent_logs(folder: Path, scan: int = 400, keep: int = 25) -> str:
    """Each log's recent warnings and errors and its last lines."""
    out = []
    for log in sorted(folder.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-scan:]
        notable = [ln for ln in lines if any(w in ln for w in ("WARNING", "ERROR", "CRITICAL", "Traceback"))]
        shown = list(dict.fromkeys(notable[-keep:] + lines[-5:]))
        out.append(f"----- {log.name} -----\n" + "\n".join(shown))
    return "\n".join(out)


@pytest.fixture
def api(stack: Stack) -> Api:
    return Api(stack.base_url)


@pytest.fixture
def user(stack: Stack) -> User:
    return new_user(stack.base_url)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests under integration/, e2e/ and browser/ get their marker from the folder.
    for item in items:
        path = str(item.fspath)
        for folder in ("integration", "e2e", "browser"):
            if f"{os.sep}tests{os.sep}{folder}{os.sep}" in path:
                item.add_marker(getattr(pytest.mark, folder))

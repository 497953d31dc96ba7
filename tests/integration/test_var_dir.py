"""VAR_DIR as a user may write it in .env: relative to the project or absolute, with or
without a trailing slash, containing a space. Each is resolved to one directory,
and Nginx started from the rendered config (as `make run` starts it) keeps its
config, logs and temp files there and serves the tester page and its own errors."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import requests

from helper.infra import ROOT, free_port, nginx_proc, port_open, wait_until
from helper.stack import SERVICES, Stack, var_dir


def _variants(tmp: Path) -> dict[str, tuple[str, Path]]:
    """name -> (the VAR_DIR value, the directory it must mean)."""
    rel = os.path.relpath(tmp, ROOT)
    return {
        "relative": (f"{rel}/var", tmp / "var"),
        "relative with a trailing slash": (f"{rel}/var-slash/", tmp / "var-slash"),
        "relative with a space": (f"{rel}/my var/", tmp / "my var"),
        "absolute": (str(tmp / "abs"), tmp / "abs"),
        "absolute with a space and a trailing slash": (f"{tmp}/data dir/var/", tmp / "data dir" / "var"),
    }


def test_var_dir_resolves_against_the_project_root_whatever_the_cwd(tmp_path: Path) -> None:
    here = Path.cwd()
    os.chdir(tmp_path)  # the caller's cwd must not matter
    try:
        for value, expected in _variants(tmp_path).values():
            assert var_dir(value) == expected.resolve(), value
        assert var_dir("") == ROOT / "var"
        assert var_dir("var") == ROOT / "var"
        assert var_dir("./var/") == ROOT / "var"
    finally:
        os.chdir(here)


@pytest.mark.parametrize("variant", list(_variants(Path("/x"))))
def test_nginx_runs_from_any_var_dir(tmp_path: Path, variant: str) -> None:
    value, expected = _variants(tmp_path)[variant]
    # Free ports for every setting, so the upstreams never name a port someone uses.
    env = {"VAR_DIR": value, "PUBLIC_PORT": str(free_port()), "GATEWAY_PORT": str(free_port())}
    env.update({f"{s.package.upper()}_PORT": str(free_port()) for s in SERVICES if s.name != "gateway"})
    env["GATEWAY_INSTANCES"] = "1"
    stack = Stack.from_env(env)
    assert stack.var == expected.resolve()
    proc = nginx_proc(stack.nginx_settings())
    proc.start()
    try:
        wait_until(lambda: port_open(stack.public_port), 15, "nginx", proc.proc)
        page = requests.get(f"{stack.base_url}/", timeout=5)
        assert page.status_code == 200 and "<html" in page.text.lower()
        missing = requests.get(f"{stack.base_url}/v1/{uuid.uuid4().hex}", timeout=5)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    finally:
        proc.stop()
    ngx = expected / "nginx"
    assert (ngx / "nginx.conf").is_file()
    assert (ngx / "log" / "access.log").stat().st_size > 0
    assert (ngx / "tmp" / "body").is_dir()
    assert not (ROOT / value).exists() or (ROOT / value).resolve() == expected.resolve()

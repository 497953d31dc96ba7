"""Profile settings: the signing key is required, bad values name their variable."""

from __future__ import annotations

from pathlib import Path

import pytest
from chatlib.config import ConfigError, load_config

from services.profile.service import ProfileConfig

KEY = "k" * 40


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PROFILE_JWT_SECRET", "PROFILE_JWT_SECRET_FILE", "ADMIN_USERNAME", "ADMIN_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


def test_missing_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="PROFILE_JWT_SECRET"):
        load_config(ProfileConfig)


def test_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROFILE_JWT_SECRET", KEY)
    cfg = load_config(ProfileConfig)
    assert cfg.signing_key == KEY
    assert KEY not in repr(cfg)


def test_key_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "jwt.key"
    key_file.write_text(KEY + "\n")
    monkeypatch.setenv("PROFILE_JWT_SECRET_FILE", str(key_file))
    assert load_config(ProfileConfig).signing_key == KEY
    monkeypatch.setenv("PROFILE_JWT_SECRET_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="PROFILE_JWT_SECRET_FILE"):
        load_config(ProfileConfig)


def test_short_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROFILE_JWT_SECRET", "too-short")
    with pytest.raises(ConfigError, match="at least 32"):
        load_config(ProfileConfig)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ADMIN_USERNAME", "Not Valid"),
        ("ADMIN_PASSWORD", "short"),
        ("PROFILE_AUTH_CACHE_TTL_S", "2"),
        ("PROFILE_ACCESS_TTL_S", "soon"),
        ("PROFILE_USERNAME_GRACE_S", "-1"),
        ("PROFILE_ARGON2_MEMORY_KIB", "8192"),
        ("PROFILE_ARGON2_TIME_COST", "1"),
    ],
)
def test_bad_values_name_their_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv("PROFILE_JWT_SECRET", KEY)
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_config(ProfileConfig)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROFILE_JWT_SECRET", KEY)
    cfg = load_config(ProfileConfig)
    assert cfg.admin_username == "admin" and cfg.admin_password.get_secret_value() == ""
    assert cfg.username_grace_s == 7 * 24 * 3600
    assert cfg.access_ttl_s == 900 and cfg.refresh_ttl_days == 30
    assert 0 < cfg.auth_cache_ttl_s <= 1.0
    assert (cfg.argon2_time_cost, cfg.argon2_memory_kib, cfg.argon2_parallelism) == (3, 65536, 4)


def test_hashing_threads_run_below_the_rest_of_the_process() -> None:
    """lower_this_thread lowers the calling OS thread only, once: the thread that runs the
    token check keeps its priority."""
    import os
    import threading

    from services.profile.service import lower_this_thread

    seen: dict[str, int] = {}

    def hashing_thread() -> None:
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        lower_this_thread(5)
        lower_this_thread(5)  # a pool thread runs many hashes: lowered once, not each time
        seen["before"], seen["after"] = before, os.getpriority(os.PRIO_PROCESS, tid)

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=hashing_thread)
    t.start()
    t.join()
    assert seen["after"] == min(19, seen["before"] + 5)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine

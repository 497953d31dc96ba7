"""Failed logins slowed per account and per address: the rules (logic) and the service on fakes."""

from __future__ import annotations

from typing import Any

import pytest
from chatlib.errors import ApiError

from services.profile import logic
from services.profile.logic import LoginLimits, LoginRequest, SignupRequest
from services.profile.service import ProfileService

from .fakes import make_service

PW = "correct horse battery"
HOME, OTHER = "198.51.100.7", "203.0.113.9"


# -- rules -----------------------------------------------------------------------------------


def test_the_address_is_the_one_the_nearest_proxy_added() -> None:
    assert logic.client_address("203.0.113.9", "127.0.0.1") == "203.0.113.9"
    # A client may send its own X-Forwarded-For; Nginx's entry is the last.
    assert logic.client_address("10.0.0.1, 203.0.113.9", "127.0.0.1") == "203.0.113.9"
    assert logic.client_address(None, "127.0.0.1") == "127.0.0.1"
    assert logic.client_address("", None) is None


def test_keys_and_limits() -> None:
    limits = LoginLimits(per_account=3, per_address=10, exempt_addresses=frozenset({"127.0.0.1"}))
    assert logic.throttle_keys("bob", HOME, limits) == {"account:bob": 3, f"address:{HOME}": 10}
    assert logic.throttle_keys("bob", "127.0.0.1", limits) == {"account:bob": 3}
    assert logic.throttle_keys("bob", None, limits) == {"account:bob": 3}
    assert logic.throttle_keys("bob", HOME, LoginLimits(per_account=0, per_address=0)) == {}


def test_lockouts_double_up_to_the_maximum() -> None:
    limits = LoginLimits(lockout_s=60, max_lockout_s=300)
    assert [logic.lockout_ms(n, limits) // 1000 for n in range(5)] == [60, 120, 240, 300, 300]
    assert logic.lockout_ms(10**6, limits) == 300_000


def test_the_wait_is_whole_seconds_rounded_up() -> None:
    assert logic.lockout_wait_s([], 1000) == 0
    assert logic.lockout_wait_s([{"locked_until": 1000}], 1000) == 0
    assert logic.lockout_wait_s([{"locked_until": 1001}], 1000) == 1
    assert logic.lockout_wait_s([{"locked_until": 5000}, {"locked_until": 62_500}], 1000) == 62


# -- the service -------------------------------------------------------------------------------


@pytest.fixture
def svc() -> ProfileService:
    return make_service(
        login_failures_per_account=3,
        login_failures_per_address=5,
        login_failure_window_s=600,
        login_lockout_s=60,
        login_max_lockout_s=600,
        login_exempt_addresses="127.0.0.1",
    )


def signup(svc: ProfileService, username: str) -> None:
    svc.signup(SignupRequest(username, PW, username))


def attempt(svc: ProfileService, username: str, password: str, address: str | None = HOME) -> int:
    """The status of one login (200 with tokens)."""
    req = LoginRequest(username, password, None, "mobile", None)
    try:
        svc.login(req, address)
    except ApiError as exc:
        return exc.status
    return 200


def advance(svc: ProfileService, seconds: float) -> None:
    svc.clock.t += seconds  # type: ignore[attr-defined]


def test_an_account_is_locked_after_its_failures_and_a_right_password_is_refused_too(svc: ProfileService) -> None:
    signup(svc, "alice")
    assert [attempt(svc, "alice", "wrong password", a) for a in (HOME, OTHER, HOME)] == [401, 401, 401]
    # From any address, with the right password too: no oracle while locked.
    assert attempt(svc, "alice", PW, OTHER) == 429
    assert attempt(svc, "alice", "wrong password", OTHER) == 429
    with pytest.raises(logic.LoginThrottled) as refused:
        svc.login(LoginRequest("alice", PW, None, "mobile", None), OTHER)
    assert refused.value.to_body()["error"]["code"] == "rate_limited"
    assert 0 < refused.value.retry_after_s <= 60
    advance(svc, 60)
    assert attempt(svc, "alice", PW) == 200


def test_an_unknown_username_is_locked_the_same_way(svc: ProfileService) -> None:
    assert [attempt(svc, "nobody", "wrong password", a) for a in (HOME, OTHER, "192.0.2.1")] == [401] * 3
    assert attempt(svc, "nobody", "wrong password", "192.0.2.2") == 429


def test_each_further_lockout_is_longer(svc: ProfileService) -> None:
    signup(svc, "alice")
    waits = []
    for _ in range(3):
        for _ in range(3):
            assert attempt(svc, "alice", "wrong password", None) == 401
        with pytest.raises(logic.LoginThrottled) as refused:
            svc.login(LoginRequest("alice", PW, None, "mobile", None), None)
        waits.append(refused.value.retry_after_s)
        advance(svc, refused.value.retry_after_s)
    assert waits == [60, 120, 240]


def test_a_success_clears_the_accounts_count(svc: ProfileService) -> None:
    signup(svc, "alice")
    for _ in range(2):
        assert attempt(svc, "alice", "wrong password", None) == 401
    assert attempt(svc, "alice", PW, None) == 200
    for _ in range(2):
        assert attempt(svc, "alice", "wrong password", None) == 401
    assert attempt(svc, "alice", PW, None) == 200


def test_failures_older_than_the_window_are_forgotten(svc: ProfileService) -> None:
    signup(svc, "alice")
    for _ in range(2):
        assert attempt(svc, "alice", "wrong password", None) == 401
    advance(svc, 601)
    for _ in range(2):
        assert attempt(svc, "alice", "wrong password", None) == 401
    assert attempt(svc, "alice", PW, None) == 200


def test_an_address_is_locked_after_failures_across_accounts(svc: ProfileService) -> None:
    for name in ("alice", "bob", "carol"):
        signup(svc, name)
    statuses = [attempt(svc, f"guess{i}", "wrong password") for i in range(5)]
    assert statuses == [401] * 5
    # Every account from that address, right passwords included; other addresses are not touched.
    assert attempt(svc, "alice", PW) == 429
    assert attempt(svc, "bob", PW, OTHER) == 200


def test_a_success_does_not_clear_the_address_count(svc: ProfileService) -> None:
    signup(svc, "mallory")
    for i in range(4):
        assert attempt(svc, f"victim{i}", "wrong password") == 401
        # The attacker's own account logs in fine between guesses, and that changes nothing.
        assert attempt(svc, "mallory", PW) == 200
    assert attempt(svc, "victim9", "wrong password") == 401
    assert attempt(svc, "mallory", PW) == 429


def test_exempt_addresses_are_never_locked_per_address(svc: ProfileService) -> None:
    signup(svc, "alice")
    for i in range(10):
        assert attempt(svc, f"guess{i}", "wrong password", "127.0.0.1") == 401
    assert attempt(svc, "alice", PW, "127.0.0.1") == 200
    # The account limit still holds for them.
    for _ in range(3):
        assert attempt(svc, "alice", "wrong password", "127.0.0.1") == 401
    assert attempt(svc, "alice", PW, "127.0.0.1") == 429


def test_a_disabled_account_with_its_right_password_is_no_failure(svc: ProfileService) -> None:
    signup(svc, "alice")
    user = svc.store.get_user_by_username("alice")
    assert user is not None
    svc.store.set_user(user["_id"], {"state": logic.DISABLED})
    assert [attempt(svc, "alice", PW) for _ in range(5)] == [403] * 5


def test_limits_of_zero_turn_throttling_off() -> None:
    svc = make_service(login_failures_per_account=0, login_failures_per_address=0)
    signup(svc, "alice")
    assert [attempt(svc, "alice", "wrong password") for _ in range(20)] == [401] * 20
    assert attempt(svc, "alice", PW) == 200
    assert svc.store.login_failures == {}  # type: ignore[attr-defined]


def _counter(svc: ProfileService, key: str) -> dict[str, Any]:
    return svc.store.login_failures[key]  # type: ignore[attr-defined,no-any-return]


def test_a_locked_counter_outlives_its_lockout_by_a_window(svc: ProfileService) -> None:
    for _ in range(3):
        attempt(svc, "alice", "wrong password", None)
    doc = _counter(svc, "account:alice")
    assert doc["expires_at"] == doc["locked_until"] + 600_000

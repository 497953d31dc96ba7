"""Pure rules of the profile service: validation, devices, refresh decisions, deletion steps."""

from __future__ import annotations

from typing import Any

import pytest
from chatlib.errors import ApiError

from services.profile import logic
from services.profile.logic import DeletionStep, RefreshOutcome


def field_of(exc: pytest.ExceptionInfo[ApiError]) -> str:
    assert exc.value.code.value == "invalid_request"
    return str(exc.value.details["field"])


@pytest.mark.parametrize("name", ["abc", "a" * 32, "a.b-c_d", "0123", "x_y.z-9"])
def test_valid_usernames(name: str) -> None:
    assert logic.validate_username(name) == name


@pytest.mark.parametrize("name", ["ab", "a" * 33, "Abc", "a b", "ab!", "ünï", "", None, 123, ["abc"]])
def test_invalid_usernames(name: Any) -> None:
    with pytest.raises(ApiError) as exc:
        logic.validate_username(name)
    assert field_of(exc) == "username"


@pytest.mark.parametrize("pw", ["p" * 8, "p" * 128, "correct horse battery", "ünïcödé!"])
def test_valid_passwords(pw: str) -> None:
    assert logic.validate_password(pw) == pw


@pytest.mark.parametrize("pw", ["p" * 7, "p" * 129, "", None, 12345678])
def test_invalid_passwords(pw: Any) -> None:
    with pytest.raises(ApiError) as exc:
        logic.validate_password(pw)
    assert field_of(exc) == "password"


def test_signup_name_defaults_to_username_and_is_limited() -> None:
    assert logic.parse_signup({"username": "alice", "password": "p" * 8}).name == "alice"
    assert logic.parse_signup({"username": "alice", "password": "p" * 8, "name": "  "}).name == "alice"
    assert logic.parse_signup({"username": "alice", "password": "p" * 8, "name": " Al "}).name == "Al"
    with pytest.raises(ApiError) as exc:
        logic.parse_signup({"username": "alice", "password": "p" * 8, "name": "n" * 65})
    assert field_of(exc) == "name"


def test_login_parsing() -> None:
    req = logic.parse_login({"username": "Whatever Shape", "password": "x"})
    # Login does not apply the signup format: a wrong-format name is simply not found (401 later).
    assert req.username == "Whatever Shape" and req.device_type == "mobile" and req.device_id is None
    assert logic.parse_login({"username": "a", "password": "b", "device_type": "web"}).device_type == "web"
    for body, field in [
        ({"password": "b"}, "username"),
        ({"username": "a"}, "password"),
        ({"username": 1, "password": "b"}, "username"),
        ({"username": "a", "password": "b", "device_type": "tablet"}, "device_type"),
        ({"username": "a", "password": "b", "device_id": 5}, "device_id"),
        ({"username": "a", "password": "b", "device_id": ""}, "device_id"),
        ({"username": "a", "password": "b", "push_token": ""}, "push_token"),
        # Absent is the default; null is not (no field of the reference is nullable).
        ({"username": "a", "password": "b", "push_token": None}, "push_token"),
        ({"username": "a", "password": "b", "device_id": None}, "device_id"),
        ({"username": "a", "password": "b", "device_type": None}, "device_type"),
    ]:
        with pytest.raises(ApiError) as exc:
            logic.parse_login(body)
        assert field_of(exc) == field


def test_nulls_are_refused_where_a_field_may_only_be_absent() -> None:
    for parse, body, field in [
        (logic.parse_signup, {"username": "abc", "password": "long enough", "name": None}, "name"),
        (lambda b: logic.parse_profile_patch(b, "me"), {"name": None}, "name"),
        (lambda b: logic.parse_profile_patch(b, "me"), {"username": None}, "username"),
    ]:
        with pytest.raises(ApiError) as exc:
            parse(body)
        assert field_of(exc) == field


def test_profile_patch_parsing() -> None:
    assert logic.parse_profile_patch({"name": "N"}, "me") == {"name": "N"}
    assert logic.parse_profile_patch({"username": "new_me"}, "me") == {"username": "new_me"}
    assert logic.parse_profile_patch({"username": "new_me", "name": ""}, "me") == {
        "username": "new_me",
        "name": "new_me",
    }
    for body in ({}, {"other": 1}, {"username": "BAD"}, {"name": 3}):
        with pytest.raises(ApiError):
            logic.parse_profile_patch(body, "me")


def test_contact_list_parsing() -> None:
    assert logic.parse_usernames({"usernames": ["bob", "NOT VALID", "bob", "amy"]}) == ["bob", "amy"]
    assert len(logic.parse_usernames({"usernames": [f"user{i}" for i in range(1000)]})) == 1000
    for body in ({"usernames": [f"user{i}" for i in range(1001)]}, {"usernames": "bob"}, {"usernames": [1]}, {}):
        with pytest.raises(ApiError) as exc:
            logic.parse_usernames(body)
        assert field_of(exc) == "usernames"


def test_bearer_token_parsing() -> None:
    assert logic.bearer_token("Bearer abc.def.ghi") == "abc.def.ghi"
    assert logic.bearer_token("bearer  abc") == "abc"
    for header in ("", "Bearer", "Bearer ", "Basic abc", "abc", "Bearer a b"):
        assert logic.bearer_token(header) is None


def test_refresh_tokens_are_random_and_stored_hashed() -> None:
    a, b = logic.new_refresh_token(), logic.new_refresh_token()
    assert a != b and len(a) >= 40
    h = logic.hash_refresh_token(a)
    assert len(h) == 64 and a not in h and h == logic.hash_refresh_token(a)


# ---------------------------------------------------------------------------
# refresh rotation and reuse
# ---------------------------------------------------------------------------

NOW = 1_000_000


def record(**kw: Any) -> dict[str, Any]:
    return {"_id": "h", "device_id": "d1", "sid": "s1", "expires_ts": NOW + 1000, "used_ts": None, **kw}


def device(**kw: Any) -> dict[str, Any]:
    return {"_id": "d1", "user_id": "u1", "state": "active", "sid": "s1", **kw}


def test_refresh_outcomes() -> None:
    assert logic.refresh_outcome(record(), device(), NOW) is RefreshOutcome.ROTATE
    assert logic.refresh_outcome(record(used_ts=NOW - 5), device(), NOW) is RefreshOutcome.REUSE
    assert logic.refresh_outcome(None, None, NOW) is RefreshOutcome.REJECT
    assert logic.refresh_outcome(record(expires_ts=NOW), device(), NOW) is RefreshOutcome.REJECT
    assert logic.refresh_outcome(record(), None, NOW) is RefreshOutcome.REJECT


@pytest.mark.parametrize(
    "dev",
    [
        device(state="logged_out", sid=None),
        device(state="removed", sid=None),
        device(sid="s2"),  # a newer login replaced this family
    ],
)
def test_a_used_token_of_an_ended_family_revokes_nothing(dev: dict[str, Any]) -> None:
    assert logic.refresh_outcome(record(used_ts=NOW - 5), dev, NOW) is RefreshOutcome.REJECT
    assert logic.refresh_outcome(record(), dev, NOW) is RefreshOutcome.REJECT


# ---------------------------------------------------------------------------
# the gate
# ---------------------------------------------------------------------------


def claims(**kw: Any) -> logic.Claims:
    return logic.Claims(**{"user_id": "u1", "device_id": "d1", "session": "s1", "expires_at": NOW, **kw})


def test_authorize_needs_a_live_device_of_that_user_and_session() -> None:
    ident = logic.authorize(claims(), device(admin=True, device_type="web", primary=False))
    assert ident is not None
    assert ident.headers() == {
        "X-Auth-User": "u1",
        "X-Auth-Device": "d1",
        "X-Auth-Admin": "1",
        "X-Auth-Device-Type": "web",
        "X-Auth-Primary": "0",
    }
    ident = logic.authorize(claims(), device(device_type="mobile", primary=True))
    assert ident is not None and ident.headers()["X-Auth-Primary"] == "1" and ident.headers()["X-Auth-Admin"] == "0"
    assert logic.authorize(claims(), None) is None
    assert logic.authorize(claims(user_id="u2"), device()) is None
    assert logic.authorize(claims(session="old"), device()) is None
    assert logic.authorize(claims(), device(state="logged_out", sid=None)) is None
    assert logic.authorize(claims(), device(state="removed")) is None


# ---------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------


def test_primary_device_rule() -> None:
    assert logic.wants_primary("mobile", False, None) is True
    assert logic.wants_primary("web", False, None) is False
    assert logic.wants_primary("mobile", False, "d0") is False  # there is a primary already
    assert logic.wants_primary("mobile", True, "d1") is False  # it already is


@pytest.mark.parametrize(
    ("caller_primary", "target_primary", "same", "allowed"),
    [
        (True, False, False, True),  # primary removes a linked device
        (True, True, True, True),  # primary removes itself
        (False, True, False, False),  # secondary may not remove the primary
        (False, False, False, True),  # secondary removes another secondary
        (False, False, True, True),  # a device removes itself
    ],
)
def test_device_removal_rule(caller_primary: bool, target_primary: bool, same: bool, allowed: bool) -> None:
    assert logic.may_remove_device(caller_primary, target_primary, same) is allowed


# ---------------------------------------------------------------------------
# login refusals, usernames, deletion
# ---------------------------------------------------------------------------


def test_login_refusals() -> None:
    active = {"state": "active"}
    assert logic.login_refusal(active, True) is None
    wrong = logic.login_refusal(active, False)
    unknown = logic.login_refusal(None, False)
    assert wrong is not None and unknown is not None
    assert wrong.status == unknown.status == 401 and wrong.message == unknown.message
    disabled = logic.login_refusal({"state": "disabled"}, True)
    assert disabled is not None and disabled.status == 403 and disabled.message == "account disabled"
    # A disabled account is only revealed to someone who knows its password.
    refused = logic.login_refusal({"state": "disabled"}, False)
    assert refused is not None and refused.status == 401
    for state in ("deleting", "deleted"):
        refused = logic.login_refusal({"state": state}, True)
        assert refused is not None and refused.status == 401


def test_username_reuse_only_after_grace() -> None:
    assert logic.username_reusable({"state": "deleted", "username_free_at": NOW}, NOW) is True
    assert logic.username_reusable({"state": "deleted", "username_free_at": NOW + 1}, NOW) is False
    assert logic.username_reusable({"state": "active"}, NOW) is False
    assert logic.username_reusable({"state": "deleting"}, NOW) is False
    assert logic.tombstone("u1").startswith("~") and not logic.USERNAME_RE.match(logic.tombstone("u1"))


def test_deletion_state_machine() -> None:
    full = [DeletionStep.MARK_DELETING, DeletionStep.LOG_OUT_DEVICES, DeletionStep.ANNOUNCE, DeletionStep.MARK_DELETED]
    assert logic.deletion_steps("active") == full
    assert logic.deletion_steps("disabled") == full
    # A half-done deletion resumes with every step after the first: all of them idempotent.
    assert logic.deletion_steps("deleting") == full[1:]
    assert logic.deletion_steps("deleted") == []
    assert logic.deletion_steps(None) == []
    fields = logic.deleted_fields(NOW, 60)
    assert fields["state"] == "deleted" and fields["username_free_at"] == NOW + 60_000

"""The profile service's use cases on fake dependencies: no broker, no database."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from argon2 import PasswordHasher, Type
from chatlib.errors import ApiError
from chatlib.schemas import SessionDevice, UserSessions

from services.profile import logic
from services.profile.logic import InvalidToken, LoginRequest, SignupRequest
from services.profile.service import ProfileService

from .fakes import FakePublisher, FakeStore, FakeView, make_service

PW = "correct horse battery"


@pytest.fixture
def svc() -> ProfileService:
    return make_service()


def store(svc: ProfileService) -> FakeStore:
    assert isinstance(svc.store, FakeStore)
    return svc.store


def pub(svc: ProfileService) -> FakePublisher:
    assert isinstance(svc.publisher, FakePublisher)
    return svc.publisher


def signup(svc: ProfileService, username: str = "alice", name: str = "Alice") -> dict[str, Any]:
    return svc.signup(SignupRequest(username, PW, name))


def login(svc: ProfileService, username: str = "alice", password: str = PW, **kw: Any) -> dict[str, Any]:
    args = {"device_id": None, "device_type": "mobile", "push_token": None, **kw}
    return svc.login(LoginRequest(username, password, **args))


def auth(svc: ProfileService, tokens: dict[str, Any]) -> logic.Identity:
    return svc.authenticate(f"Bearer {tokens['access_token']}")


def status_of(fn: Any, *args: Any, **kw: Any) -> int:
    with pytest.raises(ApiError) as exc:
        fn(*args, **kw)
    return exc.value.status


# ---------------------------------------------------------------------------
# signup and login
# ---------------------------------------------------------------------------


def test_signup_stores_an_argon2id_hash_and_announces_the_user(svc: ProfileService) -> None:
    created = signup(svc)
    user = store(svc).users[created["user_id"]]
    assert user["password_hash"].startswith("$argon2id$") and PW not in user["password_hash"]
    assert created == {"user_id": user["_id"], "username": "alice", "name": "Alice"}
    [(topic, key, ev)] = pub(svc).sent
    assert (topic, key, ev.TYPE) == ("user.events.v1", created["user_id"], "user.registered")
    assert ev.model_dump() == {"user_id": created["user_id"], "username": "alice", "name": "Alice"}


def test_the_service_hashes_with_argon2id_defaults() -> None:
    svc = make_service(cheap_hashing=False)
    assert svc.hasher.type is Type.ID
    assert svc.hasher.time_cost == PasswordHasher().time_cost
    assert svc.hasher.memory_cost == PasswordHasher().memory_cost


def test_signup_conflict(svc: ProfileService) -> None:
    signup(svc)
    with pytest.raises(ApiError) as exc:
        signup(svc)
    assert exc.value.status == 409 and exc.value.details == {"field": "username"}
    assert pub(svc).types() == ["user.registered"]


def test_login_creates_devices_and_the_first_mobile_one_is_primary(svc: ProfileService) -> None:
    uid = signup(svc)["user_id"]
    web = login(svc, device_type="web")
    m1 = login(svc, device_type="mobile")
    m2 = login(svc, device_type="mobile")
    devices = store(svc).devices
    assert [devices[t["device_id"]]["primary"] for t in (web, m1, m2)] == [False, True, False]
    assert store(svc).users[uid]["primary_device"] == m1["device_id"]
    registered = [ev for _, _, ev in pub(svc).sent if ev.TYPE == "device.registered"]
    assert [(e.device_type, e.primary) for e in registered] == [("web", False), ("mobile", True), ("mobile", False)]
    assert auth(svc, m1).headers()["X-Auth-Primary"] == "1"
    assert auth(svc, web).headers()["X-Auth-Device-Type"] == "web"


def test_login_answer_shape(svc: ProfileService) -> None:
    uid = signup(svc)["user_id"]
    tokens = login(svc)
    assert set(tokens) == {"access_token", "refresh_token", "expires_in", "user_id", "device_id"}
    assert tokens["user_id"] == uid and tokens["expires_in"] == svc.config.access_ttl_s
    # Only the hash of the refresh token is stored.
    assert tokens["refresh_token"] not in store(svc).refresh
    assert logic.hash_refresh_token(tokens["refresh_token"]) in store(svc).refresh


def test_wrong_password_and_unknown_user_are_the_same_401(svc: ProfileService) -> None:
    signup(svc)
    with pytest.raises(ApiError) as wrong:
        login(svc, password="wrong password")
    with pytest.raises(ApiError) as unknown:
        login(svc, username="nobody")
    assert wrong.value.status == unknown.value.status == 401
    assert wrong.value.message == unknown.value.message
    assert not store(svc).devices


def test_login_with_a_push_token(svc: ProfileService) -> None:
    uid = signup(svc)["user_id"]
    tokens = login(svc, push_token="fcm-1")
    assert store(svc).devices[tokens["device_id"]]["push_token"] == "fcm-1"
    assert pub(svc).types(uid)[-2:] == ["device.registered", "device.push_token"]


def test_login_reuses_only_the_users_own_live_device(svc: ProfileService) -> None:
    signup(svc)
    signup(svc, "bob", "Bob")
    first = login(svc)
    again = login(svc, device_id=first["device_id"], device_type="web")
    assert again["device_id"] == first["device_id"]
    assert len(store(svc).devices) == 1
    assert store(svc).devices[first["device_id"]]["device_type"] == "mobile"  # the type is fixed at creation
    # The new session replaces the old: the earlier tokens stop working.
    with pytest.raises(InvalidToken):
        auth(svc, first)
    auth(svc, again)
    assert status_of(svc.refresh, first["refresh_token"]) == 401
    # No second device.registered for a reused device.
    assert pub(svc).types().count("device.registered") == 1
    # Someone else's device, an unknown one: the same 400.
    assert status_of(login, svc, "bob", device_id=first["device_id"]) == 400
    assert status_of(login, svc, "bob", device_id="nope") == 400


def test_password_is_rehashed_when_parameters_change(svc: ProfileService) -> None:
    uid = signup(svc)["user_id"]
    weak = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    store(svc).users[uid]["password_hash"] = weak.hash(PW)
    login(svc)
    assert not svc.hasher.check_needs_rehash(store(svc).users[uid]["password_hash"])


def test_new_hashes_use_the_configured_argon2id_cost() -> None:
    svc = make_service(cheap_hashing=False, argon2_time_cost=2, argon2_memory_kib=19456, argon2_parallelism=1)
    uid = signup(svc)["user_id"]
    stored = store(svc).users[uid]["password_hash"]
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert PW not in stored


def test_a_disable_racing_with_a_login_wins() -> None:
    svc = make_service()
    uid = signup(svc)["user_id"]
    real_insert = store(svc).insert_device

    def insert_then_disable(doc: dict[str, Any]) -> None:
        real_insert(doc)
        store(svc).users[uid]["state"] = "disabled"  # an admin acted between the checks

    store(svc).insert_device = insert_then_disable  # type: ignore[method-assign]
    assert status_of(login, svc) == 403
    [device] = store(svc).devices.values()
    assert device["state"] == "logged_out" and "sid" not in device


# ---------------------------------------------------------------------------
# refresh rotation and reuse
# ---------------------------------------------------------------------------


def test_refresh_rotates(svc: ProfileService) -> None:
    signup(svc)
    t1 = login(svc)
    t2 = svc.refresh(t1["refresh_token"])
    assert t2["device_id"] == t1["device_id"] and t2["refresh_token"] != t1["refresh_token"]
    auth(svc, t2)
    auth(svc, t1)  # the earlier access token lives until it expires: same family
    t3 = svc.refresh(t2["refresh_token"])
    auth(svc, t3)


def test_refresh_reuse_revokes_the_family(svc: ProfileService) -> None:
    uid = signup(svc)["user_id"]
    t1 = login(svc)
    other = login(svc, device_type="web")
    t2 = svc.refresh(t1["refresh_token"])
    with pytest.raises(ApiError) as exc:
        svc.refresh(t1["refresh_token"])  # the stolen copy comes back
    assert exc.value.status == 401
    for tokens in (t1, t2):
        with pytest.raises(InvalidToken):
            auth(svc, tokens)
    assert status_of(svc.refresh, t2["refresh_token"]) == 401
    device = store(svc).devices[t1["device_id"]]
    assert device["state"] == "logged_out"
    assert pub(svc).types(uid)[-1] == "device.logged_out"
    assert pub(svc).sent[-1][2].model_dump() == {"user_id": uid, "device_id": t1["device_id"]}
    auth(svc, other)  # the user's other device is untouched
    # Presenting the used token once more changes nothing and produces nothing.
    before = len(pub(svc).sent)
    assert status_of(svc.refresh, t1["refresh_token"]) == 401
    assert len(pub(svc).sent) == before


def test_a_concurrent_second_use_counts_as_reuse(svc: ProfileService) -> None:
    signup(svc)
    t1 = login(svc)
    h = logic.hash_refresh_token(t1["refresh_token"])
    real = store(svc).rotate_refresh

    def lose_the_race(token_hash: str, now: int, successor: dict[str, Any]) -> bool:
        store(svc).refresh[token_hash]["used_ts"] = now  # the other request marked it first
        return real(token_hash, now, successor)

    store(svc).rotate_refresh = lose_the_race  # type: ignore[method-assign]
    tokens_before = set(store(svc).refresh)
    assert status_of(svc.refresh, t1["refresh_token"]) == 401
    assert store(svc).refresh[h]["used_ts"] is not None
    assert set(store(svc).refresh) == tokens_before  # no successor for the loser
    assert store(svc).devices[t1["device_id"]]["state"] == "logged_out"


def test_expired_refresh_token(svc: ProfileService) -> None:
    signup(svc)
    t1 = login(svc)
    svc.clock.t += svc.config.refresh_ttl_days * 86400 + 1  # type: ignore[attr-defined]
    assert status_of(svc.refresh, t1["refresh_token"]) == 401
    assert store(svc).devices[t1["device_id"]]["state"] == "active"  # expiry is not reuse
    svc.sweep()
    assert not store(svc).refresh


# ---------------------------------------------------------------------------
# logout and the gate
# ---------------------------------------------------------------------------


def test_logout(svc: ProfileService) -> None:
    uid = signup(svc)["user_id"]
    tokens = login(svc, push_token="fcm")
    ident = auth(svc, tokens)
    svc.logout(ident.user_id, ident.device_id)
    with pytest.raises(InvalidToken):
        auth(svc, tokens)
    assert status_of(svc.refresh, tokens["refresh_token"]) == 401
    device = store(svc).devices[tokens["device_id"]]
    assert device["state"] == "logged_out" and "push_token" not in device
    assert pub(svc).types(uid)[-1] == "device.logged_out"
    # Logging in again on the same device works.
    auth(svc, login(svc, device_id=tokens["device_id"]))


def test_auth_cache_is_short_and_local_changes_invalidate_it() -> None:
    svc = make_service(auth_cache_ttl_s=1.0)
    signup(svc)
    tokens = login(svc)
    auth(svc, tokens)
    reads = store(svc).device_reads
    for _ in range(5):
        auth(svc, tokens)
    assert store(svc).device_reads == reads  # served from the cache
    svc.logout(tokens["user_id"], tokens["device_id"])
    with pytest.raises(InvalidToken):
        auth(svc, tokens)  # at once, not after the TTL


def test_a_signature_is_verified_once_but_expiry_always_counts() -> None:
    svc = make_service(auth_cache_ttl_s=1.0)
    signup(svc)
    tokens = login(svc)
    calls = 0
    real_verify = svc.tokens.verify

    def counting(token: str, now: float | None = None) -> logic.Claims:
        nonlocal calls
        calls += 1
        return real_verify(token, now)

    svc.tokens.verify = counting  # type: ignore[method-assign]
    for _ in range(3):
        auth(svc, tokens)
    assert calls == 1
    svc.clock.t += svc.config.access_ttl_s  # type: ignore[attr-defined]
    with pytest.raises(InvalidToken):
        auth(svc, tokens)


def test_an_expired_token_is_refused_without_the_cache(svc: ProfileService) -> None:
    signup(svc)
    tokens = login(svc)
    auth(svc, tokens)
    svc.clock.t += svc.config.access_ttl_s  # type: ignore[attr-defined]
    with pytest.raises(InvalidToken):
        auth(svc, tokens)


def test_a_lookup_racing_with_a_change_is_not_cached() -> None:
    svc = make_service(auth_cache_ttl_s=1.0)
    signup(svc)
    tokens = login(svc)
    real_get = store(svc).get_device

    def get_then_logout(device_id: str) -> dict[str, Any] | None:
        doc = real_get(device_id)
        svc._forget(device_id)  # a logout committed while this lookup was in flight
        return doc

    store(svc).get_device = get_then_logout  # type: ignore[method-assign]
    auth(svc, tokens)
    assert tokens["device_id"] not in svc._auth_cache


def test_the_gate_refuses_bad_headers(svc: ProfileService) -> None:
    for header in ("", "Bearer", "Basic abc", "Bearer not.a.token"):
        with pytest.raises(InvalidToken):
            svc.authenticate(header)


# ---------------------------------------------------------------------------
# profiles, contacts, presence
# ---------------------------------------------------------------------------


def test_update_me(svc: ProfileService) -> None:
    uid = signup(svc)["user_id"]
    signup(svc, "bob", "Bob")
    assert svc.update_me(uid, {"name": "Al"}) == {"user_id": uid, "username": "alice", "name": "Al"}
    assert svc.update_me(uid, {"username": "alicia"})["username"] == "alicia"
    assert status_of(svc.update_me, uid, {"username": "bob"}) == 409
    updates = [ev for _, k, ev in pub(svc).sent if k == uid and ev.TYPE == "user.updated"]
    assert [(e.username, e.name) for e in updates] == [("alice", "Al"), ("alicia", "Al")]
    # No change, no event.
    svc.update_me(uid, {"name": "Al"})
    assert pub(svc).types(uid).count("user.updated") == 2


def test_presence_and_device_last_seen_from_the_session_view(svc: ProfileService) -> None:
    uid = signup(svc)["user_id"]
    phone = login(svc)["device_id"]
    laptop = login(svc, device_type="web")["device_id"]
    assert svc.user_by_name("alice")["online"] is False and svc.user_by_name("alice")["last_seen"] is None

    def sessions(devices: list[str], online: bool, last_seen: int) -> UserSessions:
        ds = [SessionDevice(device_id=d, gateway="gw1", conn_id="c", connected_at=last_seen) for d in devices]
        return UserSessions(user_id=uid, devices=ds, online=online, last_seen=last_seen)

    view = svc.sessions
    assert isinstance(view, FakeView)
    for ev in (sessions([phone, laptop], True, 1000), sessions([phone], True, 2000)):
        view.data[uid] = ev
        svc.on_sessions_update(ev)
    assert svc.user_by_name("alice")["online"] is True
    listed = {d["device_id"]: d for d in svc.devices(uid)["devices"]}
    assert listed[phone]["online"] is True and listed[laptop]["online"] is False
    assert listed[laptop]["last_seen"] == 2000  # when it went away
    ev = sessions([], False, 3000)
    view.data[uid] = ev
    svc.on_sessions_update(ev)
    assert svc.user_by_name("alice") | {"user_id": None} == {
        "user_id": None,
        "username": "alice",
        "name": "Alice",
        "online": False,
        "last_seen": 3000,
    }
    assert {d["device_id"]: d["last_seen"] for d in svc.devices(uid)["devices"]} == {phone: 3000, laptop: 2000}


def test_contacts_sync_returns_visible_users_only(svc: ProfileService) -> None:
    a = signup(svc, "amy", "Amy")
    b = signup(svc, "ben", "Ben")
    store(svc).users[b["user_id"]]["state"] = "deleted"
    assert svc.sync_contacts(["amy", "ben", "cat"]) == {"contacts": [a]}


# ---------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------


def test_device_removal(svc: ProfileService) -> None:
    uid = signup(svc)["user_id"]
    phone = login(svc)
    web1 = login(svc, device_type="web")
    web2 = login(svc, device_type="web")
    assert status_of(svc.remove_device, uid, web1["device_id"], phone["device_id"]) == 403
    svc.remove_device(uid, web1["device_id"], web2["device_id"])
    svc.remove_device(uid, phone["device_id"], web1["device_id"])
    for tokens in (web1, web2):
        with pytest.raises(InvalidToken):
            auth(svc, tokens)
    assert [d["_id"] for d in store(svc).get_devices(uid)] == [phone["device_id"]]
    removed = [ev.device_id for _, k, ev in pub(svc).sent if ev.TYPE == "device.removed"]
    assert removed == [web2["device_id"], web1["device_id"]]
    assert status_of(svc.remove_device, uid, phone["device_id"], web1["device_id"]) == 404
    # The primary removes itself: the next mobile device becomes primary.
    svc.remove_device(uid, phone["device_id"], phone["device_id"])
    assert "primary_device" not in store(svc).users[uid]
    nxt = login(svc)
    assert store(svc).devices[nxt["device_id"]]["primary"] is True


def test_push_token_own_devices_only(svc: ProfileService) -> None:
    uid = signup(svc)["user_id"]
    bob = signup(svc, "bob", "Bob")["user_id"]
    mine = login(svc)["device_id"]
    theirs = login(svc, "bob")["device_id"]
    svc.set_push_token(uid, mine, "fcm-x")
    assert store(svc).devices[mine]["push_token"] == "fcm-x"
    assert pub(svc).sent[-1][2].model_dump() == {"user_id": uid, "device_id": mine, "push_token": "fcm-x"}
    assert status_of(svc.set_push_token, uid, theirs, "fcm-y") == 404
    assert status_of(svc.set_push_token, bob, "nope", "fcm-y") == 404
    assert "push_token" not in store(svc).devices[theirs]


# ---------------------------------------------------------------------------
# server administration
# ---------------------------------------------------------------------------


def test_admin_is_provisioned_once_with_a_generated_password_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="services.profile.service")
    svc = make_service(admin_username="root")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    password = str(warnings[0].args[-1])  # type: ignore[index]
    assert len(password) >= 16 and password in warnings[0].getMessage()
    admin = store(svc).get_user_by_username("root")
    assert admin is not None and admin["admin"] is True
    tokens = login(svc, "root", password, device_type="web")
    assert auth(svc, tokens).admin is True

    # A later start finds the account: nothing generated, nothing logged, password unchanged.
    caplog.clear()
    svc.on_setup()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any(password in r.getMessage() for r in caplog.records)
    assert len([u for u in store(svc).users.values() if u["admin"]]) == 1
    login(svc, "root", password)


def test_admin_with_a_configured_password(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    svc = make_service(admin_username="root", admin_password="configured-password")
    assert not any("configured-password" in r.getMessage() for r in caplog.records)
    assert auth(svc, login(svc, "root", "configured-password")).admin is True


def test_a_regular_account_is_never_promoted() -> None:
    svc = make_service()
    signup(svc, "root", "Root")
    svc.config.admin_username = "root"
    svc.on_setup()
    user = store(svc).get_user_by_username("root")
    assert user is not None and user["admin"] is False


def test_disable_and_enable() -> None:
    svc = make_service(admin_username="root", admin_password="configured-password")
    admin_id = store(svc).get_user_by_username("root")["_id"]  # type: ignore[index]
    uid = signup(svc)["user_id"]
    t1, t2 = login(svc), login(svc, device_type="web")
    svc.disable_user(admin_id, uid)
    for tokens in (t1, t2):
        with pytest.raises(InvalidToken):
            auth(svc, tokens)
    with pytest.raises(ApiError) as exc:
        login(svc)
    assert (exc.value.status, exc.value.message) == (403, "account disabled")
    assert status_of(login, svc, password="wrong password") == 401
    assert status_of(svc.refresh, t1["refresh_token"]) == 401
    assert pub(svc).types(uid)[-3:] == ["user.disabled", "device.logged_out", "device.logged_out"]

    svc.enable_user(admin_id, uid)
    assert pub(svc).types(uid)[-1] == "user.enabled"
    auth(svc, login(svc))
    assert [(a["actor"], a["action"], a["target"]) for a in store(svc).audit] == [
        (admin_id, "user.disable", uid),
        (admin_id, "user.enable", uid),
    ]
    assert all(isinstance(a["ts"], int) for a in store(svc).audit)
    assert status_of(svc.disable_user, admin_id, "nobody") == 404
    assert status_of(svc.enable_user, admin_id, "nobody") == 404
    assert status_of(svc.disable_user, admin_id, admin_id) == 403
    assert len(store(svc).audit) == 2  # refused actions change nothing


# ---------------------------------------------------------------------------
# account deletion
# ---------------------------------------------------------------------------


def test_delete_account(svc: ProfileService) -> None:
    uid = signup(svc)["user_id"]
    t1, t2 = login(svc), login(svc, device_type="web")
    assert status_of(svc.delete_account, uid, "wrong password") == 401
    assert store(svc).users[uid]["state"] == "active"

    svc.delete_account(uid, PW)
    user = store(svc).users[uid]
    assert user["state"] == "deleted" and "password_hash" not in user
    assert user["username_free_at"] == user["deleted_ts"] + svc.config.username_grace_s * 1000
    for tokens in (t1, t2):
        with pytest.raises(InvalidToken):
            auth(svc, tokens)
    assert pub(svc).types(uid)[-3:] == ["device.logged_out", "device.logged_out", "user.unregistered"]
    assert status_of(svc.user_by_name, "alice") == 404
    assert status_of(login, svc) == 401
    assert status_of(signup, svc) == 409  # reserved during the grace period
    # A retry after success is a no-op.
    before = len(pub(svc).sent)
    svc.delete_account(uid, PW)
    assert len(pub(svc).sent) == before


def test_username_is_free_after_the_grace_period() -> None:
    svc = make_service(username_grace_s=60)
    uid = signup(svc)["user_id"]
    svc.delete_account(uid, PW)
    svc.clock.t += 59  # type: ignore[attr-defined]
    assert status_of(signup, svc) == 409
    svc.clock.t += 1  # type: ignore[attr-defined]
    newcomer = signup(svc)
    assert newcomer["user_id"] != uid
    old = store(svc).users[uid]
    assert old["former_username"] == "alice" and old["username"] == logic.tombstone(uid)
    # Renaming to a freed name works the same way.
    bob = signup(svc, "bob", "Bob")["user_id"]
    svc.delete_account(bob, PW)
    svc.clock.t += 60  # type: ignore[attr-defined]
    assert svc.update_me(newcomer["user_id"], {"username": "bob"})["username"] == "bob"


def test_a_half_done_deletion_is_finished_by_a_retry(svc: ProfileService) -> None:
    uid = signup(svc)["user_id"]
    t1, _ = login(svc), login(svc, device_type="web")
    pub(svc).fail_after = len(pub(svc).sent)  # the broker goes away before any deletion event
    assert status_of(svc.delete_account, uid, PW) == 503
    assert store(svc).users[uid]["state"] == "deleting"
    assert status_of(login, svc) == 401  # already refused
    # A retry with the wrong password is still refused; with the right one it finishes.
    pub(svc).fail_after = None
    assert status_of(svc.delete_account, uid, "wrong password") == 401
    svc.delete_account(uid, PW)
    assert store(svc).users[uid]["state"] == "deleted"
    types = pub(svc).types(uid)
    assert types[-3:] == ["device.logged_out", "device.logged_out", "user.unregistered"]
    with pytest.raises(InvalidToken):
        auth(svc, t1)


def test_the_sweep_finishes_deletions_left_behind(svc: ProfileService) -> None:
    uid = signup(svc)["user_id"]
    login(svc)
    pub(svc).fail_after = len(pub(svc).sent) + 1  # device.logged_out goes out, then the broker dies
    assert status_of(svc.delete_account, uid, PW) == 503
    assert store(svc).users[uid]["state"] == "deleting"
    pub(svc).fail_after = None
    svc.sweep()  # too recent: an in-flight request may still be finishing it
    assert store(svc).users[uid]["state"] == "deleting"
    svc.clock.t += 31  # type: ignore[attr-defined]
    svc.sweep()
    assert store(svc).users[uid]["state"] == "deleted"
    assert pub(svc).types(uid)[-1] == "user.unregistered"


def test_deleting_a_disabled_account_is_possible(svc: ProfileService) -> None:
    uid = signup(svc)["user_id"]
    store(svc).users[uid]["state"] = "disabled"
    svc.finish_deletion(uid, "disabled")
    assert store(svc).users[uid]["state"] == "deleted"

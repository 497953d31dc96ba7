"""The profile service: accounts, tokens, profiles, contacts, devices, the token gate.

HTTP requests (http.py) call the use-case methods here; each one asks
logic.py what the rules say, writes through storage, and only then produces
the user events (``publish``: the broker has them before the client hears
"done"). It consumes nothing; it keeps a live view of session changes for
``online`` / ``last_seen``.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from chatlib import topics
from chatlib.config import ConfigError, read_secret, shared
from chatlib.errors import ApiError, ErrorCode, conflict, forbidden, invalid, not_found, unauthorized
from chatlib.schemas import (
    DeviceLoggedOut,
    DevicePushToken,
    DeviceRegistered,
    DeviceRemoved,
    Event,
    UserDisabled,
    UserEnabled,
    UserRegistered,
    UserSessions,
    UserUnregistered,
    UserUpdated,
)
from chatlib.service import Producer, Service, ServiceConfig, Storage, View
from flask import Flask
from kafka.errors import KafkaError
from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from . import logic
from .logic import Claims, DeletionStep, Identity, InvalidToken, RefreshOutcome, TokenIssuer
from .storage import ProfileStore, UsernameTaken

logger = logging.getLogger(__name__)

T = TypeVar("T")
MIN_KEY_CHARS = 32
#: A deletion left in ``deleting`` this long is finished by the sweep (seconds).
DELETION_STALE_S = 30
SWEEP_EVERY_S = 60
AUTH_CACHE_MAX = 100_000


class ProfileConfig(ServiceConfig):
    """PROFILE_* settings, plus the unprefixed server-administrator settings."""

    model_config = SettingsConfigDict(env_prefix="PROFILE_", extra="ignore")

    port: int = 8101
    # HS256 signing key of access tokens, given directly or as a file path.
    jwt_secret: SecretStr = SecretStr("")
    jwt_secret_file: str = ""
    access_ttl_s: int = Field(900, ge=30, le=86400)
    refresh_ttl_days: int = Field(30, ge=1, le=365)
    # How long a deleted account's username stays reserved.
    username_grace_s: int = Field(7 * 24 * 3600, ge=0)
    # How long /internal/auth may reuse a device lookup (0 = never); at most 1 s.
    auth_cache_ttl_s: float = Field(1.0, ge=0, le=1.0)
    # Argon2id cost of new password hashes (RFC 9106's low-memory profile by default; the
    # floor is OWASP's minimum, 19 MiB). Stored hashes carry their own parameters and are
    # re-hashed at the next login when these change.
    argon2_time_cost: int = Field(3, ge=2, le=10)
    argon2_memory_kib: int = Field(65536, ge=19456, le=1048576)
    argon2_parallelism: int = Field(4, ge=1, le=8)
    # Niceness added to the threads that hash passwords (0 = none): under a login storm the
    # token check Nginx makes on every request must not queue behind the hashes for the CPU.
    hash_nice: int = Field(10, ge=0, le=19)
    # Failed logins: after this many for one username (or from one address) within the window,
    # that username (address) is locked out; each further lockout doubles, up to the maximum.
    # 0 turns a limit off. Exempt addresses (comma list) are never locked out per address.
    login_failures_per_account: int = Field(5, ge=0)
    login_failures_per_address: int = Field(50, ge=0)
    login_failure_window_s: int = Field(900, ge=1)
    login_lockout_s: int = Field(60, ge=1)
    login_max_lockout_s: int = Field(3600, ge=1)
    login_exempt_addresses: str = ""
    admin_username: str = shared("admin", "ADMIN_USERNAME")
    admin_password: SecretStr = shared(SecretStr(""), "ADMIN_PASSWORD")

    _signing_key: str = PrivateAttr("")

    @field_validator("admin_username")
    @classmethod
    def _admin_username(cls, v: str) -> str:
        if v and not logic.USERNAME_RE.match(v):
            raise ValueError("must be 3 to 32 characters of a-z, 0-9, '_', '.', '-' (or empty: no administrator)")
        return v

    @field_validator("admin_password")
    @classmethod
    def _admin_password(cls, v: SecretStr) -> SecretStr:
        n = len(v.get_secret_value())
        if n and not logic.PASSWORD_MIN <= n <= logic.PASSWORD_MAX:
            raise ValueError(f"must be {logic.PASSWORD_MIN} to {logic.PASSWORD_MAX} characters (or empty: generated)")
        return v

    @model_validator(mode="after")
    def _load_key(self) -> ProfileConfig:
        # ConfigError (not ValueError) passes through pydantic untouched: the runner exits 2 with it.
        key = read_secret(self.jwt_secret.get_secret_value(), self.jwt_secret_file or None, "PROFILE_JWT_SECRET")
        if len(key) < MIN_KEY_CHARS:
            raise ConfigError(f"PROFILE_JWT_SECRET: must be at least {MIN_KEY_CHARS} characters")
        self._signing_key = key
        return self

    @property
    def signing_key(self) -> str:
        return self._signing_key

    @property
    def login_limits(self) -> logic.LoginLimits:
        return logic.LoginLimits(
            per_account=self.login_failures_per_account,
            per_address=self.login_failures_per_address,
            window_s=self.login_failure_window_s,
            lockout_s=self.login_lockout_s,
            max_lockout_s=max(self.login_lockout_s, self.login_max_lockout_s),
            exempt_addresses=frozenset(a.strip() for a in self.login_exempt_addresses.split(",") if a.strip()),
        )


def _session_key(ev: Event) -> str:
    return str(getattr(ev, "user_id", ""))


#: OS threads already given the hashing niceness (gevent's pool threads live on).
_niced_threads: set[int] = set()


def lower_this_thread(nice: int) -> None:
    """Add ``nice`` to the calling OS thread's niceness, once per thread (Linux schedules
    threads one by one; libargon2's lane threads inherit it). Without the right to, or off
    Linux, the thread keeps its priority."""
    tid = threading.get_native_id()
    if nice <= 0 or tid in _niced_threads:
        return
    _niced_threads.add(tid)
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (OSError, AttributeError):  # pragma: no cover - not Linux, or not allowed
        logger.warning("cannot lower the priority of the password-hashing threads")


def _offload(fn: Callable[..., T], *args: Any, nice: int = 0) -> T:
    """Run CPU-heavy work (Argon2, ~0.1 s) off the gevent loop when the process is patched.

    Argon2 releases the GIL, so a thread pool keeps /internal/auth answering
    while logins hash; the pool's threads run ``nice`` steps below the rest of
    the process, so the token check also gets the CPU first when hashes fill
    every core. Unpatched (unit tests) it simply runs inline.
    """
    try:
        from gevent import get_hub, monkey
    except ImportError:  # pragma: no cover - gevent is a runtime dependency
        return fn(*args)
    if monkey.is_module_patched("threading"):
        return get_hub().threadpool.apply(_lowered, (nice, fn, *args))  # type: ignore[no-any-return]
    return fn(*args)


def _lowered(nice: int, fn: Callable[..., T], *args: Any) -> T:
    lower_this_thread(nice)
    return fn(*args)


class ProfileService(Service):
    """Accounts, tokens, profiles, contacts and devices; answers Nginx's auth_request."""

    name = "profile"
    config_class = ProfileConfig
    # Largest legitimate body: a contact sync of 1000 usernames (~40 KB).
    max_body_bytes = 64 * 1024

    store = Storage(ProfileStore)
    publisher = Producer()
    sessions = View(topics.SESSION_CHANGES, key=_session_key)

    config: ProfileConfig

    def __init__(self, config: ServiceConfig, **overrides: Any):
        super().__init__(config, **overrides)
        assert isinstance(config, ProfileConfig)
        self.tokens = TokenIssuer(config.signing_key, config.access_ttl_s)
        self.hasher = PasswordHasher(
            time_cost=config.argon2_time_cost,
            memory_cost=config.argon2_memory_kib,
            parallelism=config.argon2_parallelism,
        )  # Argon2id
        self._dummy_hash: str | None = None
        self._auth_cache: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._verified_tokens: dict[str, Claims] = {}
        # Bumped by every local device change, so a lookup that raced with one is not cached.
        self._auth_epoch = 0
        self._device_seen: dict[str, int] = {}
        self._present: dict[str, set[str]] = {}
        self._stop_sweep = threading.Event()

    def clock(self) -> float:
        """Seconds since the epoch (a unit test replaces it with ``clock=...``)."""
        return time.time()

    def now(self) -> int:
        return int(self.clock() * 1000)

    # -- lifecycle ---------------------------------------------------------

    def on_setup(self) -> None:
        """Provision the server administrator on first start."""
        self._dummy_hash = self.hasher.hash(secrets.token_hex(16))
        self.provision_admin()

    def on_start(self) -> None:
        threading.Thread(target=self._sweep_loop, name="profile-sweep", daemon=True).start()

    def on_stop(self) -> None:
        self._stop_sweep.set()

    def routes(self, app: Flask) -> None:
        from .http import blueprint

        app.register_blueprint(blueprint(self))

    def provision_admin(self) -> None:
        """Create the ADMIN_USERNAME account once; later starts leave it alone.

        With ADMIN_PASSWORD empty a password is generated and logged once, at
        WARNING: it is the only password this service ever logs.
        """
        cfg = self.config
        username = cfg.admin_username
        if not username:
            logger.info("ADMIN_USERNAME is empty: no server administrator is provisioned")
            return
        existing = self.store.get_user_by_username(username)
        if existing is not None:
            if not existing.get("admin"):
                logger.warning(
                    "ADMIN_USERNAME %s belongs to a regular account; it is NOT made an administrator", username
                )
            return
        password = cfg.admin_password.get_secret_value()
        generated = not password
        if generated:
            password = secrets.token_urlsafe(18)
        now = self.now()
        doc = self._new_user_doc(username, password, username, now)
        doc["admin"] = True
        try:
            self.store.insert_user(doc)
        except UsernameTaken:
            return  # another instance provisioned it first
        if generated:
            # The wording avoids "password:" so the log redaction filter keeps the value visible here.
            logger.warning(
                "server administrator %s created with a generated password (shown only this once, "
                "set ADMIN_PASSWORD to choose one): %s",
                username,
                password,
            )
        else:
            logger.info("server administrator %s created", username)
        try:
            self._emit(doc["_id"], UserRegistered(user_id=doc["_id"], username=username, name=username))
        except ApiError:
            logger.warning("the administrator account exists, but its user.registered event was not produced")

    # -- helpers -----------------------------------------------------------

    def _new_user_doc(self, username: str, password: str, name: str, now: int) -> dict[str, Any]:
        return {
            "_id": logic.new_id(),
            "username": username,
            "name": name,
            "password_hash": _offload(self.hasher.hash, password, nice=self.config.hash_nice),
            "admin": False,
            "state": logic.ACTIVE,
            "created_ts": now,
            "updated_ts": now,
        }

    def _check_password(self, user: dict[str, Any] | None, password: str) -> bool:
        """Verify in constant-ish time: an unknown user costs one Argon2 verify too."""
        stored = (user or {}).get("password_hash") or self._dummy_hash or ""
        try:
            ok = bool(_offload(self.hasher.verify, stored, password, nice=self.config.hash_nice))
        except (VerificationError, InvalidHashError):
            return False
        return ok and user is not None and bool(user.get("password_hash"))

    def _emit(self, key: str, *events: Event) -> None:
        """Produce events keyed by user and wait for the broker (after the write they describe)."""
        try:
            futures = [self.publisher.send(topics.USER_EVENTS, ev, key=key) for ev in events]
            for fut in futures:
                fut.get(timeout=10)
        except KafkaError as exc:
            logger.error("producing %d user event(s) failed: %s", len(events), exc.__class__.__name__)
            raise ApiError(ErrorCode.UNAVAILABLE, "event bus unavailable, try again") from None

    def _forget(self, *device_ids: str) -> None:
        self._auth_epoch += 1
        for did in device_ids:
            self._auth_cache.pop(did, None)

    def _user(self, user_id: str) -> dict[str, Any]:
        """The caller's own account, or 401 if it no longer stands."""
        user = self.store.get_user(user_id)
        if user is None or user.get("state") not in logic.VISIBLE_STATES:
            raise unauthorized()
        return user

    def _claim_username(self, username: str, write: Callable[[], None]) -> None:
        """Run ``write`` (which takes ``username``); on a clash free an expired reservation once and retry."""
        try:
            write()
            return
        except UsernameTaken:
            if not self.store.set_username_released(username, self.now()):
                raise conflict("username is taken", field="username") from None
        try:
            write()
        except UsernameTaken:
            raise conflict("username is taken", field="username") from None

    # -- accounts ----------------------------------------------------------

    def signup(self, req: logic.SignupRequest) -> dict[str, Any]:
        """Create an account (201); 409 when the username is taken or still reserved."""
        doc = self._new_user_doc(req.username, req.password, req.name, self.now())
        self._claim_username(req.username, lambda: self.store.insert_user(doc))
        logger.info("user %s registered", doc["_id"])
        self._emit(doc["_id"], UserRegistered(user_id=doc["_id"], username=req.username, name=req.name))
        return logic.profile_view(doc)

    def login(self, req: logic.LoginRequest, address: str | None = None) -> dict[str, Any]:
        """Check credentials, then log a new or the caller's existing device in.

        A username or an address locked out after failed logins is refused (429) before its
        password is even looked at: a right password then reads the same as a wrong one.
        """
        limits = self.config.login_limits
        keys = logic.throttle_keys(req.username, address, limits)
        counters = self.store.get_login_counters(keys) if keys else []
        wait = logic.lockout_wait_s(counters, self.now())
        if wait:
            raise logic.LoginThrottled(wait)
        user = self.store.get_user_by_username(req.username) if logic.USERNAME_RE.match(req.username) else None
        password_ok = self._check_password(user, req.password)
        refusal = logic.login_refusal(user, password_ok)
        if refusal is not None:
            if refusal.code is ErrorCode.UNAUTHORIZED:
                self._count_failed_login(keys, limits)
            raise refusal
        assert user is not None
        account = logic.account_key(req.username)
        if any(c["_id"] == account for c in counters):
            # Only the account's own count: another account's success must not clear an address.
            self.store.delete_login_counter(account)
        if self.hasher.check_needs_rehash(user["password_hash"]):
            new_hash = _offload(self.hasher.hash, req.password, nice=self.config.hash_nice)
            self.store.set_user(user["_id"], {"password_hash": new_hash})
        uid, now = user["_id"], self.now()
        sid = logic.new_id()
        events: list[Event] = []
        if req.device_id is None:
            device = self._create_device(user, req.device_type, sid, req.push_token, now)
            events.append(
                DeviceRegistered(
                    user_id=uid, device_id=device["_id"], device_type=device["device_type"], primary=device["primary"]
                )
            )
        else:
            device = self._reuse_device(user, req.device_id, sid, req.push_token, now)
        did = device["_id"]
        tokens = self._issue(uid, did, sid, now)
        # A disable that raced with this login must win: check again after the write.
        fresh = self.store.get_user(uid)
        if fresh is None or fresh.get("state") != logic.ACTIVE:
            self.store.set_device(did, {"state": logic.DEVICE_LOGGED_OUT}, unset=("sid", "push_token"))
            self._forget(did)
            raise logic.login_refusal(fresh, True) or forbidden("account disabled")
        if req.push_token is not None:
            events.append(DevicePushToken(user_id=uid, device_id=did, push_token=req.push_token))
        logger.info("user %s logged in on device %s", uid, did)
        if events:
            self._emit(uid, *events)
        return tokens

    def _count_failed_login(self, keys: dict[str, int], limits: logic.LoginLimits) -> None:
        """One more failure on each key; a key that reaches its limit is locked out."""
        now = self.now()
        window_ms = limits.window_s * 1000
        for key, limit in keys.items():
            doc = self.store.add_login_failure(key, now, window_ms, now + window_ms)
            failures = int(doc.get("failures", 1))
            if failures < limit:
                continue
            until = now + logic.lockout_ms(int(doc.get("lockouts", 0)), limits)
            if self.store.set_login_locked(key, failures, until, until + window_ms):
                logger.warning("%d failed logins for %s: locked out for %d s", failures, key, (until - now) // 1000)

    def _create_device(
        self, user: dict[str, Any], device_type: str, sid: str, push_token: str | None, now: int
    ) -> dict[str, Any]:
        uid, did = user["_id"], logic.new_id()
        primary = logic.wants_primary(
            device_type, False, user.get("primary_device")
        ) and self.store.set_primary_claimed(uid, did)
        doc: dict[str, Any] = {
            "_id": did,
            "user_id": uid,
            "device_type": device_type,
            "primary": primary,
            "admin": bool(user.get("admin")),
            "state": logic.DEVICE_ACTIVE,
            "sid": sid,
            "created_ts": now,
            "last_login_ts": now,
        }
        if push_token is not None:
            doc["push_token"] = push_token
        try:
            self.store.insert_device(doc)
        except Exception:
            if primary:
                self.store.delete_primary(uid, did)
            raise
        return doc

    def _reuse_device(
        self, user: dict[str, Any], device_id: str, sid: str, push_token: str | None, now: int
    ) -> dict[str, Any]:
        device = self.store.get_device(device_id)
        if device is None or device.get("user_id") != user["_id"] or device.get("state") == logic.DEVICE_REMOVED:
            # The same answer for someone else's device and for none: ids are not probed this way.
            raise invalid("unknown device_id: log in without it to register a new device", field="device_id")
        fields: dict[str, Any] = {"state": logic.DEVICE_ACTIVE, "sid": sid, "last_login_ts": now}
        if logic.wants_primary(device["device_type"], bool(device.get("primary")), user.get("primary_device")):
            if self.store.set_primary_claimed(user["_id"], device_id):
                fields["primary"] = True
        if push_token is not None:
            fields["push_token"] = push_token
        # A new session replaces the device's previous one: its older tokens stop working.
        self.store.set_device(device_id, fields)
        self._forget(device_id)
        return {**device, **fields}

    def _issue(self, user_id: str, device_id: str, sid: str, now: int) -> dict[str, Any]:
        refresh, record = self._new_refresh(user_id, device_id, sid, now)
        self.store.insert_refresh(record)
        return self._tokens(user_id, device_id, sid, refresh, now)

    def _new_refresh(self, user_id: str, device_id: str, sid: str, now: int) -> tuple[str, dict[str, Any]]:
        """A new refresh token and the record stored for it (its hash, never the token)."""
        refresh = logic.new_refresh_token()
        return refresh, {
            "_id": logic.hash_refresh_token(refresh),
            "user_id": user_id,
            "device_id": device_id,
            "sid": sid,
            "created_ts": now,
            "expires_ts": now + self.config.refresh_ttl_days * 86_400_000,
            "used_ts": None,
        }

    def _tokens(self, user_id: str, device_id: str, sid: str, refresh: str, now: int) -> dict[str, Any]:
        return {
            "access_token": self.tokens.issue(user_id, device_id, sid, now / 1000),
            "refresh_token": refresh,
            "expires_in": self.tokens.access_ttl_s,
            "user_id": user_id,
            "device_id": device_id,
        }

    def refresh(self, token: str) -> dict[str, Any]:
        """Rotate: the presented token is used up and a new pair issued.

        Presenting an already-used token while its family is live means a copy
        leaked: the whole family is revoked (the device is logged out).
        """
        now = self.now()
        token_hash = logic.hash_refresh_token(token)
        record = self.store.get_refresh(token_hash)
        device = self.store.get_device(record["device_id"]) if record else None
        outcome = logic.refresh_outcome(record, device, now)
        if outcome is RefreshOutcome.REJECT:
            raise unauthorized("invalid or expired refresh token")
        assert record is not None and device is not None
        if outcome is RefreshOutcome.ROTATE:
            user = self.store.get_user(device["user_id"])
            if user is None or user.get("state") != logic.ACTIVE:
                raise unauthorized("invalid or expired refresh token")
            refresh, successor = self._new_refresh(device["user_id"], device["_id"], record["sid"], now)
            if self.store.rotate_refresh(token_hash, now, successor):
                return self._tokens(device["user_id"], device["_id"], record["sid"], refresh, now)
            # A concurrent use got there first: the token was used twice.
        logger.warning("refresh token reuse on device %s: logging the device out", device["_id"])
        self._log_out(device["user_id"], device["_id"], expect_sid=record["sid"])
        raise unauthorized("refresh token already used; the device was logged out")

    def _log_out(self, user_id: str, device_id: str, expect_sid: str | None = None) -> None:
        expect = {"sid": expect_sid} if expect_sid else None
        changed = self.store.set_device(
            device_id, {"state": logic.DEVICE_LOGGED_OUT}, unset=("sid", "push_token"), expect=expect
        )
        self._forget(device_id)
        if changed:
            self._emit(user_id, DeviceLoggedOut(user_id=user_id, device_id=device_id))

    def logout(self, user_id: str, device_id: str) -> None:
        """This device's tokens stop working now; gateways close its sockets (DeviceLoggedOut)."""
        self._log_out(user_id, device_id)
        logger.info("device %s logged out", device_id)

    # -- the token gate ----------------------------------------------------

    def authenticate(self, authorization: str) -> Identity:
        """The identity behind a bearer token, or InvalidToken. Runs on every request."""
        token = logic.bearer_token(authorization)
        if token is None:
            raise InvalidToken("no bearer token")
        claims = self._verified(token)
        identity = logic.authorize(claims, self._device_for_auth(claims.device_id))
        if identity is None:
            raise InvalidToken("device not logged in with this token")
        return identity

    def _verified(self, token: str) -> Claims:
        """Verify a token's signature once; later requests with it only check its expiry.

        A signature never stops being valid, so remembering the outcome is safe
        (the device lookup still runs every time, cached at most a second).
        """
        now = self.clock()
        if self.config.auth_cache_ttl_s <= 0:
            return self.tokens.verify(token, now)
        claims = self._verified_tokens.get(token)
        if claims is not None:
            if claims.expires_at > now:
                return claims
            del self._verified_tokens[token]
        claims = self.tokens.verify(token, now)
        if len(self._verified_tokens) >= AUTH_CACHE_MAX:
            self._verified_tokens.clear()
        self._verified_tokens[token] = claims
        return claims

    def _device_for_auth(self, device_id: str) -> dict[str, Any] | None:
        ttl = self.config.auth_cache_ttl_s
        if ttl <= 0:
            return self.store.get_device(device_id)
        t = time.monotonic()
        hit = self._auth_cache.get(device_id)
        if hit is not None and hit[0] > t:
            return hit[1]
        epoch = self._auth_epoch
        device = self.store.get_device(device_id)
        keep = (
            {k: device.get(k) for k in ("user_id", "state", "sid", "admin", "device_type", "primary")}
            if device
            else None
        )
        if epoch == self._auth_epoch:
            if len(self._auth_cache) >= AUTH_CACHE_MAX:
                self._auth_cache.clear()
            self._auth_cache[device_id] = (t + ttl, keep)
        return keep

    # -- profiles ----------------------------------------------------------

    def me(self, user_id: str) -> dict[str, Any]:
        return logic.profile_view(self._user(user_id))

    def update_me(self, user_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Change name and/or username (409 if the new username is taken)."""
        user = self._user(user_id)
        changes = logic.parse_profile_patch(body, user["username"])
        if all(user.get(k) == v for k, v in changes.items()):
            return logic.profile_view(user)
        fields = {**changes, "updated_ts": self.now()}
        if "username" in changes and changes["username"] != user["username"]:
            self._claim_username(changes["username"], lambda: self._set_visible(user_id, fields))
        else:
            self._set_visible(user_id, fields)
        updated = {**user, **changes}
        self._emit(user_id, UserUpdated(user_id=user_id, username=updated["username"], name=updated["name"]))
        return logic.profile_view(updated)

    def _set_visible(self, user_id: str, fields: dict[str, Any]) -> None:
        if not self.store.set_user(user_id, fields, states=logic.VISIBLE_STATES):
            raise unauthorized()

    def presence(self, user_id: str) -> tuple[bool, int | None]:
        ev = self.sessions.get(user_id)
        if not isinstance(ev, UserSessions):
            return False, None
        return bool(ev.online), ev.last_seen or None

    def user_by_name(self, username: str) -> dict[str, Any]:
        user = self.store.get_user_by_username(username) if logic.USERNAME_RE.match(username) else None
        if user is None or user.get("state") not in logic.VISIBLE_STATES:
            raise not_found("no such user")
        online, last_seen = self.presence(user["_id"])
        return {**logic.profile_view(user), "online": online, "last_seen": last_seen}

    def sync_contacts(self, usernames: list[str]) -> dict[str, Any]:
        return {"contacts": [logic.profile_view(u) for u in self.store.get_visible_users(usernames)]}

    # -- devices -----------------------------------------------------------

    def on_sessions_update(self, ev: Event, previous: Event | None = None) -> None:
        """Keep each device's last-seen time from the session changes (View hook, consumer thread)."""
        if not isinstance(ev, UserSessions):
            return
        now_present = {d.device_id for d in ev.devices}
        for d in ev.devices:
            self._device_seen[d.device_id] = max(ev.last_seen, d.connected_at, self._device_seen.get(d.device_id, 0))
        for gone in self._present.get(ev.user_id, set()) - now_present:
            self._device_seen[gone] = max(ev.last_seen, self._device_seen.get(gone, 0))
        self._present[ev.user_id] = now_present

    def devices(self, user_id: str) -> dict[str, Any]:
        ev = self.sessions.get(user_id)
        online = {d.device_id for d in ev.devices} if isinstance(ev, UserSessions) else set()
        return {
            "devices": [
                logic.device_view(d, d["_id"] in online, self._device_seen.get(d["_id"]))
                for d in self.store.get_devices(user_id)
            ]
        }

    def _own_device(self, user_id: str, device_id: str) -> dict[str, Any]:
        device = self.store.get_device(device_id)
        if device is None or device.get("user_id") != user_id or device.get("state") == logic.DEVICE_REMOVED:
            raise not_found("no such device")
        return device

    def set_push_token(self, user_id: str, device_id: str, push_token: str) -> None:
        self._own_device(user_id, device_id)
        self.store.set_device(device_id, {"push_token": push_token})
        self._emit(user_id, DevicePushToken(user_id=user_id, device_id=device_id, push_token=push_token))

    def remove_device(self, user_id: str, caller_device: str, device_id: str) -> None:
        """Remove a device: logged out for good, sockets closed and queue dropped downstream."""
        target = self._own_device(user_id, device_id)
        caller = self.store.get_device(caller_device) or {}
        if not logic.may_remove_device(
            bool(caller.get("primary")), bool(target.get("primary")), caller_device == device_id
        ):
            raise forbidden("a secondary device cannot remove the primary device")
        self.store.set_device(
            device_id, {"state": logic.DEVICE_REMOVED, "removed_ts": self.now()}, unset=("sid", "push_token")
        )
        self._forget(device_id)
        if target.get("primary"):
            self.store.delete_primary(user_id, device_id)
        logger.info("device %s of user %s removed", device_id, user_id)
        self._emit(user_id, DeviceRemoved(user_id=user_id, device_id=device_id))

    # -- server administration --------------------------------------------

    def _audit(self, actor: str, action: str, target: str) -> None:
        self.store.insert_audit({"actor": actor, "action": action, "target": target, "ts": self.now()})

    def _admin_target(self, user_id: str) -> dict[str, Any]:
        user = self.store.get_user(user_id)
        if user is None or user.get("state") not in logic.VISIBLE_STATES:
            raise not_found("no such user")
        return user

    def disable_user(self, actor: str, user_id: str) -> None:
        """Refuse logins and log out every device until enabled again."""
        target = self._admin_target(user_id)
        if target.get("admin"):
            raise forbidden("a server administrator cannot be disabled")
        self.store.set_user(user_id, {"state": logic.DISABLED, "updated_ts": self.now()}, states=logic.VISIBLE_STATES)
        device_ids = self.store.set_devices_logged_out(user_id)
        self._forget(*device_ids)
        self._audit(actor, "user.disable", user_id)
        logger.info("administrator %s disabled user %s", actor, user_id)
        self._emit(
            user_id, UserDisabled(user_id=user_id), *(DeviceLoggedOut(user_id=user_id, device_id=d) for d in device_ids)
        )

    def enable_user(self, actor: str, user_id: str) -> None:
        self._admin_target(user_id)
        self.store.set_user(user_id, {"state": logic.ACTIVE, "updated_ts": self.now()}, states=logic.VISIBLE_STATES)
        self._audit(actor, "user.enable", user_id)
        logger.info("administrator %s enabled user %s", actor, user_id)
        self._emit(user_id, UserEnabled(user_id=user_id))

    # -- account deletion --------------------------------------------------

    def delete_account(self, user_id: str, password: str) -> None:
        """Unregister the caller's account after checking the password (idempotent)."""
        user = self.store.get_user(user_id)
        if user is None or user.get("state") == logic.DELETED:
            return  # already done: a retry succeeds
        if not self._check_password(user, password):
            raise unauthorized("wrong password")
        self.finish_deletion(user_id, user.get("state"))

    def finish_deletion(self, user_id: str, state: str | None) -> None:
        """Run the deletion steps left for ``state``; each is safe to repeat."""
        for step in logic.deletion_steps(state):
            if step is DeletionStep.MARK_DELETING:
                # Only from a live state: a concurrent deletion that got further is not rewound.
                if not self.store.set_user(
                    user_id, {"state": logic.DELETING, "deleting_ts": self.now()}, states=logic.VISIBLE_STATES
                ):
                    user = self.store.get_user(user_id)
                    if user is None or user.get("state") != logic.DELETING:
                        return
            elif step is DeletionStep.LOG_OUT_DEVICES:
                device_ids = self.store.set_devices_logged_out(user_id)
                self._forget(*device_ids)
                if device_ids:
                    self._emit(user_id, *(DeviceLoggedOut(user_id=user_id, device_id=d) for d in device_ids))
            elif step is DeletionStep.ANNOUNCE:
                self._emit(user_id, UserUnregistered(user_id=user_id))
            elif step is DeletionStep.MARK_DELETED:
                self.store.set_user(
                    user_id,
                    logic.deleted_fields(self.now(), self.config.username_grace_s),
                    unset=("password_hash", "primary_device"),
                    states=[logic.DELETING],
                )
                logger.info("user %s deleted", user_id)

    def sweep(self) -> None:
        """Finish deletions left half-done (crash, broker away) and drop expired refresh tokens."""
        before = self.now() - DELETION_STALE_S * 1000
        for user in self.store.get_users_stuck_in(logic.DELETING, "deleting_ts", before):
            logger.info("finishing the interrupted deletion of user %s", user["_id"])
            self.finish_deletion(user["_id"], logic.DELETING)
        self.store.delete_expired_refresh(self.now())

    def _sweep_loop(self) -> None:
        # At start (a crash may have left work), then periodically.
        while True:
            try:
                self.sweep()
            except Exception:  # try again next round
                logger.warning("profile sweep failed", exc_info=True)
            if self._stop_sweep.wait(SWEEP_EVERY_S):
                return

"""The profile service's rules: validation, tokens, devices, refresh rotation, deletion.

Pure functions and small value classes, no I/O: the service (service.py) reads
and writes through storage and produces events; it asks this module what to do.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from chatlib.errors import ApiError, ErrorCode, invalid, reject_nulls

# ---------------------------------------------------------------------------
# Account states and limits
# ---------------------------------------------------------------------------

ACTIVE = "active"
DISABLED = "disabled"
DELETING = "deleting"
DELETED = "deleted"
#: States in which a user exists for other users (profile lookups, contacts).
VISIBLE_STATES = (ACTIVE, DISABLED)

DEVICE_ACTIVE = "active"  # logged in: its current token family works
DEVICE_LOGGED_OUT = "logged_out"  # may log in again with its device_id
DEVICE_REMOVED = "removed"  # gone for good
DEVICE_TYPES = ("mobile", "web")

USERNAME_RE = re.compile(r"^[a-z0-9_.-]{3,32}$")
PASSWORD_MIN, PASSWORD_MAX = 8, 128
NAME_MAX = 64
PUSH_TOKEN_MAX = 4096
DEVICE_ID_MAX = 64
MAX_CONTACTS = 1000
#: Usernames of deleted accounts whose grace period ended are renamed to this
#: prefix plus the user id: it holds characters a real username cannot have,
#: so the unique index on ``username`` never blocks anyone with it.
TOMBSTONE_PREFIX = "~deleted~"

WRONG_CREDENTIALS = "wrong username or password"


def new_id() -> str:
    """An opaque id (users, devices, token ids): 32 hex characters, no ':'."""
    return uuid.uuid4().hex


def now_ms(clock: float | None = None) -> int:
    return int((time.time() if clock is None else clock) * 1000)


# ---------------------------------------------------------------------------
# Input validation (raise the contract's 400 with details.field)
# ---------------------------------------------------------------------------


def _required_string(value: Any, field: str) -> str:
    if value is None:
        raise invalid(f"{field} is required", field=field)
    if not isinstance(value, str):
        raise invalid(f"{field} must be a string", field=field)
    return value


def _string(body: dict[str, Any], field: str, required: bool) -> str | None:
    value = body.get(field)
    if value is None and not required:
        return None
    return _required_string(value, field)


def validate_username(value: Any, field: str = "username") -> str:
    """3 to 32 characters of ``[a-z0-9_.-]`` (no case folding: 'Alice' is refused, not rewritten)."""
    value = _required_string(value, field)
    if not USERNAME_RE.match(value):
        raise invalid(f"{field} must be 3 to 32 characters of a-z, 0-9, '_', '.', '-'", field=field)
    return value


def validate_password(value: Any, field: str = "password") -> str:
    value = _required_string(value, field)
    if not PASSWORD_MIN <= len(value) <= PASSWORD_MAX:
        raise invalid(f"{field} must be {PASSWORD_MIN} to {PASSWORD_MAX} characters", field=field)
    return value


def validate_name(value: Any, default: str) -> str:
    """A display name: at most 64 characters; missing or blank gives ``default``."""
    if value is None:
        return default
    if not isinstance(value, str):
        raise invalid("name must be a string", field="name")
    value = value.strip()
    if len(value) > NAME_MAX:
        raise invalid(f"name must be at most {NAME_MAX} characters", field="name")
    return value or default


def validate_device_type(value: Any) -> str:
    """``mobile`` (the default) or ``web``."""
    if value is None:
        return "mobile"
    if value not in DEVICE_TYPES:
        raise invalid("device_type must be 'mobile' or 'web'", field="device_type")
    return str(value)


def validate_push_token(value: Any, required: bool) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= PUSH_TOKEN_MAX:
        raise invalid(f"push_token must be a string of 1 to {PUSH_TOKEN_MAX} characters", field="push_token")
    return value


@dataclass(frozen=True)
class SignupRequest:
    username: str
    password: str
    name: str


def parse_signup(body: dict[str, Any]) -> SignupRequest:
    reject_nulls(body, "name")
    username = validate_username(body.get("username"))
    password = validate_password(body.get("password"))
    return SignupRequest(username, password, validate_name(body.get("name"), username))


@dataclass(frozen=True)
class LoginRequest:
    username: str
    password: str
    device_id: str | None
    device_type: str
    push_token: str | None


def parse_login(body: dict[str, Any]) -> LoginRequest:
    """Shapes are checked (400); a username or password of the wrong format just fails to match (401)."""
    reject_nulls(body, "device_id", "device_type", "push_token")
    username = _string(body, "username", True)
    password = _string(body, "password", True)
    device_id = _string(body, "device_id", False)
    if device_id is not None and not 1 <= len(device_id) <= DEVICE_ID_MAX:
        raise invalid("device_id is not a valid device id", field="device_id")
    assert username is not None and password is not None
    return LoginRequest(
        username,
        password,
        device_id,
        validate_device_type(body.get("device_type")),
        validate_push_token(body.get("push_token"), required=False),
    )


def parse_profile_patch(body: dict[str, Any], current_username: str) -> dict[str, str]:
    """The fields a PATCH /v1/me changes: ``name`` and/or ``username``."""
    reject_nulls(body, "name", "username")
    if "name" not in body and "username" not in body:
        raise invalid("give name and/or username to change", field="name")
    changes: dict[str, str] = {}
    if "username" in body:
        changes["username"] = validate_username(body.get("username"))
    if "name" in body:
        changes["name"] = validate_name(body.get("name"), changes.get("username", current_username))
    return changes


def parse_usernames(body: dict[str, Any]) -> list[str]:
    """The contact list of a sync: at most 1000 strings, deduplicated, in order."""
    value = body.get("usernames")
    if not isinstance(value, list):
        raise invalid("usernames must be a list of strings", field="usernames")
    if len(value) > MAX_CONTACTS:
        raise invalid(f"at most {MAX_CONTACTS} usernames per sync", field="usernames")
    if not all(isinstance(u, str) for u in value):
        raise invalid("usernames must be a list of strings", field="usernames")
    # Names that cannot exist are not looked up at all.
    return list(dict.fromkeys(u for u in value if USERNAME_RE.match(u)))


# ---------------------------------------------------------------------------
# Access tokens (HS256 JWT) and refresh tokens (opaque, stored hashed)
# ---------------------------------------------------------------------------


#: Tolerated clock difference between profile instances for ``iat`` (seconds).
CLOCK_SKEW_S = 60


class InvalidToken(Exception):
    """The token is expired, forged, malformed or of the wrong algorithm."""


@dataclass(frozen=True)
class Claims:
    user_id: str
    device_id: str
    session: str
    expires_at: int


class TokenIssuer:
    """Issues and verifies access tokens.

    Claims: ``sub`` (user id), ``did`` (device id), ``sid`` (the device's
    login session, i.e. its refresh-token family: logging the device out
    changes it, so every access token of that family dies at once), ``iat``,
    ``exp``, ``jti``. Verification pins the algorithm to HS256, which refuses
    ``alg: none`` and every other algorithm.
    """

    ALGORITHM = "HS256"

    def __init__(self, key: str, access_ttl_s: int):
        self._key = key
        self.access_ttl_s = access_ttl_s

    def issue(self, user_id: str, device_id: str, session: str, now: float | None = None) -> str:
        iat = int(time.time() if now is None else now)
        claims = {
            "sub": user_id,
            "did": device_id,
            "sid": session,
            "iat": iat,
            "exp": iat + self.access_ttl_s,
            "jti": new_id(),
        }
        return jwt.encode(claims, self._key, algorithm=self.ALGORITHM)

    def verify(self, token: str, now: float | None = None) -> Claims:
        """The token's claims if its signature is good and it is live at ``now``, else InvalidToken.

        Signature, algorithm and required claims are PyJWT's checks; the time
        checks are done here against ``now`` so the service's clock decides.
        """
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self.ALGORITHM],
                options={
                    "require": ["sub", "did", "sid", "iat", "exp", "jti"],
                    "verify_exp": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(exc.__class__.__name__) from None
        sub, did, sid = claims.get("sub"), claims.get("did"), claims.get("sid")
        if not all(isinstance(v, str) and v for v in (sub, did, sid)):
            raise InvalidToken("malformed claims")
        exp, iat = claims.get("exp"), claims.get("iat")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (exp, iat)):
            raise InvalidToken("malformed time claims")
        assert isinstance(exp, int) and isinstance(iat, int)
        t = time.time() if now is None else now
        if exp <= t:
            raise InvalidToken("expired")
        if iat > t + CLOCK_SKEW_S:
            raise InvalidToken("issued in the future")
        return Claims(str(sub), str(did), str(sid), exp)


def bearer_token(header: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def new_refresh_token() -> str:
    """An opaque refresh token: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def hash_refresh_token(token: str) -> str:
    """What is stored instead of the token (sha256 hex): a database leak gives no usable token."""
    return hashlib.sha256(token.encode()).hexdigest()


class RefreshOutcome(enum.Enum):
    ROTATE = "rotate"  # valid: mark used, issue the next pair
    REUSE = "reuse"  # already used while its family is live: stolen copy, log the device out
    REJECT = "reject"  # unknown, expired, or its family already ended: plain 401


def refresh_outcome(record: dict[str, Any] | None, device: dict[str, Any] | None, now: int) -> RefreshOutcome:
    """What to do with a presented refresh token, given its stored record and its device."""
    if record is None or record.get("expires_ts", 0) <= now:
        return RefreshOutcome.REJECT
    if device is None or device.get("state") != DEVICE_ACTIVE or device.get("sid") != record.get("sid"):
        # The family already ended (logout, removal, earlier reuse, newer login):
        # nothing left to revoke, and a newer session of the device is not touched.
        return RefreshOutcome.REJECT
    if record.get("used_ts") is not None:
        return RefreshOutcome.REUSE
    return RefreshOutcome.ROTATE


# ---------------------------------------------------------------------------
# The gate: does a verified token still stand for a live device?
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """What /internal/auth tells Nginx about the caller."""

    user_id: str
    device_id: str
    admin: bool
    device_type: str
    primary: bool

    def headers(self) -> dict[str, str]:
        return {
            "X-Auth-User": self.user_id,
            "X-Auth-Device": self.device_id,
            "X-Auth-Admin": "1" if self.admin else "0",
            "X-Auth-Device-Type": self.device_type,
            "X-Auth-Primary": "1" if self.primary else "0",
        }


def authorize(claims: Claims, device: dict[str, Any] | None) -> Identity | None:
    """The caller's identity if the device is logged in with this token's session, else None.

    Everything needed is on the device document (admin flag denormalised at
    creation; disabling or deleting a user logs every device out), so the
    check costs one lookup by primary key.
    """
    if device is None or device.get("user_id") != claims.user_id:
        return None
    if device.get("state") != DEVICE_ACTIVE or device.get("sid") != claims.session:
        return None
    return Identity(
        claims.user_id,
        claims.device_id,
        bool(device.get("admin")),
        str(device.get("device_type", "mobile")),
        bool(device.get("primary")),
    )


# ---------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------


def wants_primary(device_type: str, is_primary: bool, user_primary: str | None) -> bool:
    """Whether a device that logs in should try to become the user's primary device.

    The first mobile device a user logs in with is primary; web devices are
    secondary. When the primary device was removed, the next mobile login
    takes its place. (The claim itself is an atomic store update, so two
    racing logins cannot both win.)
    """
    return device_type == "mobile" and not is_primary and not user_primary


def may_remove_device(caller_is_primary: bool, target_is_primary: bool, same_device: bool) -> bool:
    """The primary device may remove any device; a secondary device any but the primary."""
    return same_device or caller_is_primary or not target_is_primary


def device_view(device: dict[str, Any], online: bool, last_seen: int | None) -> dict[str, Any]:
    """A device as GET /v1/me/devices shows it."""
    return {
        "device_id": device["_id"],
        "device_type": device.get("device_type", "mobile"),
        "primary": bool(device.get("primary")),
        "online": online,
        "last_seen": last_seen,
        "logged_in": device.get("state") == DEVICE_ACTIVE,
    }


# ---------------------------------------------------------------------------
# Users
# ---------------------------------------------------------------------------


def profile_view(user: dict[str, Any]) -> dict[str, Any]:
    return {"user_id": user["_id"], "username": user["username"], "name": user.get("name", "")}


def login_refusal(user: dict[str, Any] | None, password_ok: bool) -> ApiError | None:
    """Why a login is refused, or None. Unknown user and wrong password read the same."""
    if user is None or not password_ok or user.get("state") in (DELETING, DELETED):
        return ApiError(ErrorCode.UNAUTHORIZED, WRONG_CREDENTIALS)
    if user.get("state") == DISABLED:
        return ApiError(ErrorCode.FORBIDDEN, "account disabled")
    return None


def username_reusable(holder: dict[str, Any], now: int) -> bool:
    """Whether a username held by ``holder`` may be given to someone else now.

    Only a deleted account's name comes free, once its grace period is over.
    """
    return holder.get("state") == DELETED and holder.get("username_free_at", now + 1) <= now


def tombstone(user_id: str) -> str:
    return f"{TOMBSTONE_PREFIX}{user_id}"


# ---------------------------------------------------------------------------
# Failed-login throttling: per account and per client address
# ---------------------------------------------------------------------------

LOGIN_THROTTLED = "too many failed logins, try again later"


@dataclass(frozen=True)
class LoginLimits:
    """After ``per_account`` failed logins for one username (or ``per_address`` from one
    address) within ``window_s``, logins for it are refused for ``lockout_s``; each further
    lockout of the same key doubles, up to ``max_lockout_s``. A limit of 0 is off."""

    per_account: int = 5
    per_address: int = 50
    window_s: int = 900
    lockout_s: int = 60
    max_lockout_s: int = 3600
    exempt_addresses: frozenset[str] = frozenset()


class LoginThrottled(ApiError):
    """429 ``rate_limited`` with the seconds to wait (the Retry-After header)."""

    def __init__(self, retry_after_s: int):
        super().__init__(ErrorCode.RATE_LIMITED, LOGIN_THROTTLED, {"retry_after_s": retry_after_s})
        self.retry_after_s = retry_after_s


def account_key(username: str) -> str:
    """The counter of one username, whether or not an account has it (no existence oracle)."""
    return "account:" + username


def address_key(address: str) -> str:
    return "address:" + address


def throttle_keys(username: str, address: str | None, limits: LoginLimits) -> dict[str, int]:
    """The counters a login attempt is checked against and counted in, with their limits."""
    keys: dict[str, int] = {}
    if limits.per_account > 0:
        keys[account_key(username)] = limits.per_account
    if limits.per_address > 0 and address and address not in limits.exempt_addresses:
        keys[address_key(address)] = limits.per_address
    return keys


def client_address(forwarded_for: str | None, remote_addr: str | None) -> str | None:
    """The caller's address: the entry the nearest proxy (Nginx, which overwrites the header
    with ``$remote_addr``) added to X-Forwarded-For, else the socket's peer."""
    if forwarded_for:
        last = forwarded_for.split(",")[-1].strip()
        if last:
            return last
    return remote_addr or None


def lockout_wait_s(counters: list[dict[str, Any]], now: int) -> int:
    """Whole seconds until every counter's lockout is over (0: the attempt may go on)."""
    until = max((int(c.get("locked_until", 0)) for c in counters), default=0)
    return 0 if until <= now else max(1, -(-(until - now) // 1000))


def lockout_ms(lockouts: int, limits: LoginLimits) -> int:
    """The length of a key's next lockout, ``lockouts`` being how many it already had."""
    return min(limits.lockout_s * 2 ** min(lockouts, 30), limits.max_lockout_s) * 1000


def window_stale(counter: dict[str, Any], now: int, limits: LoginLimits) -> bool:
    """Failures older than the window are forgotten."""
    return now - int(counter.get("window_start", now)) > limits.window_s * 1000


# ---------------------------------------------------------------------------
# Account deletion: active|disabled -> deleting -> deleted
# ---------------------------------------------------------------------------


class DeletionStep(enum.Enum):
    MARK_DELETING = "mark_deleting"
    LOG_OUT_DEVICES = "log_out_devices"
    ANNOUNCE = "announce"  # UserUnregistered
    MARK_DELETED = "mark_deleted"


def deletion_steps(state: str | None) -> list[DeletionStep]:
    """The steps left to delete an account in ``state``.

    Every step is idempotent, so a deletion that stopped half-way (crash,
    broker away) is finished by running the steps of the ``deleting`` state
    again: logging out devices that are already logged out and announcing
    twice are harmless.
    """
    if state in (ACTIVE, DISABLED):
        return list(DeletionStep)
    if state == DELETING:
        return [DeletionStep.LOG_OUT_DEVICES, DeletionStep.ANNOUNCE, DeletionStep.MARK_DELETED]
    return []


def deleted_fields(now: int, grace_s: int) -> dict[str, Any]:
    """What the user document holds once deleted: the name stays reserved ``grace_s`` seconds."""
    return {"state": DELETED, "deleted_ts": now, "username_free_at": now + grace_s * 1000, "name": ""}

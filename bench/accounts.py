"""Benchmark accounts: signed up and logged in through Nginx, in parallel, reused by every phase.

Argon2id makes signup and login the slow part (each is one hash; the stack
the benchmark starts uses OWASP's minimum cost), so accounts are made once per
run, in a thread pool, and only as many as the phases chosen need. Access
tokens expire (PROFILE_ACCESS_TTL_S, 15 minutes by default) and a full run
takes longer: :func:`refresh_stale` renews them before a phase connects.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import requests

PASSWORD = "bench-password-1"


@dataclass
class Account:
    """One user with one logged-in device (``token`` is its current access token)."""

    username: str
    user_id: str
    device_id: str
    token: str
    refresh: str
    token_at: float  # time.monotonic() of the login or last refresh


class SignupError(RuntimeError):
    """An account could not be made (the message says which call failed and how)."""


def _post(http: requests.Session, url: str, body: dict[str, str], token: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for attempt in range(5):
        r = http.post(url, json=body, headers=headers, timeout=60)
        # 429 (Nginx's per-address auth limit) and 503 (a busy service) are worth a retry.
        if r.status_code in (429, 503) and attempt < 4:
            time.sleep(0.5 * (attempt + 1))
            continue
        if r.status_code >= 400:
            raise SignupError(f"POST {url.rsplit('/v1', 1)[-1]}: {r.status_code} {r.text[:200]}")
        return dict(r.json())
    raise AssertionError("unreachable")


def make_accounts(
    base_url: str,
    count: int,
    parallel: int = 16,
    prefix: str = "b",
    progress: Callable[[int], None] | None = None,
) -> list[Account]:
    """Sign up and log in ``count`` new users (one mobile device each), ``parallel`` at a time.

    ``progress(done)`` is called after every tenth of them (a thousand take minutes).
    """
    tag = uuid.uuid4().hex[:6]

    def one(i: int) -> Account:
        http = requests.Session()
        name = f"{prefix}{tag}{i}"
        _post(http, f"{base_url}/v1/auth/signup", {"username": name, "password": PASSWORD})
        login = _post(
            http,
            f"{base_url}/v1/auth/login",
            {"username": name, "password": PASSWORD, "device_type": "mobile"},
        )
        return Account(
            name, login["user_id"], login["device_id"], login["access_token"], login["refresh_token"], time.monotonic()
        )

    if count <= 0:
        return []
    step = max(10, count // 10)
    out: list[Account | None] = [None] * count
    with ThreadPoolExecutor(min(parallel, count)) as pool:
        futures = {pool.submit(one, i): i for i in range(count)}
        for done, fut in enumerate(as_completed(futures), 1):
            out[futures[fut]] = fut.result()
            if progress is not None and done % step == 0 and done < count:
                progress(done)
    return [a for a in out if a is not None]


def refresh_stale(base_url: str, accounts: Sequence[Account], max_age_s: float = 600, parallel: int = 16) -> int:
    """Renew the access tokens older than ``max_age_s`` (refresh rotates both tokens); returns how many."""
    stale = [a for a in accounts if time.monotonic() - a.token_at > max_age_s]

    def one(a: Account) -> None:
        body = _post(requests.Session(), f"{base_url}/v1/auth/refresh", {"refresh_token": a.refresh})
        a.token, a.refresh, a.token_at = body["access_token"], body["refresh_token"], time.monotonic()

    if stale:
        with ThreadPoolExecutor(min(parallel, len(stale))) as pool:
            list(pool.map(one, stale))
    return len(stale)

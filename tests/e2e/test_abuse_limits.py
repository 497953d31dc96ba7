"""Abuse limits, end to end through Nginx: the auth routes' rate, the per-socket frame rate,
and failed logins slowed per account and per client address.

Every test client is 127.0.0.1, which the test stack exempts from the per-address login
limit (PROFILE_LOGIN_EXEMPT_ADDRESSES) and which signs up users at a rate the test stack
raises for that purpose. The limits are shown from other loopback addresses (127.0.0.x):
Nginx sees them as other clients ($remote_addr), exactly as it would distinct hosts.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from pymongo import MongoClient
from requests.adapters import HTTPAdapter

from helper.stack import Stack
from tests.support import Api, User, dm_id, history, new_user, unique_name

NGINX_429 = {"error": {"code": "rate_limited", "message": "too many requests, slow down", "details": {}}}


class FromAddress(HTTPAdapter):
    """A requests adapter whose connections leave from ``address`` (a loopback alias)."""

    def __init__(self, address: str):
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def api_from(stack: Stack, address: str) -> Api:
    api = Api(stack.base_url)
    api.http.mount("http://", FromAddress(address))
    return api


def rate_limited(r: requests.Response) -> dict[str, Any]:
    assert r.status_code == 429, (r.status_code, r.text)
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.headers["X-Request-Id"]
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == "rate_limited" and body["error"]["message"]
    return dict(body["error"])


# -- Nginx: the auth routes --------------------------------------------------------------


async def _burst(port: int, address: str, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """``count`` refresh requests from ``address``, all connections opened first, then every
    request written at once: (status, headers, body) of each."""
    conns = await asyncio.gather(
        *(asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0)) for _ in range(count))
    )
    request = (
        f"POST /v1/auth/refresh HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        "Content-Length: 2\r\nConnection: close\r\n\r\n{}"
    ).encode()
    for _, writer in conns:
        writer.write(request)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, dict[str, str], bytes]:
        raw = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        return int(status_line.split(" ", 2)[1]), headers, body

    return await asyncio.gather(*(answer(r, w) for r, w in conns))


@pytest.mark.slow
def test_a_burst_beyond_the_auth_limit_from_one_address_gets_nginx_429(stack: Stack) -> None:
    # The test stack allows 200 r/s with bursts of 400 per address; 1,000 at once go beyond.
    limited: list[tuple[int, dict[str, str], bytes]] = []
    for _ in range(5):
        answers = asyncio.run(_burst(stack.public_port, "127.0.0.3", 1000))
        assert {status for status, _, _ in answers} <= {400, 429}, sorted({s for s, _, _ in answers})
        limited = [a for a in answers if a[0] == 429]
        if limited:
            break
    assert limited, "no 429 after five bursts of 1,000"
    for _, headers, body in limited:
        assert json.loads(body) == NGINX_429
        assert headers["content-type"].startswith("application/json") and headers["x-request-id"]
    # The limit is per address: another client is answered by the service (400: no token given).
    r = Api(stack.base_url).post("/v1/auth/refresh", json={})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"


# -- the gateway: frames per socket ----------------------------------------------------------


@pytest.fixture
def pair(stack: Stack) -> Iterator[tuple[User, User]]:
    a, b = new_user(stack.base_url), new_user(stack.base_url)
    yield a, b
    for ws in [*a.sockets, *b.sockets]:
        ws.close()


@pytest.mark.slow
def test_a_message_flood_is_rate_limited_nothing_is_lost_and_the_refused_go_through_later(
    pair: tuple[User, User],
) -> None:
    """GATEWAY_RATE_PER_SOCKET (50/s, bursts of 100) through Nginx: every frame gets an ack or a
    ``rate_limited`` error, the socket stays open (the contract closes it for neither), and
    the refused messages, sent again with the same ids, are stored once each."""
    alice, bob = pair
    ws, bob_ws = alice.connect(), bob.connect()
    ids = [uuid.uuid4().hex for _ in range(200)]
    for cid in ids:
        ws.send({"type": "message", "id": cid, "to": bob.user_id, "body": f"flood {cid}"})
    acked: dict[str, dict[str, Any]] = {}
    refused = 0
    deadline = time.monotonic() + 60
    while len(acked) + refused < len(ids):
        assert time.monotonic() < deadline, (len(acked), refused)
        f = ws.frames.get(timeout=30)
        if f["type"] == "ack":
            acked[f["id"]] = f
        elif f["type"] == "error":
            assert f["code"] == "rate_limited" and isinstance(f["message"], str), f
            assert set(f) <= {"type", "code", "message", "ref", "details"}, f
            refused += 1
    assert acked and refused, (len(acked), refused)
    assert not ws.closed.is_set()
    # A careful client sends what was not acknowledged again, with the same ids, more slowly.
    pending = [cid for cid in ids if cid not in acked]
    while pending:
        assert time.monotonic() < deadline + 60, f"{len(pending)} never acknowledged"
        chunk, pending = pending[:20], pending[20:]
        for cid in chunk:
            ws.send({"type": "message", "id": cid, "to": bob.user_id, "body": f"flood {cid}"})
        answered = 0
        while answered < len(chunk):
            f = ws.frames.get(timeout=30)
            if f["type"] == "ack":
                acked[f["id"]] = f
                answered += 1
            elif f["type"] == "error":
                assert f["code"] == "rate_limited", f
                answered += 1
        again = [cid for cid in chunk if cid not in acked]
        if again:
            pending += again
            time.sleep(0.5)  # back off before trying those again
    assert set(acked) == set(ids)
    assert len({a["seq"] for a in acked.values()}) == len(ids)
    got = {m["id"]: m for m in bob_ws.collect("message", len(ids), timeout=30)}
    assert set(got) == set(ids)
    assert all(got[cid]["body"] == f"flood {cid}" and got[cid]["seq"] == acked[cid]["seq"] for cid in ids)
    stored = history(alice, dm_id(alice, bob), "?limit=100")["messages"]
    stored += history(alice, dm_id(alice, bob), f"?limit=100&before_seq={min(m['seq'] for m in stored)}")["messages"]
    assert sorted(m["id"] for m in stored) == sorted(ids)


# -- the profile service: failed logins ------------------------------------------------------


@pytest.fixture(scope="module")
def chat_db(stack: Stack) -> Iterator[Any]:
    client: MongoClient[dict[str, Any]] = MongoClient(stack.mongo_url, serverSelectionTimeoutMS=5000)
    yield client["chat"]
    client.close()


def login(api: Api, username: str, password: str) -> requests.Response:
    return api.post("/v1/auth/login", json={"username": username, "password": password, "device_type": "web"})


def test_failed_logins_lock_the_account_everywhere_even_for_the_right_password(stack: Stack, chat_db: Any) -> None:
    victim = new_user(stack.base_url)
    limit = int(stack.env.get("PROFILE_LOGIN_FAILURES_PER_ACCOUNT", "5"))
    guesser = api_from(stack, "127.0.0.5")
    for _ in range(limit):
        assert login(guesser, victim.username, "not the password").status_code == 401
    # From the guesser's address and from the victim's own: refused, the right password too.
    for api in (guesser, Api(stack.base_url)):
        r = login(api, victim.username, victim.password)
        err = rate_limited(r)
        assert int(r.headers["Retry-After"]) > 0
        assert err["details"] == {"retry_after_s": int(r.headers["Retry-After"])}
    # The lockout is kept in MongoDB, so every profile instance sees it.
    doc = chat_db["login_failures"].find_one({"_id": f"account:{victim.username}"})
    assert doc is not None and doc["locked_until"] > time.time() * 1000
    # Other accounts are not touched, nor the victim's tokens already issued.
    assert login(Api(stack.base_url), new_user(stack.base_url).username, "correct horse battery").status_code == 200
    assert victim.api.get("/v1/me").status_code == 200


def test_failed_logins_from_one_address_lock_that_address_only(stack: Stack) -> None:
    limit = int(stack.env.get("PROFILE_LOGIN_FAILURES_PER_ADDRESS", "50"))
    someone = new_user(stack.base_url)
    attacker = api_from(stack, "127.0.0.6")
    # The attacker's own account logs in between guesses; that clears nothing.
    own = new_user(stack.base_url)
    for i in range(limit):
        assert login(attacker, unique_name("guess"), "not the password").status_code == 401
        if i == limit // 2:
            assert login(attacker, own.username, own.password).status_code == 200
    for username, password in ((someone.username, someone.password), (own.username, own.password)):
        r = login(attacker, username, password)
        rate_limited(r)
        assert int(r.headers["Retry-After"]) > 0
    # The same account from another address is fine: the account itself was never guessed.
    assert login(api_from(stack, "127.0.0.7"), someone.username, someone.password).status_code == 200

"""Access tokens: issue and verify, and every way a bad token is refused."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest

from services.profile.logic import InvalidToken, TokenIssuer

KEY = "unit-test-signing-key-0123456789abcdef"


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@pytest.fixture
def issuer() -> TokenIssuer:
    return TokenIssuer(KEY, access_ttl_s=900)


def test_issue_and_verify(issuer: TokenIssuer) -> None:
    token = issuer.issue("u1", "d1", "s1")
    claims = issuer.verify(token)
    assert (claims.user_id, claims.device_id, claims.session) == ("u1", "d1", "s1")
    raw = jwt.decode(token, KEY, algorithms=["HS256"])
    assert set(raw) == {"sub", "did", "sid", "iat", "exp", "jti"}
    assert raw["exp"] - raw["iat"] == 900
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    # Every token is unique (jti), even for the same session in the same second.
    assert jwt.decode(issuer.issue("u1", "d1", "s1"), KEY, algorithms=["HS256"])["jti"] != raw["jti"]


def test_expired_token_is_refused(issuer: TokenIssuer) -> None:
    token = issuer.issue("u1", "d1", "s1", now=time.time() - 901)
    with pytest.raises(InvalidToken):
        issuer.verify(token)


def test_expiry_is_judged_at_the_given_time(issuer: TokenIssuer) -> None:
    now = time.time()
    token = issuer.issue("u1", "d1", "s1", now=now)
    assert issuer.verify(token, now=now + 899).session == "s1"
    with pytest.raises(InvalidToken):
        issuer.verify(token, now=now + 900)


def test_token_issued_in_the_future_is_refused(issuer: TokenIssuer) -> None:
    token = issuer.issue("u1", "d1", "s1", now=time.time() + 3600)
    with pytest.raises(InvalidToken):
        issuer.verify(token)


@pytest.mark.parametrize("bad", [{"exp": "soon"}, {"exp": 1e12}, {"iat": True}, {"iat": None}])
def test_time_claims_must_be_integers(issuer: TokenIssuer, bad: dict[str, Any]) -> None:
    claims = {**jwt.decode(issuer.issue("u1", "d1", "s1"), KEY, algorithms=["HS256"]), **bad}
    with pytest.raises(InvalidToken):
        issuer.verify(jwt.encode(claims, KEY, algorithm="HS256"))


def test_token_signed_with_another_key_is_refused(issuer: TokenIssuer) -> None:
    other = TokenIssuer("another-signing-key-0123456789abcdef", 900).issue("u1", "d1", "s1")
    with pytest.raises(InvalidToken):
        issuer.verify(other)


def test_alg_none_is_refused(issuer: TokenIssuer) -> None:
    claims = jwt.decode(issuer.issue("u1", "d1", "s1"), KEY, algorithms=["HS256"])
    for header in ({"alg": "none", "typ": "JWT"}, {"alg": "None"}, {"alg": "NONE"}):
        with pytest.raises(InvalidToken):
            issuer.verify(f"{b64(header)}.{b64(claims)}.")


def test_other_algorithms_are_refused_even_with_the_right_key(issuer: TokenIssuer) -> None:
    claims = jwt.decode(issuer.issue("u1", "d1", "s1"), KEY, algorithms=["HS256"])
    token = jwt.encode(claims, KEY + KEY, algorithm="HS512")
    with pytest.raises(InvalidToken):
        issuer.verify(token)


@pytest.mark.parametrize("missing", ["sub", "did", "sid", "iat", "exp", "jti"])
def test_every_claim_is_required(issuer: TokenIssuer, missing: str) -> None:
    claims = jwt.decode(issuer.issue("u1", "d1", "s1"), KEY, algorithms=["HS256"])
    del claims[missing]
    with pytest.raises(InvalidToken):
        issuer.verify(jwt.encode(claims, KEY, algorithm="HS256"))


@pytest.mark.parametrize("bad", [{"sub": 5}, {"did": ""}, {"sid": None}])
def test_malformed_claims_are_refused(issuer: TokenIssuer, bad: dict[str, Any]) -> None:
    claims = {**jwt.decode(issuer.issue("u1", "d1", "s1"), KEY, algorithms=["HS256"]), **bad}
    with pytest.raises(InvalidToken):
        issuer.verify(jwt.encode(claims, KEY, algorithm="HS256"))


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "a.b", "..."])
def test_garbage_is_refused(issuer: TokenIssuer, token: str) -> None:
    with pytest.raises(InvalidToken):
        issuer.verify(token)


def test_tampered_payload_is_refused(issuer: TokenIssuer) -> None:
    header, _, sig = issuer.issue("u1", "d1", "s1").split(".")
    claims = jwt.decode(issuer.issue("u1", "d1", "s1"), KEY, algorithms=["HS256"])
    forged = f"{header}.{b64({**claims, 'sub': 'admin'})}.{sig}"
    with pytest.raises(InvalidToken):
        issuer.verify(forged)

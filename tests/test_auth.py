"""The HS256 fast path gives PyJWT's verdict on every kind of token, good and bad
(one deliberate difference: it is stricter about exp's type)."""

from __future__ import annotations

import base64
import time

import jwt
import pytest

from redpacket.gateway.auth import InvalidToken, verify_hs256

SECRET = "s" * 40


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _tokens() -> dict[str, str]:
    now = int(time.time())
    good = {"sub": "77", "name": "Ann", "exp": now + 600}
    token = jwt.encode(good, SECRET, algorithm="HS256")
    head, body, sig = token.split(".")
    forged = _b64(b'{"sub":"1","exp":9999999999}')
    return {
        "good": token,
        "good with iat and nbf past": jwt.encode(
            {**good, "iat": now - 5, "nbf": now - 5}, SECRET, algorithm="HS256"
        ),
        "expired": jwt.encode({**good, "exp": now - 1}, SECRET, algorithm="HS256"),
        "not yet valid": jwt.encode({**good, "nbf": now + 600}, SECRET, algorithm="HS256"),
        "issued in the future": jwt.encode({**good, "iat": now + 600}, SECRET, algorithm="HS256"),
        "string exp": jwt.encode({**good, "exp": str(now + 600)}, SECRET, algorithm="HS256"),
        "missing exp": jwt.encode({"sub": "77"}, SECRET, algorithm="HS256"),
        "missing sub": jwt.encode({"exp": now + 600}, SECRET, algorithm="HS256"),
        "audience": jwt.encode({**good, "aud": "x"}, SECRET, algorithm="HS256"),
        "wrong key": jwt.encode(good, "k" * 40, algorithm="HS256"),
        "alg none": jwt.encode(good, None, algorithm="none"),
        "HS512": jwt.encode(good, SECRET, algorithm="HS512"),
        "tampered payload": f"{head}.{forged}.{sig}",
        "signature cut": f"{head}.{body}.{sig[:-2]}",
        "padded signature": f"{head}.{body}.{sig}==",
        "junk in signature": f"{head}.{body}.{sig[:10]}!{sig[11:]}",
        "four parts": f"{token}.x",
        "two parts": f"{head}.{body}",
        "payload not an object": jwt.api_jws.encode(b"[1]", SECRET, algorithm="HS256"),
        "garbage": "a.b.c",
        "empty": "",
        "non-ascii": token + "é",
    }


@pytest.mark.filterwarnings("ignore:The HMAC key is")
@pytest.mark.parametrize("kind", list(_tokens()))
def test_the_fast_path_agrees_with_pyjwt(kind: str) -> None:
    token = _tokens()[kind]
    try:
        expected = jwt.decode(
            token, SECRET, algorithms=["HS256"], options={"require": ["exp", "sub"]}
        )
    except (jwt.InvalidTokenError, UnicodeError):
        expected = None
    if kind == "string exp":  # stricter than PyJWT: a NumericDate is a JSON number (RFC 7519)
        expected = None
    try:
        got = verify_hs256(token, SECRET.encode(), time.time())
    except InvalidToken:
        got = None
    assert got == expected
    assert (got is not None) == kind.startswith("good")


def _counting_verifies(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tokens the authenticator verified afresh (the real verifier still runs)."""
    from redpacket.gateway import auth

    verified: list[str] = []
    real = auth.verify_hs256

    def counted(token: str, key: bytes, now: float) -> dict:
        verified.append(token)
        return real(token, key, now)

    monkeypatch.setattr(auth, "verify_hs256", counted)
    return verified


def test_a_crowd_of_new_users_does_not_push_out_a_user_who_keeps_calling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from redpacket.gateway.auth import Authenticator, mint_token

    verified = _counting_verifies(monkeypatch)
    auth = Authenticator(SECRET, cache_size=4)
    regular = "Bearer " + mint_token(SECRET, 1)
    assert auth.user(regular).uid == 1
    for uid in range(2, 40):  # the crowd: each new user grabs, then opens
        crowd = "Bearer " + mint_token(SECRET, uid)
        assert auth.user(crowd).uid == uid
        assert auth.user(crowd).uid == uid
        assert auth.user(regular).uid == 1
    assert verified.count(regular[7:]) == 1  # verified once, then always remembered
    assert len(verified) == 1 + 38  # each of the crowd verified once, not twice


def test_the_token_cache_holds_at_most_its_bound_and_zero_turns_it_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from redpacket.gateway.auth import Authenticator, mint_token

    verified = _counting_verifies(monkeypatch)
    tokens = ["Bearer " + mint_token(SECRET, uid) for uid in range(1, 11)]
    bounded = Authenticator(SECRET, cache_size=3)
    for token in tokens:
        bounded.user(token)
    for token in tokens[-3:]:  # the last three are remembered
        bounded.user(token)
    assert len(verified) == 10
    bounded.user(tokens[0])  # the first was evicted long ago
    assert len(verified) == 11
    off = Authenticator(SECRET, cache_size=0)
    off.user(tokens[0])
    off.user(tokens[0])
    assert len(verified) == 13

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

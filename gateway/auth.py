"""Who is calling: the user in a verified HS256 JWT, with OpenID Connect claim names.

``sub`` is the uid (decimal string), ``name`` the nick name, ``picture`` the avatar URL;
``exp`` is required. Only HS256 is accepted, so ``alg: none`` and algorithm-confusion
tokens fail. Verified tokens are remembered (bounded, until they expire) because a client
sends the same token with every call; a token differing in any byte, signature included,
is verified afresh.

The crowd of a sold-out packet is thousands of users who arrive once each, so the cache
does not help them: :func:`verify_hs256` is a small verifier for exactly the tokens this
service accepts (PyJWT cost about 8x more per new token, docs/benchmarks.md). Same checks
as ``jwt.decode(..., algorithms=["HS256"], options={"require": ["exp", "sub"]})``: the
header's ``alg`` must be HS256 (nothing else, no ``crit``), strict base64url, the
signature compared in constant time before the payload is even parsed, ``exp`` required
and numeric, ``nbf`` and ``iat`` honoured (not in the future), an ``aud`` refused (this
service names no audience). ``tests/test_auth.py`` holds it to PyJWT's verdicts.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jwt
import orjson

from redpacket.core.errors import ApiError
from redpacket.core.ids import parse_uid
from redpacket.core.profile import bound_img_url, bound_nick

ALGORITHM = "HS256"


@dataclass(frozen=True, slots=True)
class User:
    uid: int
    nick_name: str
    img_url: str


def unauthenticated(message: str) -> ApiError:
    return ApiError(401, "unauthenticated", message, headers={"WWW-Authenticate": "Bearer"})


class InvalidToken(Exception):
    pass


_URL_TO_STD = str.maketrans("-_", "+/")
_HEADERS: dict[str, bool] = {}  # header segments seen, and whether they are acceptable


def _b64url(segment: str) -> bytes:
    """Strict base64url (no padding, no stray characters), as RFC 7515 writes it."""
    if len(segment) % 4 == 1:
        raise InvalidToken("bad base64url")
    try:
        return base64.b64decode(
            segment.translate(_URL_TO_STD) + "=" * (-len(segment) % 4), validate=True
        )
    except (binascii.Error, ValueError):
        raise InvalidToken("bad base64url") from None


def _header_ok(segment: str) -> bool:
    known = _HEADERS.get(segment)
    if known is not None:
        return known
    try:
        header = orjson.loads(_b64url(segment))
    except (InvalidToken, orjson.JSONDecodeError):
        header = None
    ok = isinstance(header, dict) and header.get("alg") == ALGORITHM and "crit" not in header
    if len(_HEADERS) < 64:  # real clients send one or two distinct headers
        _HEADERS[segment] = ok
    return ok


def _numeric(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        if name in claims:
            raise InvalidToken(f"{name} must be a number")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(f"{name} must be a number")
    return float(value)


def verify_hs256(token: str, key: bytes, now: float) -> dict[str, Any]:
    """The claims of a valid HS256 token, or :class:`InvalidToken` saying why not."""
    head, dot1, rest = token.partition(".")
    body, dot2, signature = rest.partition(".")
    if not dot1 or not dot2 or "." in signature or not token.isascii():
        raise InvalidToken("not a JWS compact token")
    if not _header_ok(head):
        raise InvalidToken("the algorithm must be HS256")
    expected = hmac.digest(key, token[: len(head) + 1 + len(body)].encode(), "sha256")
    if not hmac.compare_digest(_b64url(signature), expected):
        raise InvalidToken("signature verification failed")
    try:
        claims = orjson.loads(_b64url(body))
    except orjson.JSONDecodeError:
        raise InvalidToken("the payload is not JSON") from None
    if not isinstance(claims, dict):
        raise InvalidToken("the payload is not a JSON object")
    exp = _numeric(claims, "exp")
    if exp is None:
        raise InvalidToken('token is missing the "exp" claim')
    if exp <= now:
        raise InvalidToken("signature has expired")
    nbf = _numeric(claims, "nbf")
    if nbf is not None and nbf > now:
        raise InvalidToken("the token is not yet valid (nbf)")
    iat = _numeric(claims, "iat")
    if iat is not None and iat > now:
        raise InvalidToken("the token is not yet valid (iat)")
    if "aud" in claims:
        raise InvalidToken("invalid audience")
    if "sub" not in claims:
        raise InvalidToken('token is missing the "sub" claim')
    return claims


class Authenticator:
    """Verifies bearer tokens, remembering the last ``cache_size`` verified (least recently
    used evicted first). The bound, not the token's ``exp``, is what keeps the cache small: the
    crowd of a sold-out packet is new users who send a token twice (grab, then open) and never
    again, so a cache of a few seconds of them serves as well as one of minutes, and a cache
    of 100,000 held ~200 MiB of the gateway's memory for nothing (docs/benchmarks.md). A user
    of the app touches their entry with every call, so they keep it."""

    def __init__(self, secret: str, cache_size: int = 16_384) -> None:
        self._secret = secret
        self._key = secret.encode()
        self._cache: OrderedDict[str, tuple[User, float]] = OrderedDict()
        self._cache_size = cache_size

    def user(self, authorization: str | None) -> User:
        if not authorization or not authorization.startswith("Bearer "):
            raise unauthenticated("send Authorization: Bearer <token>")
        token = authorization[7:].strip()
        now = time.time()
        cached = self._cache.get(token)
        if cached is not None and cached[1] > now:
            self._cache.move_to_end(token)
            return cached[0]
        try:
            claims = verify_hs256(token, self._key, now)
        except InvalidToken as exc:
            raise unauthenticated(f"invalid token: {exc}") from None
        uid = parse_uid(claims.get("sub"))
        if uid is None or not isinstance(claims.get("sub"), str):
            raise unauthenticated("token sub must be the uid as a decimal string")
        # display fields are bounded, never refused (core/profile.py)
        user = User(uid, bound_nick(claims.get("name")), bound_img_url(claims.get("picture")))
        if "nbf" not in claims:  # a not-yet-valid token is never cached
            self._remember(token, user, float(claims["exp"]))
        return user

    def _remember(self, token: str, user: User, exp: float) -> None:
        if self._cache_size <= 0:
            return
        self._cache[token] = (user, exp)
        self._cache.move_to_end(token)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def mint_token(secret: str, uid: int, name: str = "", picture: str = "", ttl_s: int = 3600) -> str:
    """A token as an identity provider would issue it; for local use, demos and tests."""
    now = int(time.time())
    claims = {"sub": str(uid), "name": name, "picture": picture, "iat": now, "exp": now + ttl_s}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)

"""Who is calling: the user in a verified HS256 JWT, with OpenID Connect claim names.

``sub`` is the uid (decimal string), ``name`` the nick name, ``picture`` the avatar URL;
``exp`` is required. Only HS256 is accepted, so ``alg: none`` and algorithm-confusion
tokens fail. Verified tokens are remembered (bounded, until they expire) because a client
sends the same token with every call and HMAC + JSON parsing is the gateway's main CPU cost
per request; a token differing in any byte, signature included, is verified afresh.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import jwt

from redpacket.core.errors import ApiError
from redpacket.core.ids import parse_uid

ALGORITHM = "HS256"


@dataclass(frozen=True, slots=True)
class User:
    uid: int
    nick_name: str
    img_url: str


def unauthenticated(message: str) -> ApiError:
    return ApiError(401, "unauthenticated", message, headers={"WWW-Authenticate": "Bearer"})


class Authenticator:
    def __init__(self, secret: str, cache_size: int = 100_000) -> None:
        self._secret = secret
        self._cache: OrderedDict[str, tuple[User, float]] = OrderedDict()
        self._cache_size = cache_size

    def user(self, authorization: str | None) -> User:
        if not authorization or not authorization.startswith("Bearer "):
            raise unauthenticated("send Authorization: Bearer <token>")
        token = authorization[7:].strip()
        cached = self._cache.get(token)
        if cached is not None and cached[1] > time.time():
            return cached[0]
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": ["exp", "sub"]},
            )
        except jwt.InvalidTokenError as exc:
            raise unauthenticated(f"invalid token: {exc}") from None
        uid = parse_uid(claims.get("sub"))
        if uid is None or not isinstance(claims.get("sub"), str):
            raise unauthenticated("token sub must be the uid as a decimal string")
        name, picture = claims.get("name", ""), claims.get("picture", "")
        user = User(
            uid, name if isinstance(name, str) else "", picture if isinstance(picture, str) else ""
        )
        if "nbf" not in claims:  # a not-yet-valid token is never cached
            self._remember(token, user, float(claims["exp"]))
        return user

    def _remember(self, token: str, user: User, exp: float) -> None:
        self._cache[token] = (user, exp)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def mint_token(secret: str, uid: int, name: str = "", picture: str = "", ttl_s: int = 3600) -> str:
    """A token as an identity provider would issue it; for local use, demos and tests."""
    now = int(time.time())
    claims = {"sub": str(uid), "name": name, "picture": picture, "iat": now, "exp": now + ttl_s}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)

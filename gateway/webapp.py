"""The page at ``/app/`` (a static single-page client) and the dev-only login it signs in with.

The page is a handful of files shipped in ``gateway/static/``. They are indexed once at
start into a name -> bytes table, and a request is answered only with a name from that
table: a path is a dictionary key, never joined onto a folder, so ``..``, encoded slashes
or symlinks cannot reach a file outside ``static/``.

Every page response carries a Content-Security-Policy without inline script or style (the
page sets no ``style=`` attribute and has no ``<script>`` body), so text that came from
other users (greetings, nick names) cannot run even if a bug rendered it as markup.

``POST /dev/login`` mints a token for any uid and name: it exists only when
``REDPACKET_DEV_LOGIN`` is on (``redpacket dev up`` turns it on). A production gateway
never has the route, so it answers 404 like any unknown path. The route table of the public
API (``app.ROUTES``, mirrored by ``openapi.json``) holds neither.
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from redpacket.core.amounts import invalid, refuse_unknown_fields
from redpacket.core.body import read_json_object
from redpacket.core.errors import ApiError, json_response
from redpacket.core.ids import parse_uid
from redpacket.gateway.auth import mint_token
from redpacket.gateway.handlers import SETTINGS

log = logging.getLogger("redpacket.gateway")

STATIC_DIR = Path(__file__).with_name("static")
DEV_TOKEN_TTL_S = 8 * 3600  # a working day of clicking around a local cluster
MAX_NAME_CHARS = 32

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "manifest-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # the page is a few kilobytes and changes with the gateway: always revalidate
    "Cache-Control": "no-cache",
}
TOKEN_HEADERS = {"Cache-Control": "no-store", "Pragma": "no-cache"}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str


# Types by extension, fixed here rather than taken from the host's mime tables (which differ
# between machines); with nosniff the browser trusts exactly these. Other files are not served.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
}


def load_assets(folder: Path = STATIC_DIR) -> dict[str, Asset]:
    """Every regular file under ``folder`` by its relative POSIX path, read once."""
    assets: dict[str, Asset] = {}
    for path in sorted(folder.rglob("*")):
        content_type = CONTENT_TYPES.get(path.suffix)
        if content_type is None or not path.is_file() or path.is_symlink():
            continue
        assets[path.relative_to(folder).as_posix()] = Asset(path.read_bytes(), content_type)
    return assets


ASSETS = web.AppKey("page_assets", dict[str, Asset])


def _page_response(asset: Asset) -> web.Response:
    response = web.Response(body=asset.body, headers=PAGE_HEADERS)
    response.headers["Content-Type"] = asset.content_type
    return response


async def app_root(_: web.Request) -> web.Response:
    raise web.HTTPPermanentRedirect("/app/")


async def app_index(request: web.Request) -> web.Response:
    return _page_response(request.app[ASSETS]["index.html"])


async def app_asset(request: web.Request) -> web.Response:
    asset = request.app[ASSETS].get(request.match_info["path"])
    if asset is None:
        raise ApiError(404, "not_found", "no such file", headers=PAGE_HEADERS)
    return _page_response(asset)


DEV_LOGIN_FIELDS = frozenset({"uid", "name"})


async def dev_login(request: web.Request) -> web.Response:
    """A token for the uid and name in the body, as an identity provider would issue it."""
    body = await read_json_object(request)
    refuse_unknown_fields(body, DEV_LOGIN_FIELDS)
    uid = parse_uid(body.get("uid"))
    if uid is None or not isinstance(body.get("uid"), str):
        raise invalid("uid", "uid must be a decimal string, 1 to 2^63-1")
    name = body.get("name")
    if (
        not isinstance(name, str)
        or not name.strip()
        or len(name) > MAX_NAME_CHARS
        or any(unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn") for ch in name)
    ):
        raise invalid("name", f"name must be 1 to {MAX_NAME_CHARS} printable characters")
    name = name.strip()
    token = mint_token(request.app[SETTINGS].jwt_secret, uid, name, ttl_s=DEV_TOKEN_TTL_S)
    return json_response(
        {"token": token, "uid": str(uid), "name": name, "expires_in": DEV_TOKEN_TTL_S},
        headers=TOKEN_HEADERS,
    )


PAGE_ROUTES = [
    web.get("/app", app_root),
    web.get("/app/", app_index),
    web.get("/app/{path:.+}", app_asset),
]
DEV_LOGIN_ROUTES = [web.post("/dev/login", dev_login)]


def add_page_routes(app: web.Application, dev_login_on: bool) -> None:
    """The page, and the dev login only when the setting is on (off by default)."""
    app[ASSETS] = load_assets()
    app.add_routes(PAGE_ROUTES)
    if dev_login_on:
        log.warning("dev login is ON: POST /dev/login gives anyone a token; never in production")
        app.add_routes(DEV_LOGIN_ROUTES)

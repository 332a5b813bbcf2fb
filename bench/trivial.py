"""The trivial-handler ceiling: one aiohttp process on uvloop that answers grab and open of
any red packet with a constant tiny JSON, exactly what the gateway answers a latecomer of a
sold-out packet, but without middlewares, authentication or any lookup. It is served by the
same ``serve()`` as the real services, so both sides get the same loop and runtime settings.

``python -m redpacket.bench.trivial --port 8099``
"""

from __future__ import annotations

import argparse

from aiohttp import web

GRAB = b'{"can_open":false,"reason":"sold_out"}'
OPEN = b'{"error":{"code":"sold_out","message":"every share of this red packet has been opened"}}'


async def grab(_: web.Request) -> web.Response:
    return web.Response(body=GRAB, content_type="application/json")


async def open_(_: web.Request) -> web.Response:
    return web.Response(body=OPEN, status=410, content_type="application/json")


def create_app() -> web.Application:
    app = web.Application()
    app.add_routes(
        [
            web.post("/v1/red-packets/{id}/grab", grab),
            web.post("/v1/red-packets/{id}/open", open_),
        ]
    )
    return app


def main() -> None:
    from redpacket.cli.serve import serve

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # run exactly as the gateway and the nodes are run (uvloop, GC settings, no access log)
    serve(
        create_app(),
        host=args.host,
        port=args.port,
        service="trivial",
        log_level="WARNING",
        access_log=False,
    )


if __name__ == "__main__":
    main()

"""Issue 19, the edge: every bad request is a clear 4xx JSON error, connections that stall
are closed, answers carry the safety headers, and no log line holds a traceback or a token."""

from __future__ import annotations

import asyncio
import base64
import gzip
from typing import Any

import jwt
import pytest

from tests.conftest import Cluster

SENDER = 1990


def cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def auth(cluster: Cluster, uid: int = SENDER, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {cluster.token(uid)}", **extra}


@pytest.mark.parametrize(
    "raw",
    [
        cursor("1:" + "9" * 400),
        cursor("99999999999999999999:1"),
        cursor("-1:5"),
        cursor("01:5"),
        cursor("1:2:3"),
        "x" * 100,
    ],
)
async def test_forged_cursors_are_400_invalid_cursor(cluster: Cluster, raw: str) -> None:
    packet_id = await cluster.create(SENDER, 100, 1)
    for path in (f"/v1/red-packets/{packet_id}/records", "/v1/me/received", "/v1/me/sent"):
        status, body = await cluster.call("GET", path, SENDER, cursor=raw)
        assert (status, body["error"]["code"]) == (400, "invalid_cursor"), (path, body)


async def test_a_body_that_cannot_be_decoded_is_400(cluster: Cluster) -> None:
    headers = auth(cluster, **{"Content-Type": "application/json", "Content-Encoding": "gzip"})
    status, body = await cluster.raw("POST", "/v1/red-packets", b'{"total_amount": 1}', headers)
    assert (status, body["error"]["code"]) == (400, "invalid_body")
    good = gzip.compress(b'{"total_amount": 100, "total_packet": 2}')
    status, body = await cluster.raw("POST", "/v1/red-packets", good, headers)
    assert status == 201, body


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/xml",
        "application/octet-stream",
    ],
)
async def test_a_body_that_is_not_json_is_415(cluster: Cluster, content_type: str) -> None:
    data = b'{"total_amount": 100, "total_packet": 2}'
    for path in ("/v1/red-packets", f"/v1/red-packets/{await cluster.create(SENDER, 100, 1)}/open"):
        status, body = await cluster.raw(
            "POST",
            path,
            data if path.endswith("packets") else b"{}",
            auth(cluster, **{"Content-Type": content_type}),
        )
        assert (status, body["error"]["code"]) == (415, "unsupported_media_type"), path


@pytest.mark.parametrize("bad", [1.0, True, "1"])
async def test_counts_and_money_are_strict_integers(cluster: Cluster, bad: Any) -> None:
    for body in (
        {"kind": "exclusive", "total_amount": 100, "total_packet": bad, "receiver_uid": "7"},
        {"kind": "equal", "amount_each": 10, "total_packet": 2, "total_amount": bad},
        {"total_amount": 100, "total_packet": bad},
    ):
        status, answer = await cluster.call("POST", "/v1/red-packets", SENDER, body)
        assert (status, answer["error"]["code"]) == (400, "invalid_field"), body


async def test_sub_must_be_a_canonical_decimal(cluster: Cluster) -> None:
    packet_id = await cluster.create(SENDER, 100, 1, kind="exclusive", receiver_uid="7777")
    for sub in ("07777", "+7777", "7777.0", " 7777"):
        forged = jwt.encode(
            {"sub": sub, "exp": 4_000_000_000}, cluster.state["jwt_secret"], algorithm="HS256"
        )
        status, body = await cluster.raw(
            "POST", f"/v1/red-packets/{packet_id}/open", b"", {"Authorization": f"Bearer {forged}"}
        )
        assert (status, body["error"]["code"]) == (401, "unauthenticated"), sub
    _, info = await cluster.call("GET", f"/v1/red-packets/{packet_id}", SENDER)
    assert info["remaining_packet"] == 1


async def test_unknown_query_parameters_are_refused_on_every_endpoint(cluster: Cluster) -> None:
    packet_id = await cluster.create(SENDER, 200, 2)
    for method, path in (
        ("GET", f"/v1/red-packets/{packet_id}/records"),
        ("GET", f"/v1/red-packets/{packet_id}"),
        ("POST", f"/v1/red-packets/{packet_id}/grab"),
        ("POST", f"/v1/red-packets/{packet_id}/open"),
        ("GET", "/v1/me/received"),
        ("GET", "/v1/me/sent"),
    ):
        status, body = await cluster.call(method, path, SENDER, limti="5")
        assert (status, body["error"]["code"]) == (400, "unknown_field"), path
        assert body["error"]["fields"] == ["limti"]
    status, body = await cluster.call(
        "POST", "/v1/red-packets", SENDER, {"total_amount": 100, "total_packet": 1}, debug="1"
    )
    assert (status, body["error"]["code"]) == (400, "unknown_field")


async def test_every_api_answer_carries_the_safety_headers(cluster: Cluster) -> None:
    assert cluster.session is not None
    packet_id = await cluster.create(SENDER, 100, 1)
    for method, path, headers in (
        ("GET", f"/v1/red-packets/{packet_id}", auth(cluster)),
        ("GET", f"/v1/red-packets/{packet_id}", {}),  # 401
        ("GET", "/v1/nothing", auth(cluster)),  # 404
        ("GET", "/healthz", {}),
    ):
        async with cluster.session.request(method, cluster.url + path, headers=headers) as resp:
            assert resp.headers["Cache-Control"] == "no-store", path
            assert resp.headers["X-Content-Type-Options"] == "nosniff", path
            assert resp.headers["Server"] == "redpacket", path


async def raw_exchange(cluster: Cluster, data: bytes, wait_s: float = 30) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    host, port = cluster.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    try:
        async with asyncio.timeout(wait_s):
            return await reader.read()  # until EOF: the server closed the connection
    finally:
        writer.close()


async def test_stalled_connections_are_closed_and_nothing_leaks_to_the_logs(
    make_cluster: Any,
) -> None:
    cluster: Cluster = await make_cluster(
        REDPACKET_HEADER_TIMEOUT_S="1", REDPACKET_BODY_READ_TIMEOUT_S="1"
    )
    token = cluster.token(SENDER)
    # a silent partial body: 408 and closed
    answer = await raw_exchange(
        cluster,
        b"POST /v1/red-packets HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + token.encode() + b'\r\nContent-Length: 100\r\n\r\n{"total',
    )
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    # partial headers: closed
    await raw_exchange(cluster, b"GET /v1/me/sent HTTP/1.1\r\nHost: x\r\nAuthorization: Bea")
    # an over-long header: a JSON error that echoes nothing
    long_token = "eyJ" + "A" * 9000
    answer = await raw_exchange(
        cluster,
        b"GET /v1/me/sent HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + long_token.encode()
        + b"\r\n\r\n",
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b" 400 " in head.split(b"\r\n")[0] and b"application/json" in head, head
    assert b"invalid_request" in body and b"AAAA" not in body
    # a client that goes away mid-body
    host, port = cluster.url.removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/red-packets HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + token.encode() + b'\r\nContent-Length: 100\r\n\r\n{"to'
    )
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.transport.abort()
    await asyncio.sleep(0.5)
    status, _ = await cluster.call("GET", "/v1/me/sent", SENDER)  # still serving
    assert status == 200
    log = (cluster.home / "logs" / "gateway.log").read_text()
    assert "Traceback" not in log
    assert token[:20] not in log and "AAAAAAAA" not in log
    await cluster.check()

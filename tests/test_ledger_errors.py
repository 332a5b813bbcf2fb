"""The ledger's errors: every failure of the store leaves the ledger as its own exception
(node/ledger.py ``LedgerError`` and its family), never as the driver's, so the committer
and the 503 mapping catch one family whatever client library the node uses."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from redpacket.node.ledger import Ledger, LedgerRefused, LedgerUnavailable, ValueRefused
from tests.conftest import NodeHandle


async def test_a_statement_mysql_refuses_is_a_ledger_refusal(node: NodeHandle) -> None:
    ledger = node.shard.ledger
    with pytest.raises(LedgerRefused) as refused:
        async with ledger.connection() as conn, conn.cursor() as cur:
            await cur.execute("SELECT no_such_column FROM red_packet_info")
    assert refused.value.code == 1054
    with pytest.raises(ValueRefused):  # a value too long for its column
        async with ledger.connection() as conn, conn.cursor() as cur:
            await cur.execute(
                "INSERT INTO red_packet_record (red_packet_id, uid, amount, nick_name, img_url, "
                "create_time) VALUES (1, 1, 1, %s, '', NOW())",
                ("x" * 65,),
            )
    await node.check()


async def test_a_mysql_that_is_not_there_is_unavailable(node: NodeHandle) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(LedgerUnavailable):
        await Ledger.connect(f"mysql://root@127.0.0.1:{port}/nothing", timeout_s=2)
    await node.check()


async def test_a_cut_mysql_is_unavailable_whatever_the_driver_raises(
    proxied_mysql: Any, node: NodeHandle
) -> None:
    """A cut (the proxy aborts every connection, pooled or new) leaves the ledger as
    LedgerUnavailable, a 503 to retry, never as an internal error. (Under load asyncmy can
    also raise a bare RuntimeError while it opens a connection that is cut at once; the
    ledger maps every failure of an acquire to LedgerUnavailable for that. It did not happen
    here on demand: the 60 s chaos run of tests/test_chaos.py is what caught it.)"""
    url, proxy = await proxied_mysql("cut", database=False)
    ledger = await Ledger.connect(url + "/mysql", pool_size=2, timeout_s=2)
    try:
        await ledger.ping()
        proxy.block()
        for _ in range(6):  # the pooled connections die first, then every new one
            with pytest.raises(LedgerUnavailable):
                await ledger.ping()
        proxy.unblock()
        await ledger.ping()
    finally:
        await ledger.close()
    await node.check()

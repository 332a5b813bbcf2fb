"""The ledger's errors: every failure of the store leaves the ledger as its own exception
(node/ledger.py ``LedgerError`` and its family), never as the driver's, so the committer
and the 503 mapping catch one family whatever client library the node uses. And the two
ways a node uses a connection (``Ledger.transaction`` and ``Ledger.read``): what they leave
committed, rolled back or open when a block ends or fails."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from redpacket.node.ledger import Ledger, LedgerRefused, LedgerUnavailable, ValueRefused
from redpacket.node.mysql import ensure_database
from tests.conftest import NodeHandle, sql


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


# -- Ledger.transaction and Ledger.read ---------------------------------------------------


@pytest_asyncio.fixture
async def probe(mysql_databases: Any) -> AsyncIterator[tuple[Ledger, str]]:
    """A ledger of one connection (a block after another gets the same one, unless it was
    closed) on a fresh database with a table ``probe``, and that database's URL for an
    outsider to look."""
    url = mysql_databases("txn")
    await ensure_database(url)
    await sql(url, "CREATE TABLE probe (id INT PRIMARY KEY) ENGINE=InnoDB")
    ledger = await Ledger.connect(url, pool_size=1, timeout_s=5)
    try:
        yield ledger, url
    finally:
        await ledger.close()


async def _seen(url: str) -> list[int]:
    """The probe rows another connection sees: the committed ones."""
    return [int(r[0]) for r in await sql(url, "SELECT id FROM probe ORDER BY id")]


async def _connection_id(cur: Any) -> int:
    await cur.execute("SELECT CONNECTION_ID()")
    return int((await cur.fetchone())[0])


async def test_a_transaction_commits_when_its_block_ends(probe: tuple[Ledger, str]) -> None:
    ledger, url = probe
    async with ledger.transaction() as cur:
        first = await _connection_id(cur)
        await cur.execute("INSERT INTO probe (id) VALUES (1)")
        assert await _seen(url) == []  # not before the block ends
    assert await _seen(url) == [1]
    async with ledger.transaction() as cur:  # a block that gives up: nothing is committed
        await cur.execute("INSERT INTO probe (id) VALUES (2)")
        await cur.connection.rollback()
    assert await _seen(url) == [1]
    async with ledger.transaction() as cur:  # and the pool kept its connection
        assert await _connection_id(cur) == first


async def test_a_transaction_rolls_back_what_an_exception_leaves(
    probe: tuple[Ledger, str],
) -> None:
    ledger, url = probe
    with pytest.raises(KeyError):  # the block's own error, as it was
        async with ledger.transaction() as cur:
            await cur.execute("INSERT INTO probe (id) VALUES (3)")
            raise KeyError("the block fails")
    with pytest.raises(LedgerRefused):  # the driver's, as the ledger's
        async with ledger.transaction() as cur:
            await cur.execute("INSERT INTO probe (id) VALUES (4)")
            await cur.execute("INSERT INTO probe (id) VALUES (4)")  # a duplicate key
    assert await _seen(url) == []
    async with ledger.transaction() as cur:  # the pool's next connection works
        await cur.execute("INSERT INTO probe (id) VALUES (5)")
    assert await _seen(url) == [5]


async def test_a_read_ends_its_transaction(probe: tuple[Ledger, str]) -> None:
    """What a read wrote is rolled back, a row another connection commits afterwards is
    seen by the next read, and the pool keeps the connection (it closes one handed back
    inside a transaction)."""
    ledger, url = probe
    async with ledger.read() as cur:
        first = await _connection_id(cur)
        await cur.execute("SELECT COUNT(*) FROM probe")
        assert await cur.fetchone() == (0,)
        await cur.execute("INSERT INTO probe (id) VALUES (6)")
    await sql(url, "INSERT INTO probe (id) VALUES (7)")
    async with ledger.read() as cur:
        assert await _connection_id(cur) == first
        await cur.execute("SELECT id FROM probe ORDER BY id")
        assert [r[0] for r in await cur.fetchall()] == [7]
    assert await _seen(url) == [7]

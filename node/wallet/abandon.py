"""The packet's shard's side of an orphan hold: "does the packet of this create exist?"

The wallet's sweeper (node/wallet/holds.py) asks when a hold has stayed open too long (the
gateway died between the hold and the create, or between the create and the confirm). The
answer must stay true afterwards, or a slow create still in flight could make a packet out of
money already given back. So a "no" leaves a tombstone (``create_abandoned``) in the same
transaction, and every create reads that table first, in its own transaction, with a shared
lock:

- the create's locked read comes first: it holds the gap where the tombstone would go, so the
  abandon's insert waits for the create to commit, and its read then finds the packet: "yes";
- the abandon's insert comes first: the create's locked read waits for it to commit, finds
  the tombstone and refuses the create (409 ``create_abandoned``): "no" stays true.

The abandon's read of the packet is a plain read taken after its insert, so it sees every
create committed before it (InnoDB's snapshot starts at the first read).
"""

from __future__ import annotations

import datetime as dt

import aiomysql

from redpacket.node.ledger import CreateAbandoned, Ledger, retry_lock_conflicts
from redpacket.node.shard import Shard


async def refuse_abandoned(cur: aiomysql.Cursor, packet_id: int) -> None:
    """First statement of a create's transaction (see the module docstring)."""
    await cur.execute(
        "SELECT 1 FROM create_abandoned WHERE red_packet_id = %s LOCK IN SHARE MODE",
        (packet_id,),
    )
    if await cur.fetchone() is not None:
        raise CreateAbandoned(packet_id)


@retry_lock_conflicts
async def abandon(ledger: Ledger, packet_id: int, token: str, now_ms: int) -> str:
    """``created`` (the packet exists with this token), ``other`` (the id holds another
    create's packet) or ``abandoned`` (it does not, and now never will)."""
    when = dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=now_ms)
    async with ledger.transaction() as cur:
        await cur.execute(
            "INSERT IGNORE INTO create_abandoned (red_packet_id, create_token, create_time) "
            "VALUES (%s, %s, %s)",
            (packet_id, token, when),
        )
        await cur.execute(
            "SELECT create_token FROM red_packet_info WHERE red_packet_id = %s", (packet_id,)
        )
        row = await cur.fetchone()
        if row is not None:
            await cur.connection.rollback()  # no tombstone next to a packet: its retries replay
            return "created" if row[0] == token else "other"
        return "abandoned"


async def ask_here(shard: Shard, packet_id: int, token: str, now_ms: int) -> str:
    """:func:`abandon` on this shard, unless the packet is elsewhere (raises packet_moved)
    or being handed off from here (it exists): the same placement rules as a create."""
    placement = shard.placement
    if placement is None:
        return await abandon(shard.ledger, packet_id, token, now_ms)
    with placement.admitting():
        existing = await placement.existing_for_create(packet_id)
        if existing is not None:
            return "created" if existing.create_token == token else "other"
        return await abandon(shard.ledger, packet_id, token, now_ms)

"""The outbox: history events written in the same transaction as the ledger change they report.

The packet's shard does not write a user's history itself (it lives on the shard that owns
``user:<uid>``, docs/architecture.md "My red packets"): it writes one outbox row per change,
inside the transaction that makes the change, so an event exists if and only if the change
committed. ``node/relay.py`` delivers the rows; ``node/history.py`` applies them.

Two events, each a full row to merge (so applying one twice, or out of order, is harmless):

- ``received`` (to the receiver): one share, with the sender and the kind; ``luckiest`` is
  true on the copy written by the commit that decided 手气最佳;
- ``sent`` (to the sender): the packet's progress after the change (opened shares and
  cents, refund), written at create, by every commit batch that touched it, and at refund.

The events that move money carry ``"credit": true`` (every share's ``received``, the refund's
``sent``): the user's shard posts them to the wallet in the same apply transaction
(node/wallet/credits.py), exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import aiomysql
import orjson

from redpacket.core.clock import now_ms
from redpacket.node.packet import (
    MS_TO_TIME,
    PACKET_SELECT,
    Claim,
    PacketRow,
    many_rows,
    packet_from_row,
    time_to_ms,
)

RECEIVED = "received"
SENT = "sent"
# history_outbox.payload is VARBINARY(2048) (node/schema.sql). The display fields are bounded
# at the edge (core/profile.py), but a payload that still does not fit must not fail the
# transaction that carries a share or a refund: it loses its display fields instead.
PAYLOAD_MAX_BYTES = 2048
_DISPLAY_FIELDS = ("sender_img", "sender_nick", "greeting")  # the largest first

log = logging.getLogger("redpacket.node.outbox")


Event = tuple[int, str, int, dict[str, Any]]  # (uid, event, red_packet_id, payload)

_STATE_SQL = (
    f"SELECT {PACKET_SELECT} FROM red_packet_info FORCE INDEX (uk_red_packet_id) "
    "WHERE red_packet_id IN "
)


async def packet_states(cur: aiomysql.Cursor, packet_ids: Iterable[int]) -> dict[int, PacketRow]:
    """The packets as this transaction sees them (after its changes), by id."""
    ids = list(packet_ids)
    await cur.execute(_STATE_SQL + "(" + ", ".join(["%s"] * len(ids)) + ")", ids)
    states = {}
    for row in await cur.fetchall():
        state = packet_from_row(row)
        states[state.red_packet_id] = state
    return states


def sent(state: PacketRow, refunded_amount: int = 0) -> Event:
    return (
        state.uid,
        SENT,
        state.red_packet_id,
        {
            "kind": state.kind,
            "total_amount": state.total_amount,
            "total_packet": state.total_packet,
            "opened_packet": state.total_packet - state.remaining_packet,
            "opened_amount": state.total_amount - state.remaining_amount,
            "refunded_amount": refunded_amount,
            "greeting": state.greeting,
            "create_time": state.create_time_ms,
            "expire_time": state.expire_time_ms,
            # the refund moves money: credited to the sender's wallet (node/wallet/credits.py)
            **({"credit": True} if refunded_amount > 0 else {}),
        },
    )


def received(
    state: PacketRow, uid: int, amount: int, taken_ms: int, luckiest: bool = False
) -> Event:
    return (
        uid,
        RECEIVED,
        state.red_packet_id,
        {
            "amount": amount,
            "time": taken_ms,
            "sender": state.uid,
            "sender_nick": state.sender_nick,
            "sender_img": state.sender_img,
            "kind": state.kind,
            "luckiest": luckiest,
            "credit": True,  # the share moves money: credited to the winner's wallet
        },
    )


Best = tuple[int, int, int]  # (uid, amount, taken_ms) of a packet's 手气最佳 share


async def decide_luckiest(cur: aiomysql.Cursor, packet_ids: list[int]) -> dict[int, Best]:
    """手气最佳 of lucky packets this transaction sold out: the highest amount, the earliest
    share on a tie, then the record id. Set once (``luckiest_uid IS NULL``), in the transaction
    that takes the last share, so it moves with the packet and never changes.

    The best share is found by a plain (consistent, non-locking) read: this transaction holds
    the packets' rows, and every writer of a packet's records takes that row first, so the
    read sees all of them. An ``UPDATE ... SET luckiest_uid = (SELECT ... FROM
    red_packet_record)`` would read with shared next-key locks instead, and the gap after the
    sold-out packet's last record reaches the records of every newer packet: their inserts
    waited for this commit (measured, docs/architecture.md "Kinds and 手气最佳").
    """
    await cur.execute(
        " UNION ALL ".join(
            [
                "(SELECT red_packet_id, uid, amount, "
                f"{time_to_ms('create_time')} FROM red_packet_record "
                "WHERE red_packet_id = %s ORDER BY amount DESC, create_time, id LIMIT 1)"
            ]
            * len(packet_ids)
        ),
        packet_ids,
    )
    best = {
        int(pid): (int(uid), int(amount), int(when))
        for pid, uid, amount, when in await cur.fetchall()
    }
    if best:
        ids = sorted(best)
        await cur.execute(
            "UPDATE red_packet_info FORCE INDEX (uk_red_packet_id) SET luckiest_uid = "
            "(CASE red_packet_id " + " ".join(["WHEN %s THEN %s"] * len(ids)) + " END) "
            "WHERE red_packet_id IN (" + ", ".join(["%s"] * len(ids)) + ") "
            "AND luckiest_uid IS NULL",
            [*(v for pid in ids for v in (pid, best[pid][0])), *ids],
        )
    return best


async def claim_events(
    cur: aiomysql.Cursor, claims: list[Claim], packet_ids: list[int]
) -> list[Event]:
    """The events of one commit batch: a ``received`` per claim, a ``sent`` per packet, and
    the winner's ``received`` again with ``luckiest`` for lucky packets this batch sold out.

    One read of the packets' state after the batch's update; only a batch that sold a lucky
    packet out (its remaining_packet is 0 and no 手气最佳 is named yet) reads the records to
    name one."""
    states = await packet_states(cur, packet_ids)
    events = [sent(state) for state in states.values()]
    sold_lucky = [
        pid
        for pid, s in states.items()
        if s.kind == "lucky" and s.remaining_packet == 0 and s.luckiest_uid is None
    ]
    best = await decide_luckiest(cur, sold_lucky) if sold_lucky else {}
    for c in claims:
        lucky = c.red_packet_id in best and best[c.red_packet_id][0] == c.uid
        if lucky:
            del best[c.red_packet_id]
        events.append(
            received(states[c.red_packet_id], c.uid, c.amount, c.claimed_at_ms, luckiest=lucky)
        )
    for pid, (uid, amount, taken_ms) in best.items():  # the winner's share is an earlier batch's
        events.append(received(states[pid], uid, amount, taken_ms, luckiest=True))
    return events


async def write(cur: aiomysql.Cursor, events: list[Event]) -> None:
    """One multi-row ``INSERT ... VALUES (..), (..)`` for all the events of a transaction,
    stamped now in epoch ms (the relay measures the history lag from this stamp). A multi-row
    VALUES insert is a "simple insert" to InnoDB: its AUTO_INCREMENT ids come from a short
    mutex, not the table-level AUTO-INC lock that INSERT ... SELECT would hold to the end of
    the statement."""
    if not events:
        return
    when = now_ms()
    await cur.execute(
        "INSERT INTO history_outbox (uid, event, red_packet_id, payload, create_time) VALUES "
        + many_rows(_EVENT_ROW, len(events)),
        [
            v
            for uid, kind, pid, payload in events
            for v in (uid, kind, pid, encode_payload(pid, payload).decode(), when)
        ],
    )


_EVENT_ROW = f"(%s, %s, %s, %s, {MS_TO_TIME})"


def encode_payload(red_packet_id: int, payload: dict[str, Any]) -> bytes:
    """The payload as stored: its JSON, within :data:`PAYLOAD_MAX_BYTES` whatever it holds.

    Money and counts are never dropped (they are a few dozen bytes); the display fields go,
    one at a time, until it fits. Why not refuse: this runs inside the commit of a share or a
    refund, and a history row must never cost the user their money (issue 19)."""
    data = orjson.dumps(payload)
    for name in _DISPLAY_FIELDS:
        if len(data) <= PAYLOAD_MAX_BYTES:
            return data
        if payload.get(name):
            log.warning(
                "red packet %s: history event over %d bytes, %s dropped",
                red_packet_id,
                PAYLOAD_MAX_BYTES,
                name,
            )
            payload = {**payload, name: ""}
            data = orjson.dumps(payload)
    return data


def coalesce(events: dict[int, Event]) -> tuple[dict[int, Event], dict[int, list[int]]]:
    """The events of one relay pass without the redundant ``sent`` states, and for each kept
    event the outbox ids it stands for.

    Every commit batch writes a ``sent`` per packet it touched: on a crowd of small packets
    that is about one per claim, while the sender's row only keeps the latest state (opened
    counts and refund only grow, node/history.py). So of a packet's ``sent`` events in a pass
    only the most advanced one is delivered; the others are done when it is. An event that
    moves money (``credit``: a refund) is never dropped, and ``received`` events are each a
    share: they all go.
    """
    latest: dict[tuple[int, int], tuple[tuple[int, int, int], int]] = {}
    for row_id, (uid, kind, pid, payload) in events.items():
        progress = _progress(row_id, payload) if kind == SENT else None
        if progress is None:
            continue
        best = latest.get((uid, pid))
        if best is None or progress > best[0]:
            latest[(uid, pid)] = (progress, row_id)
    kept: dict[int, Event] = {}
    stands_for: dict[int, list[int]] = {}
    for row_id, event in events.items():
        uid, kind, pid, payload = event
        best = latest.get((uid, pid)) if kind == SENT else None
        if best is None or best[1] == row_id or payload.get("credit"):
            kept[row_id] = event
        elif _progress(row_id, payload) is None:
            kept[row_id] = event  # malformed: its destination decides (a dead letter)
        else:
            stands_for.setdefault(best[1], []).append(row_id)
    return kept, stands_for


def _progress(row_id: int, payload: dict[str, Any]) -> tuple[int, int, int] | None:
    """How far a ``sent`` state is (opened shares, refund, then the later row); None if the
    payload is not one."""
    try:
        return int(payload["opened_packet"]), int(payload["refunded_amount"]), row_id
    except (KeyError, TypeError, ValueError):
        return None

"""Moving users' own data off a node in one pass: their idempotency keys and their history
(我的红包), to the owner of ``user:<uid>`` in the fence's ring.

Three calls per batch of users, whatever their number of rows (docs/rebalancing.md, "Users'
keys and history"):

- ``leaving``: the old owner lists a page of its users (uid order, with their row counts, one
  query), keeps those its fence gives away, groups them by new owner into batches of bounded
  rows, and reads each batch's rows as one JSON array per table (``RowShape.list_json``);
- ``import_``: the new owner merges a batch in one transaction, one statement per table
  (``RowShape.merge_json``: the same merge rules as the relay's apply, node/history.py),
  and says which keys were bound here to something else;
- ``release``: the old owner deletes what it copied, one transaction.

The rows never become Python objects on either node: that was most of what a move cost
them. Nothing is applied behind the copy: from the fence on, this node binds no key and
applies no event of a user it gives away (node/handoff/fence.py, node/history.py), so a
user's rows here cannot change between ``leaving`` and ``release``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from redpacket.node.handoff.fence import Fence
from redpacket.node.history import HISTORY_TABLES, UserHistory, merge_json
from redpacket.node.ledger import retry_lock_conflicts
from redpacket.node.rowshape import TIME, RowShape
from redpacket.sharding.ring import user_key

# the idempotency keys of a user, as they travel (a key already bound here is kept)
KEYS = RowShape(
    "idempotency_key",
    (
        ("uid", "BIGINT"),
        ("idem_key", "VARCHAR(255) CHARACTER SET ascii"),
        ("request_hash", "CHAR(64) CHARACTER SET ascii"),
        ("red_packet_id", "BIGINT"),
        ("create_time", TIME),
    ),
    None,
    key=("uid", "idem_key"),
)
USER_TABLES = (KEYS, *HISTORY_TABLES)
# a key copied to a node that had it bound to another request: kept on both, reported
_CLASHES = (
    f"SELECT moved.j0, moved.j1 FROM {KEYS.json_table()} "
    "JOIN idempotency_key k ON k.uid = moved.j0 AND k.idem_key = moved.j1 "
    "WHERE k.request_hash <> moved.j2 OR k.red_packet_id <> moved.j3"
)


@dataclass
class Batch:
    """Users going to one node, and their rows: ``{table: JSON array or None}``."""

    owner: str
    uids: list[int]
    rows: int
    arrays: dict[str, str | None]
    counts: dict[str, int]  # rows per table


def _page_sql() -> str:
    """Users with rows here after a uid, with how many rows each: per table a range scan of
    the primary key's uid prefix (index only), at most ``limit`` users each."""
    part = (
        "(SELECT uid, COUNT(*) AS n FROM {table} WHERE uid > %s GROUP BY uid ORDER BY uid LIMIT %s)"
    )
    union = " UNION ALL ".join(part.format(table=t.table) for t in USER_TABLES)
    return f"SELECT uid, SUM(n) FROM ({union}) u GROUP BY uid ORDER BY uid LIMIT %s"


_PAGE = _page_sql()


class UserMoves:
    """A node's half of moving users' keys and history."""

    def __init__(self, fence: Fence) -> None:
        self.fence = fence
        self.shard = fence.shard

    async def leaving(
        self, after_uid: int, limit: int, page_rows: int, batch_rows: int
    ) -> tuple[list[Batch], int | None, int, int]:
        """``(batches, next uid or None, users taken, users counted)``: the users after
        ``after_uid`` (at most ``limit``), those leaving grouped per new owner in batches of
        at most ``batch_rows`` rows (a user with more goes alone), until ``page_rows`` leaving
        rows are taken. Users who stay cost a count in an index, never a read of their rows."""
        async with self.shard.ledger.read() as cur:
            await cur.execute(_PAGE, (*[after_uid, limit] * len(USER_TABLES), limit))
            counts = [(int(u), int(n)) for u, n in await cur.fetchall()]
            batches, seen = self._group(counts, page_rows, batch_rows)
            more = seen < len(counts) or len(counts) == limit
            for batch in batches:
                marks = ", ".join(["%s"] * len(batch.uids))
                for shape in USER_TABLES:
                    await cur.execute(shape.list_json(f"uid IN ({marks})"), batch.uids)
                    count, array = await cur.fetchone()
                    batch.arrays[shape.table] = array
                    batch.counts[shape.table] = int(count)
        return batches, counts[seen - 1][0] if seen and more else None, seen, len(counts)

    def _group(
        self, counts: list[tuple[int, int]], page_rows: int, batch_rows: int
    ) -> tuple[list[Batch], int]:
        """The leaving users of ``counts`` in batches per owner; how many users were seen."""
        open_: dict[str, Batch] = {}
        done: list[Batch] = []
        taken = seen = 0
        for uid, n in counts:
            owner = self.fence.owner_elsewhere(user_key(uid))
            if owner is not None:
                if taken and taken + n > page_rows:
                    break
                batch = open_.get(owner.name)
                if batch is not None and batch.rows + n > batch_rows:
                    done.append(open_.pop(owner.name))
                batch = open_.setdefault(owner.name, Batch(owner.name, [], 0, {}, {}))
                batch.uids.append(uid)
                batch.rows += n
                taken += n
            seen += 1
        return done + list(open_.values()), seen

    @retry_lock_conflicts
    async def import_(
        self,
        history: UserHistory,
        uids: list[int],
        arrays: dict[str, Any],
        keys: int | None = None,
    ) -> tuple[list[tuple[int, str]], list[int]]:
        """Merge a batch of users' rows: ``(keys bound here to something else, uids refused)``.
        A batch with a user another node keeps is refused whole. ``keys``: how many key rows
        the batch holds (listed with them): when all of them are new here, none can clash."""
        placement = self.shard.placement
        guard = placement.admitting() if placement is not None else contextlib.nullcontext()
        with guard:  # a fence being set waits for this import
            refused = [u for u in uids if history.elsewhere(u) is not None]
            if refused:
                return [], refused
            async with history.transaction() as cur:
                clashes: list[tuple[int, str]] = []
                if arrays.get(KEYS.table):
                    inserted = await cur.execute(KEYS.merge_json(), (arrays[KEYS.table],))
                    if keys is None or inserted < keys:  # some were here: which, and how
                        await cur.execute(_CLASHES, (arrays[KEYS.table],))
                        clashes = [(int(u), str(k)) for u, k in await cur.fetchall()]
                await merge_json(cur, arrays)
        return clashes, []

    @retry_lock_conflicts
    async def release(self, uids: list[int], keep: list[tuple[int, str]]) -> int:
        """Delete the keys and history of users copied to their new owner (only those the
        fence gives away), but the ``keep`` keys (bound differently there: kept on both)."""
        leaving = [u for u in uids if self.fence.owner_elsewhere(user_key(u)) is not None]
        if not leaving:
            return 0
        marks = ", ".join(["%s"] * len(leaving))
        keep_sql, keep_args = "", []
        if keep:
            keep_sql = " AND (uid, idem_key) NOT IN (" + ", ".join(["(%s, %s)"] * len(keep)) + ")"
            keep_args = [v for pair in keep for v in pair]
        deleted = 0
        async with self.shard.ledger.transaction() as cur:
            for shape in USER_TABLES:
                extra = keep_sql if shape is KEYS else ""
                args = [*leaving, *keep_args] if shape is KEYS else leaving
                deleted += await cur.execute(
                    f"DELETE FROM {shape.table} WHERE uid IN ({marks}){extra}", args
                )
        return deleted

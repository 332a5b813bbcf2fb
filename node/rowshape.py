"""The shape of a table's rows as they travel between shards, and the merge rule that
applies them: one definition that both the relay's apply (rows in ``VALUES`` lists) and a
rebalance's move of whole users (rows as JSON arrays MySQL builds and reads itself) use.

Why JSON arrays for moves: the pure-Python MySQL client parses every value of every row it
reads and escapes every value it writes, and that was most of the CPU a users' move cost the
two nodes (while they serve opens). ``JSON_ARRAYAGG`` on the old owner and ``JSON_TABLE`` on
the new one keep the rows inside MySQL: a node handles one string per table per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from redpacket.node.packet import MS_TO_TIME, time_to_ms

TIME = "TIME_MS"  # a DATETIME(3) column that travels as epoch ms (node/packet.py)
# a batch's JSON array is built like a GROUP_CONCAT: its length is capped by this (64 MiB,
# well past any batch; the default 1 MiB would cut a batch of long rows short). A batch holds
# at least one whole user, so this is also what a node accepts in one request (node/app.py):
# one user's rows up to it (about 200,000 history rows) move in one batch.
MAX_JSON_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class RowShape:
    """``fields``: ``(column, SQL type)`` in travel order (``TIME``: epoch ms); ``rule``: the
    ``ON DUPLICATE KEY UPDATE`` clause (None: a row already there is kept, INSERT IGNORE)."""

    table: str
    fields: tuple[tuple[str, str], ...]
    rule: str | None
    key: tuple[str, ...] = ("uid", "red_packet_id")  # the primary key: lock order

    @property
    def columns(self) -> str:
        return ", ".join(name for name, _ in self.fields)

    def placeholders(self) -> str:
        """One row of a VALUES list (times converted by the server)."""
        marks = (MS_TO_TIME if kind == TIME else "%s" for _, kind in self.fields)
        return f"({', '.join(marks)})"

    def _insert(self) -> str:
        verb = "INSERT" if self.rule else "INSERT IGNORE"
        return f"{verb} INTO {self.table} ({self.columns})"

    def _update(self) -> str:
        return f" ON DUPLICATE KEY UPDATE {self.rule}" if self.rule else ""

    def merge_values(self) -> str:
        """The merge of a VALUES list (``{rows}``: ``many_rows(placeholders(), n)``)."""
        return f"{self._insert()} VALUES {{rows}}{self._update()}"

    def list_json(self, where: str) -> str:
        """``(row count, JSON array of rows in key order)`` of the rows ``where`` selects
        (NULL array: none)."""
        values = ", ".join(time_to_ms(n) if kind == TIME else n for n, kind in self.fields)
        order = ", ".join(self.key)
        return (
            f"SET STATEMENT group_concat_max_len = {MAX_JSON_BYTES} FOR "
            f"SELECT COUNT(*), JSON_ARRAYAGG(JSON_ARRAY({values}) ORDER BY {order}) "
            f"FROM {self.table} WHERE {where}"
        )

    def json_table(self) -> str:
        """A JSON array of rows (one ``%s``) as a table ``moved`` of columns ``j0, j1, ...``
        (times still epoch ms)."""
        columns = ", ".join(
            f"j{i} {'BIGINT' if kind == TIME else kind} PATH '$[{i}]'"
            for i, (_, kind) in enumerate(self.fields)
        )
        return f"JSON_TABLE(%s, '$[*]' COLUMNS ({columns})) AS moved"

    def merge_json(self) -> str:
        """The merge of a JSON array of rows (one ``%s``), by the same rule."""
        values = ", ".join(
            f"TIMESTAMPADD(MICROSECOND, j{i} * 1000, '1970-01-01')" if kind == TIME else f"j{i}"
            for i, (_, kind) in enumerate(self.fields)
        )
        return f"{self._insert()} SELECT {values} FROM {self.json_table()}{self._update()}"

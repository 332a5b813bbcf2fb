"""Moving users' wallets (零钱) to the user's new owner (``user:<uid>`` on the ring), in
batches, like their history (user_data.py): list on the old owner, import on the new, release.

Once the fence is up the old owner refuses every wallet write of a user the fence ring gives
away (node/wallet/calls.py ``kept_here``, and the hold sweeper skips them), so what it lists
is final. The import is a merge that a repeated or resumed rebalance can run again: each
transaction goes in unless its reference ``(uid, kind, ref)`` is there already (the new owner
may have started the user's wallet since the fence: a credit, a hold, a top-up, a dev grant),
and the balance grows by the transactions that went in. Transactions keep their ids (shown to
users, snowflakes: node/wallet/book.py) unless one is taken here already (then the user's
later ones are renumbered with it, in order: ``_new_txns``), and top-ups keep their first
answer (``wallet_topup.txn_id``, ``balance_after``: a replay on the new owner answers exactly
what the first call did). ``balance_after`` stays as it was unless the new owner had rows of
the user already (a credit delivered since the fence) or ids were renumbered: then the user's
chain is summed again by id.
Holds are copied as they are (the new owner's sweeper then settles the holds still open).

The new owner refuses every wallet call of an arriving user (503, retry) from before the fence
until the user's wallet is imported (``wallet_arrival``) or the tool says all are in
(``POST .../wallets/arriving`` and ``.../wallets/in``: node/handoff/fence.py).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from redpacket.core.body import read_json_object
from redpacket.core.errors import bad_request, json_response
from redpacket.core.ids import parse_uid
from redpacket.node.handoff.fence import Fence
from redpacket.node.handoff.http import HANDOFF, PREFIX
from redpacket.node.ledger import retry_lock_conflicts, to_datetime, to_ms
from redpacket.node.shard import now_ms
from redpacket.node.wallet.book import TXN_IDS, open_book
from redpacket.sharding.ring import RingDoc, RingError, user_key

User = dict[str, Any]  # {"uid", "granted", "txns": [...], "holds": [...], "topups": [...]}


class WalletMoves:
    def __init__(self, fence: Fence) -> None:
        self.fence = fence
        self.ledger = fence.shard.ledger

    async def wallets(self, after_uid: int, limit: int) -> tuple[list[User], int | None]:
        """The wallets of the next ``limit`` users here that the fence gives away (those
        staying cost a read of their uid, no more), and the uid to list from next (None: the
        last page)."""
        async with self.ledger.read() as cur:
            await cur.execute(
                "SELECT uid, granted FROM wallet WHERE uid > %s ORDER BY uid LIMIT %s",
                (after_uid, limit),
            )
            scanned = list(await cur.fetchall())
            users = {int(u): {"uid": str(u), "granted": bool(g), "txns": [], "holds": [],
                              "topups": []} for u, g in scanned
                     if self.fence.owner_elsewhere(user_key(int(u))) is not None}  # fmt: skip
            if users:
                marks = ", ".join(["%s"] * len(users))
                await cur.execute(
                    "SELECT uid, kind, ref, amount, red_packet_id, balance_after, create_time, id "
                    f"FROM wallet_txn WHERE uid IN ({marks}) ORDER BY id",
                    list(users),
                )
                for uid, kind, ref, amount, pid, after, when, tid in await cur.fetchall():
                    users[int(uid)]["txns"].append(
                        [kind, ref, int(amount), pid and str(pid), int(after), to_ms(when),
                         str(tid)]
                    )  # fmt: skip
                await cur.execute(
                    "SELECT uid, create_token, amount, red_packet_id, state, create_time "
                    f"FROM wallet_hold WHERE uid IN ({marks})",
                    list(users),
                )
                for uid, token, amount, pid, state, when in await cur.fetchall():
                    users[int(uid)]["holds"].append(
                        [token, int(amount), str(pid), state, to_ms(when)]
                    )
                await cur.execute(
                    # the first answer (NULL before migration 0004: the transaction's then)
                    "SELECT t.uid, t.topup_id, t.amount, t.body_sha256, t.create_time, "
                    "COALESCE(t.txn_id, x.id), COALESCE(t.balance_after, x.balance_after) "
                    "FROM wallet_topup t LEFT JOIN wallet_txn x ON x.uid = t.uid "
                    f"AND x.kind = 'topup' AND x.ref = t.topup_id WHERE t.uid IN ({marks})",
                    list(users),
                )
                for uid, topup_id, amount, digest, when, tid, after in await cur.fetchall():
                    users[int(uid)]["topups"].append(
                        [topup_id, int(amount), digest, to_ms(when), tid and str(tid),
                         None if after is None else int(after)]
                    )  # fmt: skip
        return list(users.values()), int(scanned[-1][0]) if len(scanned) == limit else None

    @retry_lock_conflicts
    async def import_wallets(self, users: list[User]) -> list[int]:
        """Merge the wallets of users kept here; the uids refused (kept elsewhere)."""
        refused = [
            int(u["uid"]) for u in users if self.fence.owner_elsewhere(user_key(int(u["uid"])))
        ]
        mine = [u for u in users if int(u["uid"]) not in refused]
        if not mine:
            return refused
        async with self.ledger.transaction() as cur:
            book = await open_book(cur, [int(u["uid"]) for u in mine], now_ms())
            marks = ", ".join(["%s"] * len(book.wallets))
            await cur.execute(
                f"SELECT uid, kind, ref, id FROM wallet_txn WHERE uid IN ({marks})",
                list(book.wallets),
            )
            found = await cur.fetchall()
            have = {(int(u), str(k), str(r)) for u, k, r, _ in found}
            taken = {int(t) for *_, t in found} | await self._taken_ids(cur, mine)
            txns, rechain = self._new_txns(book, mine, have, taken)
            holds = [(t, int(u["uid"]), a, int(p), s, to_datetime(ms))
                     for u in mine for t, a, p, s, ms in u["holds"]]  # fmt: skip
            topups = [(r[0], int(u["uid"]), r[1], r[2], to_datetime(r[3]),
                       *(r[4:6] if len(r) > 4 else (None, None))) for u in mine
                      for r in u["topups"]]  # fmt: skip
            if txns:
                await cur.executemany(
                    "INSERT INTO wallet_txn (id, uid, kind, ref, amount, red_packet_id, "
                    "balance_after, create_time) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    txns,
                )
            if holds:
                await cur.executemany(
                    "INSERT IGNORE INTO wallet_hold (create_token, uid, amount, red_packet_id, "
                    "state, create_time) VALUES (%s, %s, %s, %s, %s, %s)",
                    holds,
                )
            if topups:
                await cur.executemany(
                    "INSERT IGNORE INTO wallet_topup (topup_id, uid, amount, body_sha256, "
                    "create_time, txn_id, balance_after) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    topups,
                )
            await book.write()
            for uid in sorted(rechain):
                await _rechain(cur, uid)
            if self.fence.incoming is not None:  # these users' calls are served from now on
                version = self.fence.incoming[0]
                await cur.executemany(
                    "INSERT INTO wallet_arrival (uid, ring_version) VALUES (%s, %s) "
                    "ON DUPLICATE KEY UPDATE ring_version = VALUES(ring_version)",
                    [(uid, version) for uid in sorted(book.wallets)],
                )
        return refused

    @staticmethod
    async def _taken_ids(cur: Any, users: list[User]) -> set[int]:
        """Which of the moving transactions' ids other rows here hold already."""
        ids = [int(t[6]) for u in users for t in u["txns"] if len(t) > 6]
        if not ids:
            return set()
        await cur.execute(
            f"SELECT id FROM wallet_txn WHERE id IN ({', '.join(['%s'] * len(ids))})", ids
        )
        return {int(r[0]) for r in await cur.fetchall()}

    @staticmethod
    def _new_txns(
        book: Any, users: list[User], have: set[tuple[int, str, str]], taken: set[int]
    ) -> tuple[list[tuple[Any, ...]], set[int]]:
        """The rows to insert (ids kept), and the users whose chain must be summed again.

        A transaction keeps the id it was shown with, unless another row here has it already
        (two nodes' generators drew the same generator id and met in one millisecond): then
        it and every later one of its user get new ids, in their order, so the user's chain
        still reads by id (a new id for that one alone would sort it after its successors,
        its ``balance_after`` out of order: the checker's "last balance_after")."""
        rows, rechain = [], set()
        had = {uid for uid, _, _ in have}
        for user in users:
            uid = int(user["uid"])
            wallet = book.wallets[uid]
            wallet.granted = wallet.granted or bool(user["granted"])
            wallet.changed = True
            renumbering = False
            for kind, ref, amount, pid, after, ms, *tid in user["txns"]:
                if (uid, kind, ref) in have:
                    continue  # there already (a repeated import, or the same dev grant)
                have.add((uid, kind, ref))
                wallet.balance += int(amount)
                renumbering = renumbering or not tid or int(tid[0]) in taken
                txn_id = TXN_IDS.next_id() if renumbering else int(tid[0])
                taken.add(txn_id)
                if uid in had or renumbering:  # summed again once all are in
                    rechain.add(uid)
                rows.append(
                    (txn_id, uid, kind, ref, amount, pid and int(pid), after, to_datetime(ms))
                )
        return rows, rechain

    @retry_lock_conflicts
    async def release_wallets(self, uids: list[int]) -> int:
        """Delete the wallets copied to their new owner (only those the fence gives away)."""
        leaving = [u for u in uids if self.fence.owner_elsewhere(user_key(u)) is not None]
        if not leaving:
            return 0
        marks = ", ".join(["%s"] * len(leaving))
        deleted = 0
        async with self.ledger.transaction() as cur:
            for table in ("wallet_txn", "wallet_hold", "wallet_topup", "wallet"):
                deleted += await cur.execute(f"DELETE FROM {table} WHERE uid IN ({marks})", leaving)
        return deleted


async def _rechain(cur: Any, uid: int) -> None:
    """Sum a user's transactions again, by id, into their ``balance_after``."""
    await cur.execute(
        "SELECT id, amount, balance_after FROM wallet_txn WHERE uid = %s ORDER BY id", (uid,)
    )
    running, fixes = 0, []
    for tid, amount, after in await cur.fetchall():
        running += int(amount)
        if int(after) != running:
            fixes.append((running, int(tid)))
    if fixes:
        await cur.executemany("UPDATE wallet_txn SET balance_after = %s WHERE id = %s", fixes)


def _moves(request: web.Request) -> WalletMoves:
    return WalletMoves(request.app[HANDOFF].fence)


async def list_wallets(request: web.Request) -> web.Response:
    query = dict(request.query)
    after = parse_uid(query.get("after_uid", "0")) if query.get("after_uid", "0") != "0" else 0
    raw_limit = query.get("limit", "200")
    if after is None or not (raw_limit.isdigit() and 1 <= int(raw_limit) <= 2000):
        raise bad_request("invalid_field", "after_uid and limit must be numbers")
    users, nxt = await _moves(request).wallets(after, int(raw_limit))
    return json_response({"users": users, "next": None if nxt is None else str(nxt)})


async def import_wallets(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    users = body.get("users")
    if not isinstance(users, list) or not all(isinstance(u, dict) for u in users):
        raise bad_request("invalid_field", "users must be a list of wallets")
    try:
        refused = await _moves(request).import_wallets(users)
    except (KeyError, TypeError, ValueError):
        raise bad_request("invalid_field", "a wallet is malformed") from None
    return json_response({"refused": [str(u) for u in refused]})


async def release_wallets(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    raw = body.get("uids")
    uids = [parse_uid(u) for u in raw] if isinstance(raw, list) else []
    if not uids or any(u is None for u in uids):
        raise bad_request("invalid_field", "uids must be a list of user ids")
    deleted = await _moves(request).release_wallets([u for u in uids if u])
    return json_response({"deleted": deleted})


async def wallets_arriving(request: web.Request) -> web.Response:
    """Before the fence: the users ``from`` gives elsewhere and the fence will give here wait
    for their wallets."""
    body = await read_json_object(request)
    version = body.get("ring_version")
    try:
        moving_from = RingDoc.parse(body.get("from"))  # type: ignore[arg-type]
    except RingError as exc:
        raise bad_request("invalid_ring", str(exc)) from None
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise bad_request("invalid_field", "ring_version must be a version number")
    fence = request.app[HANDOFF].fence
    await fence.expect_wallets(version, moving_from)
    return json_response({"node": fence.name, "arriving": version})


async def wallets_in(request: web.Request) -> web.Response:
    fence = request.app[HANDOFF].fence
    await fence.wallets_in()
    return json_response({"node": fence.name, "arriving": None})


ROUTES = [
    web.post(f"{PREFIX}/wallets/arriving", wallets_arriving),
    web.post(f"{PREFIX}/wallets/in", wallets_in),
    web.get(f"{PREFIX}/wallets", list_wallets),
    web.post(f"{PREFIX}/wallets", import_wallets),
    web.post(f"{PREFIX}/wallets/release", release_wallets),
]

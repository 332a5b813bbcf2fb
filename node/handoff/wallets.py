"""Moving users' wallets (零钱) to the user's new owner (``user:<uid>`` on the ring), in
batches, like their history (user_data.py): list on the old owner, import on the new, release.

Once the fence is up the old owner refuses every wallet write of a user the fence ring gives
away (node/wallet/calls.py ``kept_here``, and the hold sweeper skips them), so what it lists
is final. The import is a merge that a repeated or resumed rebalance can run again: each
transaction goes in unless its reference ``(uid, kind, ref)`` is there already (the new owner
may have started the user's wallet since the fence: a credit, a hold, a top-up, a dev grant),
and the balance grows by the transactions that went in (their ``balance_after`` restated on
this owner's running balance, so the list stays a running sum ending at the balance). Holds
and top-ups are copied as they are (the new owner's sweeper then settles the holds still open).
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
from redpacket.node.wallet.book import open_book
from redpacket.node.wallet.store import transaction
from redpacket.sharding.ring import user_key

User = dict[str, Any]  # {"uid", "granted", "txns": [...], "holds": [...], "topups": [...]}


class WalletMoves:
    def __init__(self, fence: Fence) -> None:
        self.fence = fence
        self.ledger = fence.shard.ledger

    async def wallets(self, after_uid: int, limit: int) -> list[User]:
        async with self.ledger.connection() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT uid, granted FROM wallet WHERE uid > %s ORDER BY uid LIMIT %s",
                (after_uid, limit),
            )
            users = {int(u): {"uid": str(u), "granted": bool(g), "txns": [], "holds": [],
                              "topups": []} for u, g in await cur.fetchall()}  # fmt: skip
            if users:
                marks = ", ".join(["%s"] * len(users))
                await cur.execute(
                    "SELECT uid, kind, ref, amount, red_packet_id, balance_after, create_time "
                    f"FROM wallet_txn WHERE uid IN ({marks}) ORDER BY id",
                    list(users),
                )
                for uid, kind, ref, amount, pid, after, when in await cur.fetchall():
                    users[int(uid)]["txns"].append(
                        [kind, ref, int(amount), pid and str(pid), int(after), to_ms(when)]
                    )
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
                    "SELECT uid, topup_id, amount, body_sha256, create_time "
                    f"FROM wallet_topup WHERE uid IN ({marks})",
                    list(users),
                )
                for uid, topup_id, amount, digest, when in await cur.fetchall():
                    users[int(uid)]["topups"].append([topup_id, int(amount), digest, to_ms(when)])
            await conn.rollback()
        return list(users.values())

    @retry_lock_conflicts
    async def import_wallets(self, users: list[User]) -> list[int]:
        """Merge the wallets of users kept here; the uids refused (kept elsewhere)."""
        refused = [
            int(u["uid"]) for u in users if self.fence.owner_elsewhere(user_key(int(u["uid"])))
        ]
        mine = [u for u in users if int(u["uid"]) not in refused]
        if not mine:
            return refused
        async with transaction(self.ledger) as cur:
            book = await open_book(cur, [int(u["uid"]) for u in mine], now_ms())
            marks = ", ".join(["%s"] * len(book.wallets))
            await cur.execute(
                f"SELECT uid, kind, ref FROM wallet_txn WHERE uid IN ({marks})", list(book.wallets)
            )
            have = {(int(u), str(k), str(r)) for u, k, r in await cur.fetchall()}
            txns, holds, topups = [], [], []
            for user in mine:
                uid = int(user["uid"])
                wallet = book.wallets[uid]
                wallet.granted = wallet.granted or bool(user["granted"])
                wallet.changed = True
                for kind, ref, amount, pid, _after, ms in user["txns"]:
                    if (uid, kind, ref) in have:
                        continue  # there already (a repeated import, or the same dev grant)
                    have.add((uid, kind, ref))
                    wallet.balance += int(amount)
                    # balance_after restated on this owner's running balance, so the list
                    # (by id) stays a running sum that ends at the balance
                    txns.append((uid, kind, ref, amount, pid and int(pid), wallet.balance,
                                 to_datetime(ms)))  # fmt: skip
                holds += [
                    (t, uid, a, int(p), s, to_datetime(ms)) for t, a, p, s, ms in user["holds"]
                ]
                topups += [(t, uid, a, d, to_datetime(ms)) for t, a, d, ms in user["topups"]]
            if txns:
                await cur.executemany(
                    "INSERT INTO wallet_txn (uid, kind, ref, amount, red_packet_id, balance_after, "
                    "create_time) VALUES (%s, %s, %s, %s, %s, %s, %s)",
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
                    "create_time) VALUES (%s, %s, %s, %s, %s)",
                    topups,
                )
            await book.write()
        return refused

    @retry_lock_conflicts
    async def release_wallets(self, uids: list[int]) -> int:
        """Delete the wallets copied to their new owner (only those the fence gives away)."""
        leaving = [u for u in uids if self.fence.owner_elsewhere(user_key(u)) is not None]
        if not leaving:
            return 0
        marks = ", ".join(["%s"] * len(leaving))
        deleted = 0
        async with transaction(self.ledger) as cur:
            for table in ("wallet_txn", "wallet_hold", "wallet_topup", "wallet"):
                deleted += await cur.execute(f"DELETE FROM {table} WHERE uid IN ({marks})", leaving)
        return deleted


def _moves(request: web.Request) -> WalletMoves:
    return WalletMoves(request.app[HANDOFF].fence)


async def list_wallets(request: web.Request) -> web.Response:
    query = dict(request.query)
    after = parse_uid(query.get("after_uid", "0")) if query.get("after_uid", "0") != "0" else 0
    raw_limit = query.get("limit", "200")
    if after is None or not (raw_limit.isdigit() and 1 <= int(raw_limit) <= 2000):
        raise bad_request("invalid_field", "after_uid and limit must be numbers")
    users = await _moves(request).wallets(after, int(raw_limit))
    return json_response(
        {"users": users, "next": users[-1]["uid"] if len(users) == int(raw_limit) else None}
    )


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


ROUTES = [
    web.get(f"{PREFIX}/wallets", list_wallets),
    web.post(f"{PREFIX}/wallets", import_wallets),
    web.post(f"{PREFIX}/wallets/release", release_wallets),
]

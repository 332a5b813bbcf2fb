"""The wallets under chaos (issue 18): what the clients saw of top-ups, creates refused for
lack of funds and wallet reads, held to the API's promises during the run
(:class:`WalletsSeen`) and, once the outboxes drained, against each user's transactions
(:func:`judge_wallets`). Conservation itself is the checker's (``cli/check_wallet.py``, run by
the verdict through ``check_shards``).

Top-ups are the payment provider's signed webhook, some sent again with the same
``topup_id`` (a replay must answer the first result and credit nothing). Creates beyond the
balance are made by *poor* users (``POOR_UID`` + the loop's index): each is granted the
starting balance and nothing else, never tops up and never opens, so a create above the
starting balance is certainly beyond its balance: 402, with that balance, never a packet, and
its retry with the same ``Idempotency-Key`` is 402 again and debits nothing.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redpacket.chaos.load import Answer, Load

POOR_UID = 20_000  # + the loop's index (FIRST_UID + index is its ordinary user)
WALLET_BOUND_S = 30.0  # after the run, every share is a `receive` within this (the outbox lag)


def over_balance_body(rng: random.Random, balance: int, max_amount: int) -> dict[str, Any]:
    """A valid lucky create of more than ``balance`` cents (``balance`` < ``max_amount``)."""
    shares = rng.randint(1, 8)
    return {"total_amount": rng.randint(balance + 1, max_amount), "total_packet": shares}


@dataclass
class Topup:
    uid: int
    amount: int
    result: dict[str, Any] | None = None  # the first 2xx body (transaction_id, balance_after)
    result_at: float = 0.0  # when it was answered (run s)


@dataclass
class WalletsSeen:
    """What the clients saw of wallets during the run."""

    topups: dict[str, Topup] = field(default_factory=dict)  # topup_id -> what it was
    topups_of: dict[int, list[str]] = field(default_factory=dict)  # uid -> its topup_ids
    # poor creates answered 402 or without an outcome: (uid, key, body); retried after the run
    over_balance: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    refused_402: int = 0  # ordinary creates answered 402 (their sender spent its money)
    poor: set[int] = field(default_factory=set)
    contradictions: list[str] = field(default_factory=list)
    # replays answered otherwise than the first: each a violation. A wallet move keeps a
    # top-up's first answer and holds the user's calls until the import (issue 18), so
    # nothing, a rebalance included, may change what a replay answers.
    restated: list[str] = field(default_factory=list)

    def saw_topup(self, uid: int, amount: int, topup_id: str, answer: Answer, at_s: float) -> None:
        """201 the first time, 200 ``replayed`` with the first result after; never 4xx."""
        topup = self.topups.setdefault(topup_id, Topup(uid, amount))
        self.topups_of.setdefault(uid, [])
        if topup_id not in self.topups_of[uid]:
            self.topups_of[uid].append(topup_id)
        if answer.unknown:
            return
        body = answer.body if isinstance(answer.body, dict) else {}
        where = f"top-up {topup_id} of uid {uid}"
        if answer.status not in (200, 201):
            self.contradictions.append(f"{where}: answered {answer.outcome} {body}")
            return
        if answer.status == 200 and body.get("replayed") is not True:
            self.contradictions.append(f"{where}: 200 without replayed: true")
        mine = {k: body.get(k) for k in ("transaction_id", "balance_after", "amount")}
        if int(mine["balance_after"] or 0) < amount or mine["amount"] != amount:
            self.contradictions.append(f"{where}: answered {mine} for {amount} cents")
        if topup.result is None:
            topup.result, topup.result_at = mine, at_s
        elif answer.status == 201:
            self.restated.append(f"{where}: a replay answered 201 (as new) after {topup.result}")
        elif topup.result != mine:
            self.restated.append(f"{where}: replay answered {mine}, first {topup.result}")

    def saw_402(self, uid: int, body: dict[str, Any], answer: Answer) -> None:
        self.refused_402 += 1
        self._balance_not_negative(uid, (answer.body or {}).get("error", {}).get("balance"))

    def saw_over_balance(
        self, uid: int, key: str, body: dict[str, Any], answer: Answer, starting: int
    ) -> None:
        """A poor user's create beyond its balance: 402 with exactly the starting balance."""
        self.poor.add(uid)
        if answer.unknown:
            self.over_balance.append((uid, key, body))
            return
        error = (answer.body or {}).get("error", {}) if isinstance(answer.body, dict) else {}
        if answer.status != 402 or error.get("code") != "insufficient_funds":
            self.contradictions.append(
                f"create {key} of {body['total_amount']} cents by uid {uid} (balance {starting}): "
                f"answered {answer.outcome} {error or answer.body}, not 402 insufficient_funds"
            )
        elif error.get("balance") != starting:
            self.contradictions.append(
                f"create {key} by uid {uid}: 402 with balance {error.get('balance')} != {starting}"
            )
        self.over_balance.append((uid, key, body))

    def saw_wallet(self, uid: int, answer: Answer) -> None:
        if answer.status == 200 and isinstance(answer.body, dict):
            self._balance_not_negative(uid, answer.body.get("balance"))
            if int(answer.body.get("incoming", 0)) < 0:
                self.contradictions.append(f"uid {uid}: incoming {answer.body['incoming']} < 0")

    def saw_transactions(self, uid: int, answer: Answer) -> None:
        if answer.status == 200 and isinstance(answer.body, dict):
            for txn in answer.body.get("transactions", []):
                self._balance_not_negative(uid, txn.get("balance_after"))

    def _balance_not_negative(self, uid: int, balance: Any) -> None:
        if isinstance(balance, int) and balance < 0:
            self.contradictions.append(f"uid {uid}: a balance of {balance} cents was shown")


async def resolve_wallets(load: Load, deadline: float) -> list[str]:
    """Send again every top-up whose outcome was not learnt, and every poor create (the same
    Idempotency-Key), until answered; the problems."""
    seen, problems = load.outcomes.wallets, []
    for topup_id, topup in sorted(load.outcomes.wallets.topups.items()):
        while topup.result is None and time.monotonic() < deadline:
            answer = await load.topup_call(topup.uid, topup.amount, topup_id, "topup_retry")
            if not answer.unknown and topup.result is None:
                break  # a 4xx: already a contradiction
            if answer.unknown:
                await asyncio.sleep(0.5)
        if topup.result is None:
            problems.append(f"top-up {topup_id} of uid {topup.uid}: outcome never known")
    for uid, key, body in list(seen.over_balance):
        while time.monotonic() < deadline:
            answer = await load.client.call(
                "POST", "/v1/red-packets", uid, body=body, headers={"Idempotency-Key": key}
            )
            load.outcomes.count("create_402_retry", answer)
            if not answer.unknown:
                seen.over_balance.remove((uid, key, body))
                seen.saw_over_balance(uid, key, body, answer, load.starting_balance)
                break
            await asyncio.sleep(0.5)
        else:
            problems.append(f"create {key} of uid {uid}: outcome never known")
    return problems


async def transactions_of(load: Load, uid: int) -> list[dict[str, Any]] | None:
    """All of ``uid``'s transactions (newest first), or None if they could not be read."""
    txns: list[dict[str, Any]] = []
    cursor = None
    for _ in range(200):
        params = {"limit": "100", **({"cursor": cursor} if cursor else {})}
        page = await load.client.call("GET", "/v1/me/wallet/transactions", uid, params=params)
        if page.status != 200 or not isinstance(page.body, dict):
            return None
        txns += page.body["transactions"]
        cursor = page.body.get("next_cursor")
        if not cursor:
            return txns
    return txns


@dataclass(frozen=True)
class Expected:
    """What one user's transactions must hold, from what the clients saw."""

    receives: dict[str, int]  # public packet id -> the share answered 200
    sends: dict[str, int]  # public packet id -> its total (created 201)
    topups: dict[str, int]  # topup_id -> amount (top-ups answered 2xx)
    poor_balance: int | None = None  # a poor user: exactly one grant of this, nothing else


def wallet_problems(uid: int, txns: list[dict[str, Any]], want: Expected) -> list[str]:
    """The ways ``txns`` (one user's, newest first) differ from what the clients saw."""
    out: list[str] = []
    if any(int(t["balance_after"]) < 0 for t in txns):
        out.append(f"uid {uid}: a balance_after below 0")
    if want.poor_balance is not None:
        kinds = [(t["kind"], int(t["amount"])) for t in txns]
        if kinds and kinds != [("grant", want.poor_balance)]:
            out.append(f"uid {uid} (only creates beyond its balance): transactions {kinds[:5]}")
        return out
    receives = {
        str(t.get("red_packet_id")): int(t["amount"]) for t in txns if t["kind"] == "receive"
    }
    missing = {p: a for p, a in want.receives.items() if receives.get(p) != a}
    if missing:
        shown = sorted(missing.items())[:3]
        out.append(f"uid {uid}: {len(missing)} shares answered 200 not received, e.g. {shown}")
    sends = {str(t.get("red_packet_id")): -int(t["amount"]) for t in txns if t["kind"] == "send"}
    unpaid = {p: a for p, a in want.sends.items() if sends.get(p) != a}
    if unpaid:
        out.append(f"uid {uid}: {len(unpaid)} packets created without their send: "
                   f"{sorted(unpaid.items())[:3]}")  # fmt: skip
    # by amount, not transaction id: a wallet move gives the transactions new ids
    topups = sorted(int(t["amount"]) for t in txns if t["kind"] == "topup")
    if topups != sorted(want.topups.values()):
        out.append(
            f"uid {uid}: top-ups {len(topups)} ({sum(topups)} cents) != answered "
            f"{len(want.topups)} ({sum(want.topups.values())} cents)"
        )
    return out


def expectations(load: Load) -> dict[int, Expected]:
    out, seen = load.outcomes, load.outcomes.wallets
    receives: dict[int, dict[str, int]] = {}
    for (packet, uid), amount in out.opened.items():
        receives.setdefault(uid, {})[packet] = amount
    sends: dict[int, dict[str, int]] = {}
    for packet_id, packet in out.packets.items():
        body = packet.body
        total = body.get("total_amount") or body["amount_each"] * body["total_packet"]
        sends.setdefault(packet.sender, {})[packet_id] = int(total)
    topups: dict[int, dict[str, int]] = {}
    for topup_id, topup in seen.topups.items():
        if topup.result is not None:
            topups.setdefault(topup.uid, {})[topup_id] = topup.amount
    users = {uid: Expected(receives.get(uid, {}), sends.get(uid, {}), topups.get(uid, {}))
             for uid in load.uids}  # fmt: skip
    for uid in seen.poor:
        users[uid] = Expected({}, {}, {}, poor_balance=load.starting_balance)
    return users


async def judge_wallets(load: Load) -> tuple[int, list[str]]:
    """Each user's transactions against what the clients saw, allowing the outbox
    ``WALLET_BOUND_S`` to bring the credits; (users judged, problems)."""
    users = expectations(load)
    deadline = time.monotonic() + WALLET_BOUND_S

    async def one(uid: int) -> list[str]:
        while True:
            txns = await transactions_of(load, uid)
            problems = (
                [f"uid {uid}: transactions not readable"]
                if txns is None
                else wallet_problems(uid, txns, users[uid])
            )
            if not problems or time.monotonic() > deadline:
                return problems
            await asyncio.sleep(1.0)

    gate = asyncio.Semaphore(8)

    async def bounded(uid: int) -> list[str]:
        async with gate:
            return await one(uid)

    found = await asyncio.gather(*(bounded(uid) for uid in sorted(users)))
    return len(users), [p for problems in found for p in problems]

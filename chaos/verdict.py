"""The verdict, after every fault is healed: first learn every outcome the clients did not
(retry each create and open that got no answer or a 5xx until it is known), wait for every
packet to be finished (sold out, or expired and refunded), then hold the system to what the
clients saw, through the public API only, and run the ledger checker on every shard.

The API-level checks (each failure is a violation):

- every open answered 200 is in the packet's records, with that amount; a user answered
  "no share" (403, 404, 410) has no record;
- nobody has two records in one packet; a retry never changed an amount;
- records + remaining = totals (amount and shares); the totals are the ones created;
- per kind: an equal packet's shares are all ``amount_each``; an exclusive packet's only
  record is its receiver's;
- every packet ends ``sold_out`` (nothing remaining) or ``refunded`` (something remaining,
  refunded once: the refund fields the API shows equal what remained);
- with per-user history: each user's received history and each sender's sent history
  equal the ledgers (read once the outbox has had time to drain);
- liveness: every open has a final answer within a bound of the last fault's heal.

What reads showed while the load ran (a created packet never 404, records never missing a
200, remaining never up, a history never shrinking) is judged as it happens
(``load.Outcomes``) and lands here among the contradictions.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from redpacket.chaos.load import Answer, Client, Load, Outcomes, Packet
from redpacket.chaos.wallets import judge_wallets, resolve_wallets
from redpacket.cli.check import Observed, check_shards
from redpacket.core.ids import snowflake_of
from redpacket.sharding.ring import NodeSpec

FINAL = ("sold_out", "refunded")
RESOLVE_BOUND_S = 120.0  # learning the outcomes the clients did not learn, at most
HISTORY_BOUND_S = 30.0  # the outbox has this long to bring histories level with the ledgers
# every open has a final answer this long after the last fault healed (restarts, a Redis
# rebuild, the reconciler's backoff and the link's reconnect all fit well inside it)
LIVENESS_BOUND_S = 30.0


@dataclass
class Verdict:
    violations: list[str] = field(default_factory=list)
    resolved_creates: int = 0
    resolved_opens: int = 0
    unresolved: int = 0
    packets: int = 0
    records: int = 0
    refunded: int = 0
    sold_out: int = 0
    history_users: int = 0
    wallet_users: int = 0  # users whose transactions were held to what the clients saw
    topups: int = 0  # distinct top-ups answered 2xx
    over_balance_creates: int = 0  # creates beyond the balance, each 402 (and 402 retried)
    liveness_s: float = 0.0  # the last open answered without an outcome, after the last heal
    checker: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


async def _gather_bounded(jobs: Iterable[Any], limit: int = 16) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(job: Any) -> Any:
        async with gate:
            return await job

    return list(await asyncio.gather(*(one(j) for j in jobs)))


async def _until_known(call: Any, deadline: float) -> Answer | None:
    """Call again (with backoff) until the answer is one that says what happened."""
    pause = 0.2
    while time.monotonic() < deadline:
        answer: Answer = await call()
        if not answer.unknown:
            return answer
        await asyncio.sleep(pause)
        pause = min(pause * 2, 3.0)
    return None


async def resolve(load: Load, verdict: Verdict) -> None:
    """Retry every create and open whose outcome the client did not learn, until known."""
    out, client = load.outcomes, load.client
    deadline = time.monotonic() + RESOLVE_BOUND_S

    async def create(uid: int, key: str, body: dict[str, Any]) -> None:
        async def call() -> Answer:
            answer = await client.call(
                "POST", "/v1/red-packets", uid, body=body, headers={"Idempotency-Key": key}
            )
            out.count("create_retry", answer)
            return answer

        answer = await _until_known(call, deadline)
        if answer is None:
            verdict.unresolved += 1
            verdict.violations.append(f"create {key} of uid {uid}: outcome never known")
        elif answer.status == 201:
            load.saw_created(uid, body, answer.body)
            verdict.resolved_creates += 1
        else:
            verdict.resolved_creates += 1  # known not to have happened (4xx)

    async def open_(packet: str, uid: int) -> None:
        answer = await _until_known(lambda: load.open_one(packet, uid, "open_retry"), deadline)
        if answer is None:
            verdict.unresolved += 1
            verdict.violations.append(f"open of {packet} by uid {uid}: outcome never known")
        else:
            verdict.resolved_opens += 1

    async def wallets() -> None:
        if load.payments_secret:
            problems = await resolve_wallets(load, deadline)
            verdict.unresolved += len(problems)
            verdict.violations += problems

    # At once, not one after the other: one packet that never answers must not spend the
    # deadline of every top-up and create behind it (seed 1 reported 3,700 "never known",
    # all but 13 of them never even tried).
    creates, opens = list(out.unknown_creates), sorted(out.unknown_opens)
    out.unknown_creates.clear()
    await asyncio.gather(
        _gather_bounded(create(*c) for c in creates),
        _gather_bounded(open_(*key) for key in opens),
        wallets(),
    )


async def _read_packet(
    client: Client, out: Outcomes, packet: str
) -> tuple[dict[str, Any] | None, list[Any]]:
    info = await client.call("GET", f"/v1/red-packets/{packet}", 1)
    out.saw_packet_answer(packet, "GET packet (verdict)", info)
    if info.status != 200:
        return None, []
    records: list[Any] = []
    cursor = None
    for _ in range(50):  # 100 shares at most: two pages; bounded anyway
        params = {"limit": "100", **({"cursor": cursor} if cursor else {})}
        page = await client.call("GET", f"/v1/red-packets/{packet}/records", 1, params=params)
        out.saw_packet_answer(packet, "records (verdict)", page)
        if page.status != 200:
            return None, []
        records += page.body["records"]
        cursor = page.body["next_cursor"]
        if cursor is None:
            break
    return info.body, records


async def read_all(
    client: Client, out: Outcomes, packets: list[str], final_by: float
) -> dict[str, tuple[dict[str, Any], list[Any]]]:
    """Every packet's info and records once it is finished (or ``final_by`` has passed)."""
    seen: dict[str, tuple[dict[str, Any], list[Any]]] = {}
    todo = list(packets)
    while todo:
        answers = await _gather_bounded(_read_packet(client, out, p) for p in todo)
        later = []
        for packet, (info, records) in zip(todo, answers, strict=True):
            if info is not None:
                seen[packet] = (info, records)
            if info is None or info["status"] not in FINAL:
                later.append(packet)
        todo = later
        if not todo or time.monotonic() > final_by:
            break
        await asyncio.sleep(1.0)
    return seen


def judge_packets(
    out: Outcomes, seen: dict[str, tuple[dict[str, Any], list[Any]]], verdict: Verdict
) -> dict[str, dict[int, int]]:
    """The API-level checks; returns the ledgers as the API shows them (packet -> uid -> cents)."""
    v = verdict.violations
    ledgers: dict[str, dict[int, int]] = {}
    for packet_id, packet in sorted(out.packets.items()):
        where = f"red packet {packet_id} ({packet.kind})"
        if packet_id not in seen:
            v.append(f"{where}: created (201) but cannot be read through the API")
            continue
        info, records = seen[packet_id]
        verdict.packets += 1
        verdict.records += len(records)
        by_uid = _ledger(where, records, v)
        ledgers[packet_id] = by_uid
        _judge_shares(where, packet, info, by_uid, v)
        _judge_status(where, info, verdict)
        _judge_luckiest(where, packet, info, by_uid, v)
    _judge_answers(out, ledgers, v)
    v.extend(out.contradictions)
    return ledgers


def _ledger(where: str, records: list[Any], v: list[str]) -> dict[int, int]:
    """One packet's records as uid -> cents. A uid twice (two shares to one user) is a
    violation, not an error: the last record wins, and judging goes on."""
    by_uid: dict[int, int] = {}
    for record in records:
        uid = int(record["uid"])
        if uid in by_uid:
            v.append(f"{where}: uid {uid} has two records")
        by_uid[uid] = int(record["amount"])
    return by_uid


def _judge_shares(
    where: str, packet: Packet, info: dict[str, Any], by_uid: dict[int, int], v: list[str]
) -> None:
    """The money adds up: the totals are the ones created, records + remaining = totals (in
    cents and in shares), and the shares fit the kind (an equal packet's all ``amount_each``,
    an exclusive packet's opened by its receiver alone)."""
    body = packet.body
    total = body.get("total_amount") or body["amount_each"] * body["total_packet"]
    if (info["total_amount"], info["total_packet"]) != (total, body["total_packet"]):
        v.append(f"{where}: totals {info['total_amount']}/{info['total_packet']} != created")
    if sum(by_uid.values()) + info["remaining_amount"] != info["total_amount"]:
        v.append(
            f"{where}: records {sum(by_uid.values())} + remaining "
            f"{info['remaining_amount']} != total {info['total_amount']}"
        )
    if len(by_uid) + info["remaining_packet"] != info["total_packet"]:
        v.append(
            f"{where}: {len(by_uid)} records + {info['remaining_packet']} remaining "
            f"!= {info['total_packet']} shares"
        )
    if any(a < 1 for a in by_uid.values()):
        v.append(f"{where}: a share below 1 cent")
    if packet.kind == "equal" and set(by_uid.values()) - {body["amount_each"]}:
        v.append(f"{where}: equal shares differ: {sorted(set(by_uid.values()))}")
    if packet.receiver is not None and set(by_uid) - {packet.receiver}:
        v.append(f"{where}: opened by {sorted(set(by_uid) - {packet.receiver})}, not its receiver")


def _judge_status(where: str, info: dict[str, Any], verdict: Verdict) -> None:
    """Every packet ends finished, long after it expired: ``sold_out`` with nothing left, or
    ``refunded`` with something left and the refund the API shows equal to what remained.
    Counts the refunded and sold-out packets (a run without both tested too little)."""
    v = verdict.violations
    status = info["status"]
    if status not in FINAL:
        v.append(f"{where}: still {status!r} long after it expired")
    elif status == "sold_out" and info["remaining_packet"] != 0:
        v.append(f"{where}: sold_out with {info['remaining_packet']} shares left")
    elif status == "refunded":
        verdict.refunded += 1
        if info["remaining_packet"] == 0:
            v.append(f"{where}: refunded although every share was taken")
        refund = info.get("refunded_amount")
        if refund is not None and refund != info["remaining_amount"]:
            v.append(f"{where}: refunded {refund} != remaining {info['remaining_amount']}")
    if status == "sold_out":
        verdict.sold_out += 1


def _judge_luckiest(
    where: str, packet: Packet, info: dict[str, Any], by_uid: dict[int, int], v: list[str]
) -> None:
    """手气最佳, where the API has it: a sold-out lucky packet names the highest share; a
    packet of another kind, or not sold out, names nobody (no share is luckiest yet)."""
    if "luckiest" not in info:
        return
    status = info["status"]
    best = info["luckiest"]
    if packet.kind == "lucky" and status == "sold_out" and by_uid:
        if best is None or by_uid.get(int(best["uid"])) != max(by_uid.values()):
            v.append(f"{where}: luckiest {best} is not the highest share")
    elif best is not None and (packet.kind != "lucky" or status != "sold_out"):
        v.append(f"{where}: luckiest {best} although not a sold-out lucky packet")


def _judge_answers(out: Outcomes, ledgers: dict[str, dict[int, int]], v: list[str]) -> None:
    """What the clients were told holds in the records: every open answered 200 is there with
    that amount, and a user answered "no share" has no record (packets the API could not
    show are already violations of their own, so they are skipped here)."""
    for (packet_id, uid), amount in sorted(out.opened.items()):
        got = ledgers.get(packet_id, {}).get(uid)
        if packet_id in ledgers and got != amount:
            v.append(
                f"red packet {packet_id}: uid {uid} was answered 200 with {amount}, records {got}"
            )
    for (packet_id, uid), code in sorted(out.refused.items()):
        got = ledgers.get(packet_id, {}).get(uid)
        if got is not None:
            v.append(
                f"red packet {packet_id}: uid {uid} was answered {code} but has {got} in records"
            )


async def _pages(client: Client, uid: int, which: str, year: int) -> list[Any] | None:
    items: list[Any] = []
    cursor = None
    key = "records" if which == "received" else "packets"
    for _ in range(1000):
        params = {"year": str(year), "limit": "100", **({"cursor": cursor} if cursor else {})}
        page = await client.call("GET", f"/v1/me/{which}", uid, params=params)
        if page.status != 200:
            return None
        items += page.body.get(key, [])
        cursor = page.body.get("next_cursor")
        if not cursor:
            return items
    return items


async def judge_history(
    load: Load,
    ledgers: dict[str, dict[int, int]],
    seen: dict[str, tuple[dict[str, Any], list[Any]]],
    verdict: Verdict,
) -> None:
    """Each user's history (received and sent) equals the ledgers, once the outbox drained."""
    client, out = load.client, load.outcomes
    years = {dt.datetime.now(dt.timezone(dt.timedelta(hours=8))).year}  # the users' calendar
    year = years.pop()
    received: dict[int, dict[str, int]] = {}
    for packet_id, by_uid in ledgers.items():
        for uid, amount in by_uid.items():
            received.setdefault(uid, {})[packet_id] = amount
    sent: dict[int, dict[str, tuple[int, int, int]]] = {}  # total, opened, refunded
    for packet_id, packet in out.packets.items():
        if packet_id in seen:
            info = seen[packet_id][0]
            refunded = info["remaining_amount"] if info["status"] == "refunded" else 0
            opened = info["total_amount"] - info["remaining_amount"]
            sent.setdefault(packet.sender, {})[packet_id] = (info["total_amount"], opened, refunded)
    users = sorted(set(received) | set(sent) | set(load.uids))
    deadline = time.monotonic() + HISTORY_BOUND_S

    async def one(uid: int) -> str | None:
        problem: str | None = "not read"
        while True:
            got_r = await _pages(client, uid, "received", year)
            got_s = await _pages(client, uid, "sent", year)
            if got_r is None or got_s is None:
                problem = f"uid {uid}: history not readable"
            else:
                mine_r = {str(r["red_packet_id"]): int(r["amount"]) for r in got_r}
                mine_s = {
                    str(p["red_packet_id"]): (
                        int(p["total_amount"]),
                        int(p["opened_amount"]),
                        int(p["refunded_amount"]),
                    )
                    for p in got_s
                }
                want_r = received.get(uid, {})
                want_s = sent.get(uid, {})
                problem = None
                if len(got_r) != len(mine_r) or mine_r != want_r:
                    problem = (
                        f"uid {uid}: received history {len(got_r)} entries, "
                        f"{sum(mine_r.values())} cents != ledgers {len(want_r)}, "
                        f"{sum(want_r.values())} cents"
                    )
                elif len(got_s) != len(mine_s) or mine_s != want_s:
                    problem = f"uid {uid}: sent history != ledgers ({len(mine_s)} vs {len(want_s)})"
            if problem is None or time.monotonic() > deadline:
                return problem
            await asyncio.sleep(1.0)

    problems = await _gather_bounded(one(uid) for uid in users)
    verdict.history_users = len(users)
    verdict.violations += [p for p in problems if p]


def judge_liveness(out: Outcomes, last_heal_s: float, bound_s: float, verdict: Verdict) -> None:
    """Every open gets a final answer (200, or a "no share") within ``bound_s`` of the moment
    the last fault healed: an open still answered 5xx, timeout or refused after that is a
    liveness violation (issue 24: an open unanswerable for minutes after two faults)."""
    limit = last_heal_s + bound_s
    late = sorted((at, key) for key, at in out.last_unknown_open.items() if at > limit)
    last_unknown = max(out.last_unknown_open.values(), default=last_heal_s)
    verdict.liveness_s = round(max(0.0, last_unknown - last_heal_s), 2)
    for at, (packet, uid) in late[:20]:
        verdict.violations.append(
            f"liveness: open of {packet} by uid {uid} still had no final answer "
            f"{at - last_heal_s:.1f}s after the last fault healed (bound {bound_s:g}s)"
        )
    if len(late) > 20:
        verdict.violations.append(f"liveness: {len(late) - 20} more such opens")


async def judge(
    load: Load,
    nodes: list[NodeSpec],
    final_by: float,
    settle_s: float = 30.0,
    *,
    last_heal_s: float = 0.0,
    liveness_s: float = LIVENESS_BOUND_S,
) -> Verdict:
    verdict = Verdict()
    await resolve(load, verdict)
    judge_liveness(load.outcomes, last_heal_s, liveness_s, verdict)
    seen = await read_all(load.client, load.outcomes, sorted(load.outcomes.packets), final_by)
    ledgers = judge_packets(load.outcomes, seen, verdict)
    if load.api.history:
        await judge_history(load, ledgers, seen, verdict)
    if load.payments_secret:
        verdict.wallet_users, problems = await judge_wallets(load)
        wallets = load.outcomes.wallets
        verdict.violations += problems + wallets.contradictions + wallets.restated
        verdict.topups = sum(t.result is not None for t in load.outcomes.wallets.topups.values())
        verdict.over_balance_creates = len(load.outcomes.wallets.over_balance)
    observed = [Observed(snowflake_of(p), u, a) for (p, u), a in load.outcomes.opened.items()]
    report = await check_shards(nodes, observed, settle_s=settle_s)
    verdict.checker = report.summary()
    verdict.violations += [f"checker: {x}" for x in report.violations]
    return verdict

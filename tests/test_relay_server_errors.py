"""The relay and a destination that fails with 500 (a bug there, not a verdict on the event).

A 500 is retried like an outage, never taken at once as a refusal: a credit or a refund must
not be buried as a dead letter for a fault that a restart or the next try clears. The batch
is halved until the failing event is alone, so everything else is delivered meanwhile; only
an event that alone keeps getting 500 for longer than the grace is set aside.

The destination here is a real HTTP server that answers the node's history call as a node
would, failing on purpose for two users: one for its first two calls (a passing fault), one
always (a bug that stays). The source is a real node, with its real outbox in MariaDB.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from redpacket.cli.children import free_ports
from redpacket.nodeclient.wire import ROUTES
from redpacket.sharding.ring import RingDoc, route_user
from tests.conftest import sql

GRACE_S = 3.0


class Destination:
    """The history call of a node, on a real server; 500 for the users it is told to fail."""

    def __init__(self, fail_always: int, fail_twice: int) -> None:
        self.fail_always, self.fail_twice = fail_always, fail_twice
        self.applied: set[int] = set()
        self.first_500_s: dict[int, float] = {}
        self.calls_with: dict[int, int] = {}

    async def events(self, request: web.Request) -> web.Response:
        uids = {int(e[0]) for e in orjson.loads(await request.read())["events"]}
        for uid in uids:
            self.calls_with[uid] = self.calls_with.get(uid, 0) + 1
        failing = [
            u
            for u in uids
            if u == self.fail_always or (u == self.fail_twice and self.calls_with[u] <= 2)
        ]
        if failing:
            for uid in failing:
                self.first_500_s.setdefault(uid, time.monotonic())
            body = {"error": {"code": "internal_error", "message": "internal error"}}
            return web.json_response(body, status=500)
        self.applied |= uids
        return web.json_response({"applied": len(uids), "moved": {}})


def received() -> str:
    return json.dumps(
        {
            "amount": 1,
            "time": int(time.time() * 1000),
            "sender": 1,
            "sender_nick": "s",
            "sender_img": "",
            "kind": "lucky",
            "luckiest": False,
        }
    )


async def test_a_500_is_retried_and_only_an_event_failing_alone_past_the_grace_is_set_aside(
    fresh_node: Any, tmp_path: Path
) -> None:
    port = free_ports(1)[0]
    doc = RingDoc.parse(
        {
            "version": 1,
            "nodes": [
                {"name": "shard-t", "url": "http://127.0.0.1:1"},
                {"name": "shard-d", "url": f"http://127.0.0.1:{port}"},
            ],
        }
    )
    theirs = [u for u in range(9000, 9400) if route_user(doc, u).name == "shard-d"][:30]
    bug, passing, rest = theirs[0], theirs[1], theirs[2:]
    destination = Destination(fail_always=bug, fail_twice=passing)
    app = web.Application()
    app.router.add_post(ROUTES["apply_history"].pattern, destination.events)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    ring_file = tmp_path / "ring.json"
    doc.save(ring_file)
    try:
        node = await fresh_node(
            REDPACKET_RING_FILE=str(ring_file),
            REDPACKET_RELAY_SERVER_ERROR_GRACE_S=str(GRACE_S),
            REDPACKET_HISTORY_RELAY_IDLE_S="0.05",
        )
        mysql = node.settings.mysql_url
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        for uid in (bug, passing, *rest):  # the failing ones first: they lead every batch
            await sql(
                mysql,
                "INSERT INTO history_outbox (uid, event, red_packet_id, payload, create_time) "
                "VALUES (%s, 'received', %s, %s, %s)",
                (uid, uid, received(), now),
            )
        deadline = time.monotonic() + 60
        buried_at_s = None
        while time.monotonic() < deadline:
            (dead,) = (await sql(mysql, "SELECT COUNT(*) FROM history_dead_letter"))[0]
            if dead and buried_at_s is None:
                buried_at_s = time.monotonic()
            (left,) = (await sql(mysql, "SELECT COUNT(*) FROM history_outbox"))[0]
            if left == 0:
                break
            await asyncio.sleep(0.1)
        assert destination.applied >= {passing, *rest}  # the others were not held back
        assert bug not in destination.applied
        dead_rows = await sql(mysql, "SELECT uid, error FROM history_dead_letter")
        assert [int(r[0]) for r in dead_rows] == [bug]  # the passing fault was not buried
        assert "500" in dead_rows[0][1]
        assert buried_at_s is not None
        # set aside only once it had failed alone for the grace (measured from the first 500)
        assert buried_at_s - destination.first_500_s[bug] >= GRACE_S
        assert destination.calls_with[bug] > 2  # retried meanwhile, not buried at once
        (left,) = (await sql(mysql, "SELECT COUNT(*) FROM history_outbox"))[0]
        assert left == 0  # every event is delivered or set aside: none lost, none stuck
    finally:
        await runner.cleanup()

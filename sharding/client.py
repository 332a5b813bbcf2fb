"""The rebalance's client of the shard nodes' handoff API (node/handoff/).

Requests go through the node client's HTTP transport (``nodeclient/http.py``: the node
secret, the deadline, the decoding of answers). Answers that say "try again" (503, a connection that
failed or timed out) are retried with backoff; anything else that is not a 2xx raises
:class:`NodeError`, since the handoff steps are idempotent but not guesswork.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, NamedTuple

import aiohttp
import msgpack

from redpacket.core.metrics import Buckets
from redpacket.nodeclient.client import Answer
from redpacket.nodeclient.http import HttpTransport
from redpacket.nodeclient.wire import NODE_SECRET_HEADER, NodeDown
from redpacket.sharding.ring import NodeSpec, RingDoc

H = "/internal/v1/handoff"
MSGPACK = "application/msgpack"  # users' rows travel as msgpack (node/handoff/users.py)


class NodeError(Exception):
    """A node refused a call (or never answered it)."""

    def __init__(self, node: str, status: int, code: str, message: str) -> None:
        super().__init__(f"{node}: {status} {code}: {message}")
        self.node, self.status, self.code = node, status, code


class OpenHistogram(NamedTuple):
    """A node's open latency histogram (node/handoff/http.py ``open_latency``): cumulative
    ``(bound_s, opens at or under it)``, the last bound ``inf``."""

    now: Buckets
    earlier: Buckets | None  # as it was a few seconds ago (None: the node does not keep it)


class HandoffClient:
    """The handoff API of the nodes, for `redpacket rebalance` (calls of the public API go
    through ``nodeclient.client.NodeClient``)."""

    def __init__(self, secret: str, *, timeout_s: float = 30.0, attempts: int = 6) -> None:
        self._secret = secret
        self._timeout_s = timeout_s
        self._attempts = attempts
        self._http: HttpTransport | None = None

    async def __aenter__(self) -> HandoffClient:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        self._http = HttpTransport(session, self._secret)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._http is not None:
            await self._http.session.close()

    async def request(
        self,
        node: NodeSpec,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        packed: bool = False,
    ) -> dict[str, Any]:
        """One call, retried with backoff while the node says "try again". ``packed``: the
        body goes as msgpack (the answer is decoded by its content type either way)."""
        delay = 0.1
        for attempt in range(self._attempts):
            last = attempt == self._attempts - 1
            try:
                answer = await self._once(node, method, path, body, params=params, packed=packed)
            except NodeDown as exc:
                if last:
                    raise NodeError(node.name, 0, "unreachable", str(exc) or "timeout") from None
            else:
                if answer.ok:
                    return answer.data if isinstance(answer.data, dict) else {}
                if answer.status not in (500, 502, 503, 504) or last:
                    raise NodeError(
                        node.name,
                        answer.status,
                        str(answer.error.get("code", "error")),
                        str(answer.error.get("message", "")),
                    )
            await asyncio.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    async def _once(
        self,
        node: NodeSpec,
        method: str,
        path: str,
        body: Any,
        *,
        params: Mapping[str, str] | None,
        packed: bool,
    ) -> Answer:
        assert self._http is not None, "use HandoffClient as an async context manager"
        if not packed:
            reply = await self._http.request(
                node.url, method, path, params=params, body=body, timeout_s=self._timeout_s
            )
            status, raw, retry_after = reply
            if status < 400 and raw[:1] not in (b"{", b"["):  # a msgpack answer
                return Answer.decode(status, msgpack.unpackb(raw, raw=False), retry_after)
            return Answer.decode(*reply)
        headers = {NODE_SECRET_HEADER: self._secret, "Content-Type": MSGPACK}
        try:
            async with self._http.session.request(
                method,
                node.url + path,
                data=msgpack.packb(body, use_bin_type=True),
                params=params,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            ) as resp:
                return Answer.decode(resp.status, await resp.read(), None)
        except TimeoutError:
            raise NodeDown("timeout", f"{node.url} did not answer in time") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise NodeDown("connect", f"{node.url}: {exc}") from None

    # -- who and what ---------------------------------------------------------------------

    async def ready_name(self, node: NodeSpec) -> str:
        """The name the node gives itself (its REDPACKET_NODE_NAME)."""
        return str((await self.request(node, "GET", "/readyz")).get("node", ""))

    async def fence(self, node: NodeSpec, doc: RingDoc) -> dict[str, Any]:
        body = doc.settled().as_dict()  # its versions too: the fence places packets by them
        return await self.request(node, "PUT", f"{H}/ring", body=body)

    async def clear_fence(self, node: NodeSpec) -> dict[str, Any]:
        return await self.request(node, "DELETE", f"{H}/ring")

    async def inventory(
        self, node: NodeSpec, page: int = 2000, after: int = 0
    ) -> AsyncIterator[tuple[int, str, str | None]]:
        """Every packet a node holds (of id above ``after``): ``(id, "active" | "out" | "in",
        peer)``."""
        after = str(after)
        while True:
            answer = await self.request(
                node, "GET", f"{H}/packets", params={"after": after, "limit": str(page)}
            )
            for pid, state, peer in answer["packets"]:
                yield int(pid), str(state), peer
            if answer.get("next") is None:
                return
            after = str(answer["next"])

    async def live(self, node: NodeSpec, from_id: int, before_id: int) -> int:
        """How many packets with ``from_id <= id < before_id`` the node holds that have not
        both expired and been settled (refunded or sold out)."""
        answer = await self.request(
            node,
            "GET",
            f"{H}/live",
            params={"from_id": str(from_id), "before_id": str(before_id)},
        )
        return int(answer["live"])

    async def keys(self, node: NodeSpec, page: int = 2000) -> AsyncIterator[list[Any]]:
        """Every idempotency key a node holds: ``[uid, key, request_hash, packet id, ms]``."""
        after_uid, after_key = "0", ""
        while True:
            answer = await self.request(
                node,
                "GET",
                f"{H}/idempotency-keys",
                params={"after_uid": after_uid, "after_key": after_key, "limit": str(page)},
            )
            for row in answer["keys"]:
                yield row
            if answer.get("next") is None:
                return
            after_uid, after_key = answer["next"]

    async def wallets(self, node: NodeSpec, page: int = 200) -> AsyncIterator[dict[str, Any]]:
        """The wallets of the users a node's fence gives away (node/handoff/wallets.py)."""
        after = "0"
        while True:
            answer = await self.request(
                node, "GET", f"{H}/wallets", params={"after_uid": after, "limit": str(page)}
            )
            for user in answer["users"]:
                yield user
            if answer.get("next") is None:
                return
            after = answer["next"]

    async def import_wallets(self, node: NodeSpec, users: Sequence[dict[str, Any]]) -> list[str]:
        """Merge wallets into their new owner: the uids it refused (kept elsewhere)."""
        answer = await self.request(node, "POST", f"{H}/wallets", body={"users": list(users)})
        return list(answer.get("refused", []))

    async def wallets_arriving(self, node: NodeSpec, doc: RingDoc) -> None:
        """Before the fence: users ``doc.previous`` gives elsewhere and ``doc`` gives to
        ``node`` wait there until their wallets are in (node/handoff/wallets.py)."""
        assert doc.previous is not None
        body = {"ring_version": doc.version, "from": doc.previous.settled().as_dict()}
        await self.request(node, "POST", f"{H}/wallets/arriving", body=body)

    async def wallets_in(self, node: NodeSpec) -> None:
        await self.request(node, "POST", f"{H}/wallets/in", body={})

    async def release_wallets(self, node: NodeSpec, uids: Sequence[str]) -> int:
        answer = await self.request(node, "POST", f"{H}/wallets/release", body={"uids": list(uids)})
        return int(answer.get("deleted", 0))

    # -- the steps of one packet ----------------------------------------------------------

    async def drain_outbox(self, node: NodeSpec, timeout_s: int = 10) -> tuple[int, int]:
        """Have ``node`` deliver its history outbox now: ``(delivered, left)``."""
        answer = await self.request(
            node, "POST", f"{H}/outbox/drain", params={"timeout_s": str(timeout_s)}
        )
        return int(answer["delivered"]), int(answer["left"])

    async def export(
        self, node: NodeSpec, packet_id: int, to: str, ring_version: int
    ) -> dict[str, Any]:
        return await self.request(
            node,
            "POST",
            f"{H}/packets/{packet_id}/export",
            body={"to": to, "ring_version": ring_version},
        )

    async def import_(
        self, node: NodeSpec, packet_id: int, export: dict[str, Any], ring_version: int
    ) -> str:
        answer = await self.request(
            node,
            "POST",
            f"{H}/packets/{packet_id}/import",
            body={"from": export["from"], "ring_version": ring_version, "export": export},
        )
        return str(answer["state"])

    async def activate(self, node: NodeSpec, packet_id: int) -> str:
        answer = await self.request(node, "POST", f"{H}/packets/{packet_id}/activate", body={})
        return str(answer["state"])

    async def finish(
        self, node: NodeSpec, packet_id: int, owner: NodeSpec, ring_version: int
    ) -> str:
        answer = await self.request(
            node,
            "POST",
            f"{H}/packets/{packet_id}/finish",
            body={"owner": owner.name, "owner_url": owner.url, "ring_version": ring_version},
        )
        return str(answer["state"])

    async def abort(self, node: NodeSpec, packet_id: int) -> str:
        answer = await self.request(node, "POST", f"{H}/packets/{packet_id}/abort", body={})
        return str(answer["state"])

    async def discard(self, node: NodeSpec, packet_id: int) -> str:
        answer = await self.request(node, "POST", f"{H}/packets/{packet_id}/discard", body={})
        return str(answer["state"])

    # -- the steps of a batch of packets (node/handoff/batch.py) -----------------------------

    async def batch(self, node: NodeSpec, step: str, body: dict[str, Any]) -> dict[int, Any]:
        """One step for many packets: ``{packet id: result}`` (a result with state "failed"
        carries the status, code and message of that packet's own failure)."""
        answer = await self.request(node, "POST", f"{H}/batches/{step}", body=body)
        return {int(pid): result for pid, result in answer["results"].items()}

    # -- users' keys and history (node/handoff/users.py) -------------------------------------

    async def users_page(
        self, node: NodeSpec, after: int, *, limit: int, page_rows: int, batch_rows: int
    ) -> dict[str, Any]:
        """A page of the node's users after uid ``after``: ``{"next", "users", "batches":
        [[owner, uids, rows per table, JSON arrays per table]]}`` for those leaving."""
        params = {
            "after_uid": str(after),
            "limit": str(limit),
            "page_rows": str(page_rows),
            "batch_rows": str(batch_rows),
        }
        return await self.request(node, "GET", f"{H}/users", params=params)

    async def import_users(
        self, node: NodeSpec, uids: Sequence[int], counts: dict[str, int], arrays: dict[str, Any]
    ) -> tuple[list[list[Any]], list[str]]:
        """Merge a batch into its users' new owner: ``(keys bound there to something else,
        uids it refused)``. ``counts``: rows per table, as listed."""
        body = {"uids": list(uids), "counts": counts, "arrays": arrays}
        answer = await self.request(node, "POST", f"{H}/users", body=body, packed=True)
        return list(answer.get("clashes", [])), list(answer.get("refused", []))

    async def release_users(
        self, node: NodeSpec, uids: Sequence[int], keep: Sequence[list[Any]]
    ) -> int:
        body = {"uids": [str(u) for u in uids], "keep": list(keep)}
        answer = await self.request(node, "POST", f"{H}/users/release", body=body)
        return int(answer.get("deleted", 0))

    # -- the opens' latency (node/handoff/http.py open_latency) -------------------------------

    async def open_latency(self, node: NodeSpec) -> OpenHistogram | None:
        """The node's open latency histogram, now and a few seconds ago. Tried once: ``None``
        if the node did not answer (or predates the route), and the pacing goes on without
        that read."""
        try:
            answer = await self._once(
                node, "GET", f"{H}/opens/latency", None, params=None, packed=False
            )
        except NodeDown:
            return None
        data = answer.data
        if not answer.ok or not isinstance(data, dict):
            return None
        try:
            bounds = [float(b) for b in data["bounds_s"]] + [math.inf]
            now = _buckets(bounds, data["counts"])
            earlier = data.get("earlier")  # nodes of 0.1.x keep no earlier reading
            then = _buckets(bounds, earlier["counts"]) if isinstance(earlier, dict) else None
        except (KeyError, TypeError, ValueError):
            return None
        return OpenHistogram(now, then)


def _buckets(bounds: list[float], counts: Any) -> Buckets:
    """``counts`` (one per bound) beside their bounds; ValueError if they do not match."""
    return list(zip(bounds, [float(c) for c in counts], strict=True))

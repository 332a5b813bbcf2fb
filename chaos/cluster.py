"""The cluster under chaos: a ``redpacket dev up`` cluster (run in this process, as the
benchmark does) whose every shard reaches MySQL through its own :class:`TcpProxy`, so one
shard's ledger can be cut or slowed while the others, on the same server, are not.

Only the nodes go through the proxies; the checker and the rebalance tool read the ring's
direct URLs, as an operator's tools would.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass, field

from redpacket.chaos.proxy import TcpProxy
from redpacket.cli.devcluster import Child, DevCluster, ShardPlan
from redpacket.node.ledger import connect_one, parse_mysql_url


@dataclass
class ChaosCluster(DevCluster):
    proxies: dict[str, TcpProxy] = field(default_factory=dict)

    async def _proxy(self, shard: str) -> TcpProxy:
        if shard not in self.proxies:
            server = parse_mysql_url(self.mysql_server)
            proxy = TcpProxy(server.host, server.port)
            await proxy.start()
            self.proxies[shard] = proxy
        return self.proxies[shard]

    async def up(self, timeout_s: float = 60.0) -> None:
        for i in range(self.shards):
            await self._proxy(f"shard-{i}")
        await super().up(timeout_s)

    async def add_shard(self, name: str, node_port: int = 0, timeout_s: float = 60.0) -> ShardPlan:
        await self._proxy(name)
        return await super().add_shard(name, node_port, timeout_s)

    def _shard_children(self, plan: ShardPlan) -> list[Child]:
        children = super()._shard_children(plan)
        server = parse_mysql_url(self.mysql_server)
        proxy = self.proxies[plan.name]
        for child in children:
            if child.name.endswith("-node"):
                child.env["REDPACKET_MYSQL_URL"] = plan.mysql_url.replace(
                    f"{server.host}:{server.port}", f"127.0.0.1:{proxy.port}", 1
                )
        return children

    def child(self, name: str) -> Child:
        return self.children[name]

    async def down(self) -> None:
        for proxy in self.proxies.values():
            proxy.delay_s = 0.0
            proxy.unblock()
        await super().down()
        for proxy in self.proxies.values():
            await proxy.stop()

    async def drop_databases(self) -> None:
        """Drop every database of this cluster (shards added by a rebalance included)."""
        prefix = self._prefix()
        with contextlib.suppress(Exception):
            conn = await connect_one(self.mysql_server, with_database=False)
            try:
                async with conn.cursor() as cur:
                    await cur.execute("SHOW DATABASES LIKE %s", (prefix.replace("_", "\\_") + "%",))
                    for (name,) in await cur.fetchall():
                        await cur.execute("DROP DATABASE IF EXISTS `" + name + "`")
            finally:
                conn.close()


def new_prefix() -> str:
    return f"redpacket_chaos_{secrets.token_hex(3)}"

"""The kubernetes rebalance backend, against a local fake of the API calls it makes.

No Kubernetes API server runs here. The fake below speaks the few REST endpoints the backend
uses (StatefulSet scale, pods, the ring ConfigMap) closely enough for the official client to
parse them, and plays the gateway's /readyz too. The shard nodes are real (in process, each
with its own Redis and MySQL database), so the packets really move.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from kubernetes import client as k8s

from redpacket.cli.check import Observed, check_shards
from redpacket.cli.children import free_ports
from redpacket.core.ids import snowflake_of
from redpacket.sharding.backends import BackendError
from redpacket.sharding.backends.kubernetes import KubernetesBackend, KubernetesNames
from redpacket.sharding.rebalance import Rebalancer
from redpacket.sharding.ring import NodeSpec, Ring, RingDoc
from tests.conftest import IDS, NodeHandle, start_node

NS = "pay"


class FakeKube:
    """StatefulSets (replicas and their pods), pods, one ConfigMap, and a gateway's /readyz."""

    def __init__(self, statefulsets: dict[str, int], configmap: str, ring: RingDoc) -> None:
        self.replicas = dict(statefulsets)
        self.pods: dict[str, tuple[float, float | None]] = {}  # name -> (ready at, gone at)
        for sts, count in statefulsets.items():
            for i in range(count):
                self.pods[f"{sts}-{i}"] = (0.0, None)
        # gateway pods (name -> IP); each one's /readyz is this server, reached at that IP
        self.gateways = {"gw-0": "127.0.0.1"}
        self.gateway_replicas = 1  # the gateway Deployment's spec.replicas
        self.gateway_lag: dict[str, int] = {}  # IP -> versions a gateway is behind
        self.gateways_ready = True
        for gw in self.gateways:
            self.pods[gw] = (0.0, None)
        self.configmap = configmap
        self.data = {"ring.json": json.dumps(ring.as_dict())}
        self.resource_version = 1
        self.calls: list[tuple[str, str]] = []
        self.delay_s = 0.3  # pods take this long to become ready, or to go away

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        scale = "/apis/apps/v1/namespaces/{ns}/statefulsets/{name}/scale"
        app.add_routes(
            [
                web.get(scale, self.get_scale),
                web.patch(scale, self.patch_scale),
                web.get("/api/v1/namespaces/{ns}/pods", self.list_pods),
                web.get("/api/v1/namespaces/{ns}/pods/{name}", self.get_pod),
                web.get("/api/v1/namespaces/{ns}/configmaps/{name}", self.get_configmap),
                web.put("/api/v1/namespaces/{ns}/configmaps/{name}", self.put_configmap),
                web.get("/readyz", self.gateway_readyz),
                web.get("/apis/apps/v1/namespaces/{ns}/deployments/{name}", self.get_deployment),
            ]
        )
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != "/readyz":
            self.calls.append((request.method, request.path))
            assert request.match_info.get("ns", NS) == NS
        return await handler(request)

    @staticmethod
    def not_found(what: str) -> web.Response:
        body = {"kind": "Status", "apiVersion": "v1", "status": "Failure"}
        body |= {"message": f"{what} not found", "reason": "NotFound", "code": 404}
        return web.json_response(body, status=404)

    def _scale(self, name: str) -> dict[str, Any]:
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"replicas": self.replicas[name]},
            "status": {"replicas": self.replicas[name]},
        }

    async def get_scale(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.replicas:
            return self.not_found(f"statefulsets {name}")
        return web.json_response(self._scale(name))

    async def patch_scale(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        assert "merge-patch" in request.content_type, request.content_type
        wanted = int((await request.json())["spec"]["replicas"])
        now = time.monotonic()
        for i in range(wanted, self.replicas[name]):  # scale down: pods go away
            ready_at, _ = self.pods[f"{name}-{i}"]
            self.pods[f"{name}-{i}"] = (ready_at, now + self.delay_s)
        for i in range(self.replicas[name], wanted):  # scale up: pods come, ready later
            self.pods[f"{name}-{i}"] = (now + self.delay_s, None)
        self.replicas[name] = wanted
        return web.json_response(self._scale(name))

    def _pod(self, name: str, ip: str = "10.0.0.1") -> dict[str, Any] | None:
        ready_at, gone_at = self.pods.get(name, (0.0, 0.0))
        now = time.monotonic()
        if gone_at is not None and now >= gone_at:
            return None
        ready = now >= ready_at and gone_at is None
        return {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {"name": name, "namespace": NS},
            "status": {
                "phase": "Running",
                "podIP": ip,
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            },
        }

    async def get_pod(self, request: web.Request) -> web.Response:
        pod = self._pod(request.match_info["name"])
        return web.json_response(pod) if pod else self.not_found("pod")

    async def list_pods(self, request: web.Request) -> web.Response:
        selector = request.query.get("labelSelector", "")
        assert "app.kubernetes.io/component=gateway" in selector, selector
        items = []
        for name, ip in self.gateways.items():
            pod = self._pod(name, ip=ip)
            assert pod is not None
            if not self.gateways_ready:
                pod["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
            items.append(pod)
        return web.json_response(
            {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
        )

    async def get_deployment(self, request: web.Request) -> web.Response:
        if not request.match_info["name"].endswith("-gateway"):
            return self.not_found("deployments")
        return web.json_response(
            {
                "kind": "Deployment",
                "apiVersion": "apps/v1",
                "metadata": {"name": request.match_info["name"], "namespace": NS},
                "spec": {
                    "replicas": self.gateway_replicas,
                    "selector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}},
                    "template": {"metadata": {}, "spec": {"containers": []}},
                },
            }
        )

    def _configmap(self) -> dict[str, Any]:
        return {
            "kind": "ConfigMap",
            "apiVersion": "v1",
            "metadata": {
                "name": self.configmap,
                "namespace": NS,
                "resourceVersion": str(self.resource_version),
            },
            "data": self.data,
        }

    async def get_configmap(self, request: web.Request) -> web.Response:
        if request.match_info["name"] != self.configmap:
            return self.not_found("configmap")
        return web.json_response(self._configmap())

    async def put_configmap(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body["metadata"].get("resourceVersion") != str(self.resource_version):
            return web.json_response({"kind": "Status", "code": 409}, status=409)
        self.data = dict(body["data"])
        self.resource_version += 1
        return web.json_response(self._configmap())

    async def gateway_readyz(self, request: web.Request) -> web.Response:
        ip = request.transport.get_extra_info("sockname")[0] if request.transport else ""
        version = json.loads(self.data["ring.json"])["version"] - self.gateway_lag.get(ip, 0)
        return web.json_response({"ready": True, "ring_version": version})

    def ring(self) -> RingDoc:
        return RingDoc.parse(json.loads(self.data["ring.json"]))


@pytest_asyncio.fixture
async def three_nodes(redis_servers: Any, mysql_databases: Any) -> AsyncIterator[list[NodeHandle]]:
    secret = secrets.token_hex(16)
    made = []
    for i in range(3):
        made.append(
            await start_node(
                redis_servers(),
                mysql_databases(f"k8s{i}"),
                REDPACKET_NODE_NAME=f"shard-{i}",
                REDPACKET_NODE_SECRET=secret,
            )
        )
    for _, handle in made:
        handle.secret = secret
    yield [handle for _, handle in made]
    for runner, handle in made:
        await handle.session.close()
        await runner.cleanup()


async def test_kubernetes_backend_scales_statefulsets_and_rewrites_the_ring(
    three_nodes: list[NodeHandle],
) -> None:
    shard0, shard1, shard2 = three_nodes
    names = KubernetesNames(namespace=NS, release="demo")
    resolved = names.resolved()
    node_sts, redis_sts, mysql_sts = (
        resolved.node_statefulset,
        resolved.redis_statefulset,
        resolved.mysql_statefulset,
    )
    assert (node_sts, redis_sts, mysql_sts) == (
        "demo-redpacket-node",
        "demo-redpacket-redis",
        "demo-redpacket-mysql",
    )
    assert resolved.ring_configmap == "demo-redpacket-ring"
    ring = RingDoc(1, (shard0.spec(), shard1.spec()))
    fake = FakeKube({node_sts: 2, redis_sts: 2, mysql_sts: 2}, resolved.ring_configmap, ring)
    runner = web.AppRunner(fake.app())
    await runner.setup()
    port = free_ports(1)[0]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    names = KubernetesNames(namespace=NS, release="demo", gateway_port=port)
    configuration = k8s.Configuration()
    configuration.host = f"http://127.0.0.1:{port}"
    api = k8s.ApiClient(configuration)
    backend = KubernetesBackend(
        names, shard0.secret, api_client=api, ready_timeout_s=15, poll_s=0.05
    )
    rebalancer = Rebalancer(backend, progress=False, gateway_timeout_s=10, say=lambda _: None)
    try:
        # red packets on their owners, a few shares opened
        owner_ring = Ring(ring.nodes)
        by_name = {h.settings.name: h for h in three_nodes}
        packets, observed = [], []
        for _ in range(60):
            packet_id = IDS.next_id()
            owner = by_name[owner_ring.owner(snowflake_of(packet_id)).name]
            status, _ = await owner.call(
                "POST",
                "/internal/v1/packets",
                {
                    "red_packet_id": str(packet_id),
                    "uid": "3",
                    "total_amount": 500,
                    "total_packet": 5,
                    "expire_seconds": 3600,
                    "create_token": secrets.token_hex(16),
                },
            )
            assert status == 201
            for uid in (1, 2):
                status, body = await owner.open(packet_id, uid)
                assert status == 200
                observed.append(Observed(packet_id, uid, body["amount"]))
            packets.append(packet_id)

        # names are StatefulSet ordinals: shard-2 is next, shard-5 is not
        with pytest.raises(BackendError, match="the next one is shard-2"):
            await rebalancer.add("shard-5", shard2.url)
        assert fake.replicas == {node_sts: 2, redis_sts: 2, mysql_sts: 2}

        assert await rebalancer.add("shard-2", shard2.url) == 0
        assert fake.replicas == {node_sts: 3, redis_sts: 3, mysql_sts: 3}
        doc = fake.ring()
        assert doc.version == 3 and doc.previous is None
        assert [n.name for n in doc.nodes] == ["shard-0", "shard-1", "shard-2"]
        assert doc.nodes[2].url == shard2.url
        # the three StatefulSets were scaled together, stores first, then their pods waited for
        patches = [p for m, p in fake.calls if m == "PATCH"]
        assert patches == [
            f"/apis/apps/v1/namespaces/{NS}/statefulsets/{sts}/scale"
            for sts in (mysql_sts, redis_sts, node_sts)
        ]
        for sts in (mysql_sts, redis_sts, node_sts):
            assert ("GET", f"/api/v1/namespaces/{NS}/pods/{sts}-2") in fake.calls
        puts = [p for m, p in fake.calls if m == "PUT"]
        assert len(puts) == 2  # the transition ring, then the final one
        new_ring = doc.ring()
        on_shard2 = [p for p in packets if new_ring.owner(snowflake_of(p)).name == "shard-2"]
        assert on_shard2
        assert (await check_shards([shard2.spec()], settle_s=1)).packets == len(on_shard2)

        # only the last ordinal can go
        with pytest.raises(BackendError, match="only shrinks from the end"):
            await rebalancer.remove("shard-0")
        fake.calls.clear()
        assert await rebalancer.remove("shard-2") == 0
        assert fake.replicas == {node_sts: 2, redis_sts: 2, mysql_sts: 2}
        patches = [p for m, p in fake.calls if m == "PATCH"]
        assert patches[0].endswith(f"/{node_sts}/scale")  # the node stops before its stores
        doc = fake.ring()
        assert doc.version == 5 and [n.name for n in doc.nodes] == ["shard-0", "shard-1"]

        # packets made on the nodes directly, no wallet paid for them
        report = await check_shards(list(doc.nodes), observed, settle_s=5, allow_unfunded=True)
        assert report.ok, report.violations
        assert report.packets == 60 and report.records == 120
        assert (await check_shards([shard2.spec()], settle_s=1)).packets == 0
    finally:
        api.close()
        await runner.cleanup()


@pytest_asyncio.fixture
async def fake_two_gateways() -> AsyncIterator[tuple[FakeKube, KubernetesBackend]]:
    """A fake API server whose gateway Deployment wants 2 replicas, two gateway pods (at
    127.0.0.1 and 127.0.0.2, both this server), three shard StatefulSets at 3 replicas and a
    ring of shards 0 and 1 (shard-2 was removed from it)."""
    names = KubernetesNames(namespace=NS, release="demo").resolved()
    ring = RingDoc(5, tuple(NodeSpec(f"shard-{i}", f"http://n{i}:9000") for i in range(2)))
    sts = [names.node_statefulset, names.redis_statefulset, names.mysql_statefulset]
    fake = FakeKube({str(s): 3 for s in sts}, names.ring_configmap, ring)
    fake.gateways = {"gw-0": "127.0.0.1", "gw-1": "127.0.0.2"}
    fake.pods["gw-1"] = (0.0, None)
    fake.gateway_replicas = 2
    fake.delay_s = 0.05
    runner = web.AppRunner(fake.app())
    await runner.setup()
    port = free_ports(1)[0]
    for ip in fake.gateways.values():
        await web.TCPSite(runner, ip, port).start()
    configuration = k8s.Configuration()
    configuration.host = f"http://127.0.0.1:{port}"
    api = k8s.ApiClient(configuration)
    backend = KubernetesBackend(
        KubernetesNames(namespace=NS, release="demo", gateway_port=port),
        "secret",
        api_client=api,
        ready_timeout_s=10,
        poll_s=0.05,
        confirm_timeout_s=0.5,
    )
    yield fake, backend
    api.close()
    await runner.cleanup()


async def test_ring_loaded_counts_against_the_gateway_deployments_replicas(
    fake_two_gateways: tuple[FakeKube, KubernetesBackend],
) -> None:
    fake, backend = fake_two_gateways
    assert await backend.ring_loaded(5, 2)  # both Ready gateways report v5
    assert (
        "GET",
        f"/apis/apps/v1/namespaces/{NS}/deployments/demo-redpacket-gateway",
    ) in fake.calls

    fake.gateway_lag = {"127.0.0.2": 1}  # one gateway still on v4
    assert not await backend.ring_loaded(5, 0.3)

    fake.gateway_lag = {}
    fake.gateways_ready = False  # zero Ready gateways is not a confirmation
    assert not await backend.ring_loaded(5, 0.3)

    fake.gateways_ready = True
    fake.gateways = {"gw-0": "127.0.0.1"}  # one pod found, the Deployment wants two
    assert not await backend.ring_loaded(5, 0.3)

    fake.gateways = {}  # a selector that matches nothing
    assert not await backend.ring_loaded(5, 0.3)


async def test_remove_never_stops_a_shard_before_every_gateway_confirms(
    fake_two_gateways: tuple[FakeKube, KubernetesBackend],
) -> None:
    fake, backend = fake_two_gateways
    node_sts = backend.names.node_statefulset
    fake.gateway_lag = {"127.0.0.2": 1}
    with pytest.raises(BackendError, match="not every gateway confirmed ring v5"):
        await backend.stop_node("shard-2")
    assert not [p for m, p in fake.calls if m == "PATCH"]
    assert fake.replicas[node_sts] == 3

    # a shard the ring still names is never stopped, confirmed or not
    fake.gateway_lag = {}
    final = fake.data["ring.json"]
    named = RingDoc(6, tuple(NodeSpec(f"shard-{i}", f"http://n{i}:9000") for i in range(3)))
    fake.data = {"ring.json": json.dumps(named.as_dict())}
    with pytest.raises(BackendError, match="shard-2 is still in ring v6"):
        await backend.stop_node("shard-2")
    fake.data = {"ring.json": final}

    await backend.stop_node("shard-2")  # every gateway on v5: the shard goes
    assert set(fake.replicas.values()) == {2}


async def test_remove_drain_on_kubernetes_shrinks_only_from_the_highest_ordinal(
    fake_two_gateways: tuple[FakeKube, KubernetesBackend],
) -> None:
    """A StatefulSet only loses its highest pod, and a drained shard stops much later (by
    ``retire``): draining any other ordinal, removing one below a shard still draining, or
    adding one above it would leave a shard that can never stop. Each is refused before
    anything changes."""
    fake, backend = fake_two_gateways
    node_sts = backend.names.node_statefulset
    three = tuple(NodeSpec(f"shard-{i}", f"http://n{i}.invalid:9000") for i in range(3))
    fake.data = {"ring.json": json.dumps(RingDoc(5, three).as_dict())}
    rebalancer = Rebalancer(backend, progress=False, say=lambda _: None)
    for name in ("shard-0", "shard-1"):
        with pytest.raises(BackendError, match="only shrinks from the end: remove shard-2"):
            await rebalancer.remove(name, drain=True)

    # shard-2 is draining: an older version still names it, the newest does not
    since_ms = int(time.time() * 1000)
    draining = RingDoc(6, three[:2], since_ms=since_ms, older=(RingDoc(5, three).as_version(),))
    fake.data = {"ring.json": json.dumps(draining.as_dict())}
    for name, drain in (("shard-1", True), ("shard-1", False), ("shard-0", True)):
        with pytest.raises(BackendError, match="shard-2 is still draining"):
            await rebalancer.remove(name, drain=drain)
    with pytest.raises(BackendError, match="shard-2 is draining"):
        await rebalancer.add("shard-3", "http://n3.invalid:9000")
    assert fake.ring() == draining  # nothing changed
    assert not [p for m, p in fake.calls if m == "PATCH"]
    assert fake.replicas[node_sts] == 3
    await backend.check_stop("shard-2")  # the draining shard itself may stop, once drained

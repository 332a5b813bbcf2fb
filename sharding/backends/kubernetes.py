"""The ``kubernetes`` backend: the Helm chart in helm/redpacket, driven with the official client.

Shard i is pod i of three StatefulSets that are always scaled together: ``<fullname>-node``,
``<fullname>-redis`` and ``<fullname>-mysql`` (a store StatefulSet can be left out when the
stores are external). The ring is the ``ring.json`` key of ConfigMap ``<fullname>-ring``,
which every gateway mounts and re-reads when the kubelet updates it.

API calls made, and nothing else (the chart's rebalance Role grants exactly these):
``get``/``patch`` on ``statefulsets/scale``, ``get``/``list`` on ``pods``, ``get``/``update``
on the ring ``configmap``, ``get`` on the gateway ``deployment`` (how many gateways must
confirm a ring). Names are options, so another chart can be driven too.

Tested against a local fake of those endpoints only (tests/test_kubernetes_backend.py), never
against a real API server: see docs/rebalancing.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from redpacket.sharding.backends import BackendError
from redpacket.sharding.ring import NodeSpec, RingDoc

T = TypeVar("T")
SHARD_NAME = re.compile(r"^shard-(\d+)$")


@dataclass(frozen=True)
class KubernetesNames:
    """What to drive; the defaults follow the chart (``<fullname>-node`` and so on)."""

    namespace: str = "default"
    release: str = "redpacket"
    fullname: str = ""  # default: the chart's rule (release, or <release>-redpacket)
    node_statefulset: str = ""
    redis_statefulset: str | None = ""  # None: external Redis, nothing to scale
    mysql_statefulset: str | None = ""  # None: external MySQL, nothing to scale
    ring_configmap: str = ""
    ring_key: str = "ring.json"
    node_port: int = 9000
    cluster_domain: str = "cluster.local"
    gateway_selector: str = ""
    gateway_port: int = 8080
    gateway_deployment: str = ""

    def resolved(self) -> KubernetesNames:
        full = self.fullname or (
            self.release if "redpacket" in self.release else f"{self.release}-redpacket"
        )

        def store(value: str | None, suffix: str) -> str | None:
            return None if value is None else (value or f"{full}-{suffix}")

        return KubernetesNames(
            namespace=self.namespace,
            release=self.release,
            fullname=full,
            node_statefulset=self.node_statefulset or f"{full}-node",
            redis_statefulset=store(self.redis_statefulset, "redis"),
            mysql_statefulset=store(self.mysql_statefulset, "mysql"),
            ring_configmap=self.ring_configmap or f"{full}-ring",
            ring_key=self.ring_key,
            node_port=self.node_port,
            cluster_domain=self.cluster_domain,
            gateway_selector=self.gateway_selector
            or f"app.kubernetes.io/instance={self.release},app.kubernetes.io/component=gateway",
            gateway_port=self.gateway_port,
            gateway_deployment=self.gateway_deployment or f"{full}-gateway",
        )


def api_client_from_env(context: str | None = None) -> k8s.ApiClient:
    """In a pod: its service account. Elsewhere: ~/.kube/config (or KUBECONFIG)."""
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config(context=context)
    return k8s.ApiClient()


class KubernetesBackend:
    name = "kubernetes"

    def __init__(
        self,
        names: KubernetesNames,
        node_secret: str,
        *,
        api_client: k8s.ApiClient | None = None,
        ready_timeout_s: float = 600.0,
        poll_s: float = 2.0,
        confirm_timeout_s: float = 120.0,
    ) -> None:
        self.names = names.resolved()
        self.node_secret = node_secret
        self._api = api_client or api_client_from_env()
        self.apps = k8s.AppsV1Api(self._api)
        self.core = k8s.CoreV1Api(self._api)
        self.ready_timeout_s = ready_timeout_s
        self.poll_s = poll_s
        self.confirm_timeout_s = confirm_timeout_s

    async def _k8s(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """The client is synchronous: run its calls off the event loop."""
        try:
            return await asyncio.to_thread(call, *args, **kwargs)
        except ApiException as exc:
            raise BackendError(
                f"Kubernetes API: {exc.status} {exc.reason} on {call.__name__}"
            ) from None

    # -- the ring -------------------------------------------------------------------------

    async def read_ring(self) -> RingDoc:
        n = self.names
        cm = await self._k8s(self.core.read_namespaced_config_map, n.ring_configmap, n.namespace)
        data = cm.data or {}
        if n.ring_key not in data:
            raise BackendError(f"ConfigMap {n.ring_configmap} has no key {n.ring_key}")
        return RingDoc.parse(json.loads(data[n.ring_key]))

    async def publish_ring(self, doc: RingDoc) -> None:
        """Read-modify-replace: the resourceVersion makes a concurrent writer fail, not win."""
        n = self.names
        cm = await self._k8s(self.core.read_namespaced_config_map, n.ring_configmap, n.namespace)
        cm.data = {**(cm.data or {}), n.ring_key: json.dumps(doc.as_dict(), indent=2) + "\n"}
        await self._k8s(self.core.replace_namespaced_config_map, n.ring_configmap, n.namespace, cm)

    async def _gateways_wanted(self) -> int:
        """The gateway Deployment's desired replicas (the HPA writes them there); at least 1:
        with no gateway asked, nothing is confirmed."""
        n = self.names
        deployment = await self._k8s(
            self.apps.read_namespaced_deployment, n.gateway_deployment, n.namespace
        )
        return max(1, int((deployment.spec.replicas if deployment.spec else None) or 0))

    async def _gateway_versions(self, session: aiohttp.ClientSession) -> list[int | None]:
        """The ring version each Ready gateway pod reports on /readyz (None: no answer)."""
        n = self.names
        pods = await self._k8s(
            self.core.list_namespaced_pod, n.namespace, label_selector=n.gateway_selector
        )
        ips = [p.status.pod_ip for p in pods.items if _ready(p) and p.status.pod_ip]
        versions: list[int | None] = []
        for ip in ips:
            seen = None
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with session.get(f"http://{ip}:{n.gateway_port}/readyz") as resp:
                    seen = (await resp.json(content_type=None)).get("ring_version")
            versions.append(seen if isinstance(seen, int) else None)
        return versions

    async def ring_loaded(self, version: int, timeout_s: float) -> bool:
        """True once as many Ready gateway pods as the gateway Deployment wants report ring
        ``version`` or newer, and no Ready gateway reports an older one (or none).

        Counting against the Deployment matters: finding zero Ready gateways (a selector
        that matches nothing, every gateway NotReady, a NetworkPolicy in the way) must not
        confirm anything, or the fence is lifted, and a shard stopped, while gateways still
        route by the old ring."""
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
            while True:
                wanted = await self._gateways_wanted()
                versions = await self._gateway_versions(session)
                current = sum(1 for v in versions if v is not None and v >= version)
                if current >= wanted and current == len(versions):
                    return True
                if time.monotonic() > deadline:
                    return False
                await asyncio.sleep(self.poll_s)

    # -- shards ---------------------------------------------------------------------------

    def _statefulsets(self) -> list[str]:
        n = self.names
        return [s for s in (n.mysql_statefulset, n.redis_statefulset, n.node_statefulset) if s]

    def node_url(self, ordinal: int) -> str:
        n = self.names
        sts = n.node_statefulset
        return f"http://{sts}-{ordinal}.{sts}.{n.namespace}.svc.{n.cluster_domain}:{n.node_port}"

    async def _replicas(self, statefulset: str) -> int:
        scale = await self._k8s(
            self.apps.read_namespaced_stateful_set_scale, statefulset, self.names.namespace
        )
        return int(scale.spec.replicas or 0) if scale.spec else 0

    async def _scale(self, statefulset: str, replicas: int) -> None:
        await self._k8s(
            self.apps.patch_namespaced_stateful_set_scale,
            statefulset,
            self.names.namespace,
            {"spec": {"replicas": replicas}},
        )

    async def _wait_pods(self, pods: list[str], *, gone: bool) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        todo = list(pods)
        while todo:
            for pod in list(todo):
                try:
                    found = await asyncio.to_thread(
                        self.core.read_namespaced_pod, pod, self.names.namespace
                    )
                except ApiException as exc:
                    if exc.status != 404:  # 404: the pod does not exist (yet, or any more)
                        raise BackendError(f"Kubernetes API: {exc.status} {exc.reason}") from None
                    found = None
                if (found is None) if gone else (found is not None and _ready(found)):
                    todo.remove(pod)
            if not todo:
                return
            if time.monotonic() > deadline:
                state = "gone" if gone else "ready"
                raise BackendError(
                    f"pods {todo} not {state} after {self.ready_timeout_s:.0f}s: see "
                    f"`kubectl -n {self.names.namespace} describe pod {todo[0]}`"
                )
            await asyncio.sleep(self.poll_s)

    async def _draining(self) -> list[int]:
        """The ordinals of shards an older ring version still names but the newest does not
        (``remove --drain``: they stop once their last packet is refunded), highest first."""
        doc = await self.read_ring()
        newest = {n.name for n in doc.nodes}
        names = {n.name for n in doc.all_nodes()} - newest
        return sorted((int(m.group(1)) for m in map(SHARD_NAME.match, names) if m), reverse=True)

    async def start_node(self, name: str, url: str | None, weight: int) -> NodeSpec:
        ordinal = _ordinal(name)
        node_sts = self.names.node_statefulset
        replicas = await self._replicas(node_sts)
        if ordinal > replicas:
            raise BackendError(
                f"StatefulSet {node_sts} runs {replicas} shard(s): the next one is "
                f"shard-{replicas}, not {name}"
            )
        below = [d for d in await self._draining() if d < ordinal]
        if below:  # a pod above a draining one would leave it unable to ever stop
            raise BackendError(
                f"shard-{below[0]} is draining, and a StatefulSet only shrinks from its highest "
                f"pod: with {name} above it, it could never stop. Add {name} once "
                f"`redpacket rebalance retire` has stopped shard-{below[0]} (or after "
                f"`redpacket rebalance remove --move --node shard-{below[0]}`)"
            )
        for sts in self._statefulsets():  # the stores first, then the node: all together
            if await self._replicas(sts) < ordinal + 1:
                await self._scale(sts, ordinal + 1)
        await self._wait_pods([f"{sts}-{ordinal}" for sts in self._statefulsets()], gone=False)
        return NodeSpec(name, (url or self.node_url(ordinal)).rstrip("/"), weight)

    async def check_stop(self, name: str) -> None:
        """Only the highest pod can go, and none while one above it is still draining (a
        drained shard stops later, by ``retire``: it must still be the highest then)."""
        ordinal = _ordinal(name)
        above = [d for d in await self._draining() if d > ordinal]
        if above:
            raise BackendError(
                f"shard-{above[0]} is still draining (it stops once its last red packet has "
                "expired and been refunded: `redpacket rebalance retire`), and a StatefulSet "
                f"only shrinks from its highest pod: remove {name} after that (or after "
                f"`redpacket rebalance remove --move --node shard-{above[0]}`)"
            )
        replicas = await self._replicas(self.names.node_statefulset)
        if ordinal < replicas - 1:
            raise BackendError(
                f"a StatefulSet only shrinks from the end: remove shard-{replicas - 1} first "
                f"({name} is pod {ordinal} of {replicas})"
            )

    async def stop_node(self, name: str) -> None:
        """Scale the shard away, but only once every gateway routes by a ring without it:
        a gateway still on an older ring would send its requests to a stopped shard."""
        await self.check_stop(name)
        ring = await self.read_ring()
        if ring.node(name) is not None or (
            ring.previous is not None and ring.previous.node(name) is not None
        ):
            raise BackendError(f"{name} is still in ring v{ring.version}: not stopping it")
        if not await self.ring_loaded(ring.version, self.confirm_timeout_s):
            raise BackendError(
                f"not every gateway confirmed ring v{ring.version} (the gateway Deployment "
                f"{self.names.gateway_deployment}'s replicas, each Ready and reporting it on "
                f"/readyz) within {self.confirm_timeout_s:.0f}s: not stopping {name}; check the "
                "gateways and run the command again"
            )
        ordinal = _ordinal(name)
        node_sts = self.names.node_statefulset
        replicas = await self._replicas(node_sts)
        # the node first (it finishes its commits), then its stores
        if replicas > ordinal:
            await self._scale(node_sts, ordinal)
        await self._wait_pods([f"{node_sts}-{ordinal}"], gone=True)
        stores = [s for s in self._statefulsets() if s != node_sts]
        for sts in stores:
            if await self._replicas(sts) > ordinal:
                await self._scale(sts, ordinal)
        await self._wait_pods([f"{sts}-{ordinal}" for sts in stores], gone=True)

    async def running_shards(self) -> int:
        """How many shards run: the most replicas of the shard StatefulSets (a half-finished
        scale counts its highest pods, which hold or await packets)."""
        counts = [await self._replicas(sts) for sts in self._statefulsets()]
        return max(counts, default=0)

    async def running_node(self, name: str) -> NodeSpec | None:
        ordinal = _ordinal(name)
        if await self._replicas(self.names.node_statefulset) > ordinal:
            return NodeSpec(name, self.node_url(ordinal))
        return None

    @contextlib.asynccontextmanager
    async def lock(self) -> AsyncIterator[None]:
        """No cluster-wide lock: run one rebalance Job at a time (docs/rebalancing.md)."""
        yield


def _ordinal(name: str) -> int:
    match = SHARD_NAME.match(name)
    if match is None:
        raise BackendError(
            f"on Kubernetes shard i is pod i of the StatefulSets and is named shard-<i>: {name!r}"
        )
    return int(match.group(1))


def _ready(pod: Any) -> bool:
    conditions = (pod.status.conditions if pod.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)

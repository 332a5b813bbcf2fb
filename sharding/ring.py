"""The consistent-hash ring: which shard node owns a red packet.

The ring is described by a ring document (JSON or YAML), the one place that lists the
shards. Hashing is ketama (uhashring), so adding a shard moves only about 1/(N+1) of the
packets, and any ketama client in another language agrees with this one.

Ring document::

    version: 3                      # bumps with every change
    nodes:
      - name: shard-0               # stable name: the hash input, never the URL
        url: http://10.0.0.5:9000   # where the gateway reaches the node
        weight: 1                   # relative share of the packets
        redis: redis://...          # optional: the node's stores, for tools like `check`
        mysql: mysql://.../redpacket_shard_0
    since_ms: 1767312000000         # optional: unix ms from which this version places new
                                    # packets (0 or absent: every packet)
    older:                          # optional: older versions still serving live packets,
      - {version: 2, since_ms: 0, nodes: [...]}   # newest first
    previous: {version: 2, nodes: [...]}   # only while a rebalance is in progress
    note: add shard-2               # optional: what the change in progress is

**Ring versions.** A packet is served by the version that placed it: the newest one whose
``since_ms`` is not after the millisecond in the packet's id (core/ids.py), so routing needs
no lookup and old packets never move when capacity is added (``rebalance add --no-move``).
Consistent hashing decides among the nodes of that one version. Users' own data (keys,
history) always follows the newest version. :func:`packet_owner` is the one place that rule
lives; gateways, nodes and tools all call it.

While ``previous`` is there, gateways route by it (every packet is on its previous owner,
or that node knows where it went) and ``nodes`` is the ring being moved to; see
docs/rebalancing.md.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from uhashring import HashRing

from redpacket.core.ids import IdGenerator


class RingError(ValueError):
    """The ring document is malformed."""


@dataclass(frozen=True)
class NodeSpec:
    name: str
    url: str
    weight: int = 1
    redis: str | None = None
    mysql: str | None = None
    redis_cluster: bool = False
    metrics: str | None = None  # base URL of its /metrics (its own port, not ``url``'s)

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "url": self.url, "weight": self.weight}
        if self.redis:
            data["redis"] = self.redis
        if self.mysql:
            data["mysql"] = self.mysql
        if self.redis_cluster:
            data["redis_cluster"] = True
        if self.metrics:
            data["metrics"] = self.metrics
        return data


def user_key(uid: int) -> str:
    """Ring key of a user's own data (idempotency keys; later, their sent/received history)."""
    return f"user:{uid}"


class Ring:
    """The ring of one node list."""

    def __init__(self, nodes: Sequence[NodeSpec]) -> None:
        if not nodes:
            raise RingError("a ring needs at least one node")
        names = [n.name for n in nodes]
        if len(set(names)) != len(names):
            raise RingError(f"node names must be unique: {names}")
        self.nodes: dict[str, NodeSpec] = {n.name: n for n in nodes}
        self._hash = HashRing(nodes={n.name: {"weight": n.weight} for n in nodes}, hash_fn="ketama")

    def owner_of_key(self, key: str) -> NodeSpec:
        return self.nodes[self._hash.get_node(key)]

    def owner(self, packet_id: int) -> NodeSpec:
        return self.owner_of_key(str(packet_id))


@dataclass(frozen=True)
class RingDoc:
    version: int
    nodes: tuple[NodeSpec, ...]
    previous: RingDoc | None = field(default=None)
    note: str = ""  # what the change in progress is, e.g. "add shard-2" (informational)
    since_ms: int = 0  # unix ms from which this version places new packets
    older: tuple[RingDoc, ...] = ()  # older versions still serving live packets, newest first

    def ring(self) -> Ring:
        """The hash ring of these nodes, built once per document: building one hashes 160
        points per node, far too slow for the per-call owner lookups that use it."""
        ring: Ring | None = self.__dict__.get("_ring")
        if ring is None:
            ring = Ring(self.nodes)
            object.__setattr__(self, "_ring", ring)  # a cache, not a field: eq/replace ignore it
        return ring

    def versions(self) -> tuple[RingDoc, ...]:
        """This version and the older ones still serving packets, newest first."""
        return (self, *self.older)

    def as_version(self) -> RingDoc:
        """This ring as one entry of ``older``: its nodes and ``since_ms`` alone."""
        return RingDoc(self.version, self.nodes, since_ms=self.since_ms)

    def settled(self) -> RingDoc:
        """The ring with its versions but without a change in progress (the fence's ring)."""
        return RingDoc(self.version, self.nodes, since_ms=self.since_ms, older=self.older)

    def all_nodes(self) -> list[NodeSpec]:
        """Every node a packet or user may be on: of every version, and of the previous ring
        during a change (newest first, each name once)."""
        found: dict[str, NodeSpec] = {}
        docs = [*self.versions()]
        if self.previous is not None:
            docs += self.previous.versions()
        for doc in docs:
            for spec in doc.nodes:
                found.setdefault(spec.name, spec)
        return list(found.values())

    def node(self, name: str) -> NodeSpec | None:
        """A node by name, in any version of this ring or of the previous one (a handoff or
        a draining shard may point at either)."""
        for spec in self.all_nodes():
            if spec.name == name:
                return spec
        return None

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "version": self.version,
            "nodes": [n.as_dict() for n in self.nodes],
        }
        if self.since_ms:
            data["since_ms"] = self.since_ms
        if self.older:
            data["older"] = [v.as_dict() for v in self.older]
        if self.previous is not None:
            data["previous"] = self.previous.as_dict()
        if self.note:
            data["note"] = self.note
        return data

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> RingDoc:
        if not isinstance(data, Mapping):
            raise RingError("a ring document is a mapping with version and nodes")
        version = data.get("version")
        if not isinstance(version, int) or version < 0:
            raise RingError("ring version must be a non-negative integer")
        raw_nodes = data.get("nodes")
        if not isinstance(raw_nodes, list) or not raw_nodes:
            raise RingError("ring nodes must be a non-empty list")
        nodes = []
        for raw in raw_nodes:
            if not isinstance(raw, Mapping) or not raw.get("name") or not raw.get("url"):
                raise RingError(f"every ring node needs a name and a url: {raw!r}")
            weight = raw.get("weight", 1)
            if not isinstance(weight, int) or weight < 1:
                raise RingError(f"node {raw['name']}: weight must be a positive integer")
            nodes.append(
                NodeSpec(
                    name=str(raw["name"]),
                    url=str(raw["url"]).rstrip("/"),
                    weight=weight,
                    redis=raw.get("redis"),
                    mysql=raw.get("mysql"),
                    redis_cluster=bool(raw.get("redis_cluster", False)),
                    metrics=raw.get("metrics"),
                )
            )
        previous = data.get("previous")
        note = data.get("note", "")
        since_ms = data.get("since_ms", 0)
        if not isinstance(since_ms, int) or since_ms < 0:
            raise RingError("since_ms must be a non-negative integer (unix milliseconds)")
        raw_older = data.get("older", [])
        if not isinstance(raw_older, list):
            raise RingError("older must be a list of ring versions")
        older = tuple(cls.parse(v).as_version() for v in raw_older)
        times = [since_ms, *(v.since_ms for v in older)]
        if any(a <= b for a, b in itertools.pairwise(times)):
            raise RingError("ring versions must be newest first, each with an earlier since_ms")
        doc = cls(
            version,
            tuple(nodes),
            cls.parse(previous) if previous else None,
            note if isinstance(note, str) else "",
            since_ms,
            older,
        )
        doc.ring()  # validates names
        return doc

    @classmethod
    def load(cls, path: str | Path) -> RingDoc:
        text = Path(path).read_text("utf-8")
        try:
            data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise RingError(f"{path}: {exc}") from None
        return cls.parse(data)

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file + rename) so a reader never sees half a ring."""
        target = Path(path)
        tmp = target.with_name(f".{target.name}.tmp")
        body = (
            json.dumps(self.as_dict(), indent=2)
            if target.suffix == ".json"
            else yaml.safe_dump(self.as_dict(), sort_keys=False)
        )
        tmp.write_text(body + "\n", "utf-8")
        with contextlib.suppress(FileNotFoundError):  # a ring may hold store passwords:
            tmp.chmod(target.stat().st_mode & 0o777)  # a new version keeps the old one's mode
        tmp.replace(target)


# -- routing: the one rule, used by gateways, nodes and tools ---------------------------------


def placing_version(doc: RingDoc, packet_id: int) -> RingDoc:
    """The version of ``doc`` that placed a packet: the newest whose ``since_ms`` is not after
    the millisecond in the packet's id (ids older than every version: the oldest)."""
    created_ms = IdGenerator.timestamp_ms(packet_id)
    versions = doc.versions()
    for version in versions:
        if version.since_ms <= created_ms:
            return version
    return versions[-1]


def packet_owner(doc: RingDoc, packet_id: int) -> NodeSpec:
    """Where a packet lives once ``doc`` is settled: its placing version's hash owner."""
    return placing_version(doc, packet_id).ring().owner(packet_id)


def routing_doc(doc: RingDoc) -> RingDoc:
    """The ring calls are routed by: the previous one while a change is in progress (every
    packet and user is there, or that node knows where it went)."""
    return doc.previous if doc.previous is not None else doc


def route_packet(doc: RingDoc, packet_id: int) -> NodeSpec:
    """The node a gateway (or a tool) calls first for a packet."""
    return packet_owner(routing_doc(doc), packet_id)


def route_user(doc: RingDoc, uid: int) -> NodeSpec:
    """The node a gateway (or a node's relay) calls first for a user's own data: users follow
    the newest version of the routing ring."""
    return routing_doc(doc).ring().owner_of_key(user_key(uid))

"""The Helm chart, checked with a real helm binary and the Kubernetes JSON schemas.

No cluster runs here: the chart is linted, rendered with ``helm template`` (default values,
1, 3 and 8 shards, external stores, every option switched), and each rendered manifest is
validated against the Kubernetes API schemas shipped by ``kubernetes-validate``. Then the
rendered objects are checked for what matters when it runs: pod i of the node, Redis and
MySQL StatefulSets form shard i, the ring lists exactly those shards, the gateway and node
settings load from the env the kubelet would give them (through the project's own settings
classes), every long-running container has probes and resources, nothing runs as root, the
NetworkPolicies and the rebalance RBAC are as narrow as intended.

What cannot be checked without a cluster: ``lookup`` (kept secrets, kept ring, the guard
against scaling below the running shards) renders as on a first install here.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from redpacket.cli.main import build_parser
from redpacket.gateway.settings import GatewaySettings
from redpacket.node.ledger import parse_mysql_url
from redpacket.node.settings import NodeSettings
from redpacket.sharding.ring import RingDoc
from tests.helm_tool import REPO, helm_binary

CHART = REPO / "helm" / "redpacket"
RELEASE = "rp"
NAMESPACE = "shop"
DOMAIN = "cluster.local"
# Kubernetes versions whose API schemas the manifests must satisfy (strict: no unknown
# fields): the oldest the chart declares (Chart.yaml kubeVersion) and a current one.
K8S_VERSIONS = ("1.25", "1.33")
APP_UID = 10001  # USER of docker/Dockerfile
STORE_UID = 999  # user redis / mysql of the official images
# helm keeps its cache, config and data here instead of the user's home
HELM_HOMES = {
    f"HELM_{kind}_HOME": str(REPO / ".cache" / "helm" / kind.lower())
    for kind in ("CACHE", "CONFIG", "DATA")
}


def sets(*pairs: str) -> tuple[str, ...]:
    return tuple(arg for pair in pairs for arg in ("--set", pair))


def sets_json(*pairs: str) -> tuple[str, ...]:
    return tuple(arg for pair in pairs for arg in ("--set-json", pair))


EXTERNAL_REDIS = sets(
    "redis.enabled=false",
    "externalStores.redisUrls={redis://:pw@cache-a:6379/0,redis://:pw@cache-b:6379/0}",
)
EXTERNAL = EXTERNAL_REDIS + sets(
    "mysql.enabled=false",
    "externalStores.mysqlUrls={mysql://rp:pw@db-a:3306/rp,mysql://rp:pw@db-b:3306/rp}",
)
EVERYTHING_SWITCHED = sets(
    "shards=3",
    "gateway.autoscaling.enabled=false",
    "gateway.replicas=3",
    "gateway.podDisruptionBudget.minAvailable=50%",
    "gateway.service.type=LoadBalancer",
    "redis.auth.enabled=false",
    "redis.maxmemory=512mb",
    "redis.persistence.enabled=false",
    "mysql.persistence.storageClass=fast",
    "storageClass.create=true",
    "storageClass.provisioner=ebs.csi.aws.com",
    "backup.persistence.existingClaim=backups",
    "metrics.podAnnotations=false",
    "dashboard.enabled=false",
    "secrets.jwtSecret=0123456789abcdef0123456789abcdef",
) + sets_json(
    'gateway.extraEnv=[{"name":"REDPACKET_ACCESS_LOG","value":"true"}]',
    'gateway.topologySpreadConstraints=[{"maxSkew":1,'
    '"topologyKey":"topology.kubernetes.io/zone","whenUnsatisfiable":"ScheduleAnyway"}]',
    'networkPolicy.nodeExtraIngressFrom=[{"namespaceSelector":'
    '{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]',
    'imagePullSecrets=[{"name":"regcred"}]',
)
MONITORING = sets(
    "metrics.serviceMonitor.enabled=true",
    "metrics.prometheusRule.enabled=true",
    "metrics.exporters.redis.enabled=true",
    "metrics.exporters.mysql.enabled=true",
) + sets_json(
    'networkPolicy.metricsIngressFrom=[{"namespaceSelector":'
    '{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]',
)
CASES: dict[str, tuple[str, ...]] = {
    "default": (),
    "shards=1": sets("shards=1"),
    "shards=3": sets("shards=3"),
    "shards=8": sets("shards=8"),
    "external-stores": EXTERNAL,
    "external-redis-only": EXTERNAL_REDIS,
    "everything-switched": EVERYTHING_SWITCHED,
    "monitoring": MONITORING,
}
# kinds of the Prometheus Operator's CRDs: no schema in kubernetes-validate (checked by hand)
OPERATOR_API = "monitoring.coreos.com/v1"


# -- helpers ----------------------------------------------------------------------------------


@functools.cache
def helm() -> str:
    return helm_binary()


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **HELM_HOMES},
    )


@functools.cache
def render(case: str, kube_version: str = "") -> tuple[dict[str, Any], ...]:
    """Rendered as for a cluster of ``kube_version`` (default: helm's own, a current one)."""
    version = ("--kube-version", kube_version) if kube_version else ()
    proc = run_helm(
        "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *version, *CASES[case]
    )
    assert proc.returncode == 0, f"helm template ({case}) failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def expected_shards(case: str) -> int:
    args = CASES[case]
    for i, arg in enumerate(args):
        if arg == "--set" and args[i + 1].startswith("shards="):
            return int(args[i + 1].split("=", 1)[1])
    return yaml.safe_load((CHART / "values.yaml").read_text())["shards"]


def of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: tuple[dict[str, Any], ...], kind: str, component: str) -> dict[str, Any]:
    found = [
        d
        for d in of_kind(docs, kind)
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == component
        and "redpacket.io/metrics" not in d["metadata"]["labels"]  # the scrape-only Services
    ]
    assert len(found) == 1, f"expected one {kind} of component {component}, got {len(found)}"
    return found[0]


def statefulsets(docs: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    """StatefulSets by component (node, redis, mysql)."""
    return {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in of_kind(docs, "StatefulSet")
    }


def workloads(docs: tuple[dict[str, Any], ...]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(object, pod spec) of everything that runs containers."""
    found = []
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            found.append((doc, doc["spec"]["template"]["spec"]))
        elif doc["kind"] == "CronJob":
            found.append((doc, doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
        elif doc["kind"] == "Pod":
            found.append((doc, doc["spec"]))
    return found


def secret_data(docs: tuple[dict[str, Any], ...]) -> dict[str, dict[str, str]]:
    return {
        d["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in d["data"].items()}
        for d in of_kind(docs, "Secret")
    }


def kubelet_env(
    container: dict[str, Any],
    secrets: dict[str, dict[str, str]],
    pod_labels: dict[str, str],
    hostname: str,
) -> dict[str, str]:
    """The environment the kubelet gives a container: values with $(VAR) expanded in order,
    secretKeyRef and label fieldRef resolved (a missing label is an empty string)."""
    env = {"HOSTNAME": hostname}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), var["value"]
            )
        elif "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            if ref.get("optional") and ref["key"] not in secrets.get(ref["name"], {}):
                continue  # the kubelet leaves an optional missing key out
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            label = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
            assert label, f"unexpected fieldRef {path}"
            env[var["name"]] = pod_labels.get(label[1], "")
    return env


def pod_labels(sts: dict[str, Any], ordinal: int, with_index: bool = True) -> dict[str, str]:
    labels = dict(sts["spec"]["template"]["metadata"]["labels"])
    labels["statefulset.kubernetes.io/pod-name"] = f"{sts['metadata']['name']}-{ordinal}"
    if with_index:  # set by Kubernetes >= 1.28
        labels["apps.kubernetes.io/pod-index"] = str(ordinal)
    return labels


def secret_files(workload: dict[str, Any], container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Files a container sees from Secret volumes: path -> (Secret name, key)."""
    pod = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    found = {}
    for mount in container.get("volumeMounts", []):
        secret = volumes.get(mount["name"], {}).get("secret")  # claims are not volumes
        if secret is None:
            continue
        for item in secret.get("items", []):
            found[f"{mount['mountPath']}/{item['path']}"] = (secret["secretName"], item["key"])
    return found


def pod_dns(sts: dict[str, Any], ordinal: int) -> str:
    return (
        f"{sts['metadata']['name']}-{ordinal}.{sts['spec']['serviceName']}.{NAMESPACE}.svc.{DOMAIN}"
    )


def container_port(container: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def command_of(container: dict[str, Any]) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def assert_real_cli(argv: list[str]) -> None:
    """argv runs `redpacket <subcommand>` that exists in the real CLI."""
    assert argv[0] == "redpacket", argv
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{shlex.join(argv)} is not a command of the real redpacket CLI")


# -- helm itself ----------------------------------------------------------------------------


def test_helm_binary_runs() -> None:
    proc = run_helm("version", "--short")
    assert proc.returncode == 0, proc.stderr
    assert re.match(r"v[34]\.", proc.stdout), proc.stdout


@pytest.mark.parametrize("case", ["default", "shards=8", "external-stores", "everything-switched"])
def test_lint(case: str) -> None:
    proc = run_helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *CASES[case])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


# -- every rendering ------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_manifests_validate_against_kubernetes_schemas(case: str, version: str) -> None:
    docs = render(case, version)
    assert docs
    for doc in docs:
        if doc["apiVersion"] == OPERATOR_API:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(
                f"{doc['kind']}/{doc['metadata']['name']} ({case}) is not valid "
                f"Kubernetes {version}: {where}: {exc.message}"
            )


@pytest.mark.parametrize("case", CASES)
def test_standard_labels_and_namespace(case: str) -> None:
    for doc in render(case):
        if doc["kind"] in ("StorageClass",):  # cluster-scoped
            continue
        labels = doc["metadata"]["labels"]
        for key in (
            "helm.sh/chart",
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
        ):
            assert key in labels, f"{doc['kind']}/{doc['metadata']['name']} lacks label {key}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert doc["metadata"]["namespace"] == NAMESPACE


@pytest.mark.parametrize("case", CASES)
def test_shard_count_equals_statefulset_replicas(case: str) -> None:
    shards = expected_shards(case)
    sets = statefulsets(render(case))
    stores = {"node"} | {s for s in ("redis", "mysql") if f"{s}.enabled=false" not in CASES[case]}
    assert set(sets) == stores
    for component, sts in sets.items():
        assert sts["spec"]["replicas"] == shards, component
        # shards are independent: all pods start at once, not one after the other
        assert sts["spec"]["podManagementPolicy"] == "Parallel"


@pytest.mark.parametrize("case", CASES)
def test_each_statefulset_has_its_headless_service(case: str) -> None:
    docs = render(case)
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    for component, sts in statefulsets(docs).items():
        svc = services[sts["spec"]["serviceName"]]
        assert svc["spec"]["clusterIP"] == "None", component
        assert selects(svc["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"])
        container = sts["spec"]["template"]["spec"]["containers"][0]
        names = {p["name"] for p in container["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= names


@pytest.mark.parametrize("case", CASES)
def test_ring_lists_exactly_the_shards(case: str) -> None:
    docs = render(case)
    shards = expected_shards(case)
    ring_cm = one(docs, "ConfigMap", "ring")
    ring = RingDoc.parse(json.loads(ring_cm["data"]["ring.json"]))  # the gateway's own parser
    node_sts = statefulsets(docs)["node"]
    port = container_port(node_sts["spec"]["template"]["spec"]["containers"][0], "http")
    assert [n.name for n in ring.nodes] == [f"shard-{i}" for i in range(shards)]
    assert [n.url for n in ring.nodes] == [
        f"http://{pod_dns(node_sts, i)}:{port}" for i in range(shards)
    ]
    assert ring.version >= 1
    ring.ring()  # builds the hash ring


def assert_reads_the_ring(
    docs: list[dict[str, Any]], pod: dict[str, Any], container: dict[str, Any], ring_file: str
) -> None:
    """The ring file is a key of the ring ConfigMap, mounted as a directory (no subPath) so
    the kubelet's updates (``redpacket rebalance``) reach the running process."""
    ring_cm = one(docs, "ConfigMap", "ring")
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = [
        m
        for m in container["volumeMounts"]
        if volumes[m["name"]].get("configMap", {}).get("name") == ring_cm["metadata"]["name"]
    ]
    assert mounts, f"{container['name']} does not mount the ring ConfigMap"
    (mount,) = mounts
    assert "subPath" not in mount
    assert mount.get("readOnly") is True
    ring_path = Path(ring_file)
    assert ring_path.parent == Path(mount["mountPath"])
    assert ring_path.name in ring_cm["data"]


@pytest.mark.parametrize("case", CASES)
def test_gateway_settings_load_from_its_pod(case: str) -> None:
    docs = render(case)
    deployment = one(docs, "Deployment", "gateway")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert_real_cli(command_of(container))
    env = kubelet_env(container, secret_data(docs), {}, "gateway-abc")
    settings = GatewaySettings.from_env(env)  # raises on a missing or short secret
    assert settings.host == "0.0.0.0"
    assert settings.port == container_port(container, "http")
    assert_reads_the_ring(docs, pod, container, settings.ring_file)
    # the node secret is the one the nodes check
    node_env = kubelet_env(
        statefulsets(docs)["node"]["spec"]["template"]["spec"]["containers"][0],
        secret_data(docs),
        {},
        "x-0",
    )
    assert settings.node_secret == node_env["REDPACKET_NODE_SECRET"]


def test_gateway_starts_with_the_charts_env(tmp_path: Path) -> None:
    """The real `redpacket gateway` process, started with the container's command and env
    (only the address, port and ring file's folder moved to this machine): it serves /healthz,
    loads the ring and, with no shard reachable here, is still ready on its readiness probe's
    path (listing the shards as down), while /readyz/shards answers 503."""
    docs = render("default")
    deployment = one(docs, "Deployment", "gateway")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ring_cm = one(docs, "ConfigMap", "ring")
    env = kubelet_env(container, secret_data(docs), {}, "gateway-abc")
    ring_file = tmp_path / Path(env["REDPACKET_RING_FILE"]).name
    ring_file.write_text(ring_cm["data"][ring_file.name])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env.update(
        REDPACKET_RING_FILE=str(ring_file),
        REDPACKET_HOST="127.0.0.1",
        REDPACKET_PORT=str(port),
        REDPACKET_METRICS_PORT=str(free_port()),  # read once /metrics has its own port
        REDPACKET_NODE_TIMEOUT_S="0.5",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    proc = subprocess.Popen(
        command_of(container), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None, f"the gateway exited: {proc.communicate()[1]}"
                assert time.monotonic() < deadline, "the gateway did not serve /healthz"
                time.sleep(0.1)
        ring = RingDoc.parse(json.loads(ring_cm["data"]["ring.json"]))
        # the readiness probe's path: this gateway can serve, whatever the shards' state
        probe = container["readinessProbe"]["httpGet"]
        assert container_port(container, probe["port"]) == container_port(container, "http")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{probe['path']}", timeout=10) as r:
            assert r.status == 200
            assert json.loads(r.read())["shards"] == {n.name: "down" for n in ring.nodes}
        # the all-shards signal says which are down
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz/shards", timeout=10)
        assert answer.value.code == 503
        body = json.loads(answer.value.read())
        assert body["error"]["shards"] == {n.name: "down" for n in ring.nodes}
    finally:
        proc.terminate()
        proc.wait(timeout=15)


@pytest.mark.parametrize("case", CASES)
def test_node_pods_read_the_ring_the_gateway_reads(case: str) -> None:
    """Nodes keep the history of the users the ring gives them and deliver their outbox by it
    (node/relay.py): every node pod reads the same ring file as the gateway, from the same
    ConfigMap, and finds itself in it."""
    docs = render(case)
    node_set = statefulsets(docs)["node"]
    pod = node_set["spec"]["template"]["spec"]
    (node,) = pod["containers"]
    gateway = one(docs, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    ring_cm = one(docs, "ConfigMap", "ring")
    ring = RingDoc.parse(json.loads(ring_cm["data"]["ring.json"]))
    gateway_env = kubelet_env(gateway, secret_data(docs), {}, "gateway-abc")
    for i in range(expected_shards(case)):
        hostname = f"{node_set['metadata']['name']}-{i}"
        env = kubelet_env(node, secret_data(docs), pod_labels(node_set, i, True), hostname)
        settings = NodeSettings.from_env(env)
        assert settings.ring_file, "the node pod has no REDPACKET_RING_FILE"
        assert settings.ring_file == gateway_env["REDPACKET_RING_FILE"]
        assert_reads_the_ring(docs, pod, node, settings.ring_file)
        assert ring.node(settings.name) is not None


@pytest.mark.parametrize("with_pod_index", [True, False], ids=["pod-index-label", "hostname"])
@pytest.mark.parametrize("case", ["default", "shards=3", "everything-switched"])
def test_node_pod_i_uses_redis_i_and_mysql_i(case: str, with_pod_index: bool) -> None:
    docs = render(case)
    sets = statefulsets(docs)
    secrets = secret_data(docs)
    ring = RingDoc.parse(json.loads(one(docs, "ConfigMap", "ring")["data"]["ring.json"]))
    (node,) = sets["node"]["spec"]["template"]["spec"]["containers"]
    assert_real_cli(command_of(node))
    redis = sets["redis"]["spec"]["template"]["spec"]["containers"][0]
    mysql = sets["mysql"]["spec"]["template"]["spec"]["containers"][0]
    for i in range(expected_shards(case)):
        hostname = f"{sets['node']['metadata']['name']}-{i}"
        env = kubelet_env(node, secrets, pod_labels(sets["node"], i, with_pod_index), hostname)
        settings = NodeSettings.from_env(env)  # the node's own parsing, {ordinal} included
        assert settings.name == ring.nodes[i].name
        assert settings.port == container_port(node, "http")
        redis_url = urlsplit(settings.redis_url)
        assert (redis_url.hostname, redis_url.port) == (
            pod_dns(sets["redis"], i),
            container_port(redis, "redis"),
        )
        # no password in the URLs: the node reads the files of the same Secret keys the
        # stores read theirs from
        assert not redis_url.password
        node_files = secret_files(sets["node"], node)
        if any("--include" in part for part in redis["command"]):  # auth on
            assert (
                node_files[env["REDPACKET_REDIS_PASSWORD_FILE"]]
                == secret_files(sets["redis"], redis)["/etc/redpacket/secrets/redis-password"]
            )
        else:
            assert "REDPACKET_REDIS_PASSWORD_FILE" not in env
        target = parse_mysql_url(settings.mysql_url)
        mysql_env = kubelet_env(mysql, secrets, {}, "m")
        assert (target.host, target.port) == (
            pod_dns(sets["mysql"], i),
            container_port(mysql, "mysql"),
        )
        assert (target.user, target.password, target.database) == (
            mysql_env["MYSQL_USER"],
            "",
            mysql_env["MYSQL_DATABASE"],
        )
        mysql_files = secret_files(sets["mysql"], mysql)
        assert (
            node_files[env["REDPACKET_MYSQL_PASSWORD_FILE"]]
            == (mysql_files[mysql_env["MYSQL_PASSWORD_FILE"]])
        )
        assert not settings.redis_cluster


@pytest.mark.parametrize("with_pod_index", [True, False], ids=["pod-index-label", "hostname"])
def test_external_stores_pick_the_shards_url(tmp_path: Path, with_pod_index: bool) -> None:
    """The node's start script with external stores, run by a real shell: it must pick the
    Secret files of its own ordinal. Only the mount path is redirected to a temp folder and
    the final `exec redpacket node` replaced by `env`, to read what the node would get."""
    docs = render("external-stores")
    sts = statefulsets(docs)["node"]
    pod = sts["spec"]["template"]["spec"]
    (node,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in node["volumeMounts"] if "secret" in volumes[m["name"]])
    secret_name = volumes[mount["name"]]["secret"]["secretName"]
    files = secret_data(docs)[secret_name]
    for key, value in files.items():
        (tmp_path / key).write_text(value)
    assert node["command"] == ["/bin/sh", "-c"]
    (script,) = node["args"]
    assert script.rstrip().endswith("exec redpacket node")
    assert_real_cli(["redpacket", "node"])
    script = script.replace(mount["mountPath"], str(tmp_path)).replace(
        "exec redpacket node", "exec env"
    )
    for i in range(expected_shards("external-stores")):
        hostname = f"{sts['metadata']['name']}-{i}"
        env = kubelet_env(node, secret_data(docs), pod_labels(sts, i, with_pod_index), hostname)
        proc = subprocess.run(
            ["/bin/sh", "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        final = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
        settings = NodeSettings.from_env(final)
        assert settings.name == f"shard-{i}"
        assert settings.redis_url == files[f"redis-url-{i}"]
        assert settings.mysql_url == files[f"mysql-url-{i}"]
        # the migrate init container picks the same database, the same way
        (init,) = pod["initContainers"]
        assert init["command"] == ["/bin/sh", "-c"]
        (init_script,) = init["args"]
        assert init_script.rstrip().endswith("exec redpacket db migrate --wait-s 300")
        init_script = init_script.replace(mount["mountPath"], str(tmp_path)).replace(
            "exec redpacket db migrate --wait-s 300", "exec env"
        )
        init_env = kubelet_env(init, {}, pod_labels(sts, i, with_pod_index), hostname)
        proc = subprocess.run(
            ["/bin/sh", "-c", init_script],
            env=init_env,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        migrated = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
        assert migrated["REDPACKET_MYSQL_URL"] == files[f"mysql-url-{i}"]


def test_external_stores_need_one_url_per_shard() -> None:
    proc = run_helm("template", RELEASE, str(CHART), "--set", "shards=3", *EXTERNAL)
    assert proc.returncode != 0
    assert "needs one URL per shard (3), got 2" in proc.stderr


@pytest.mark.parametrize("case", CASES)
def test_every_container_has_probes_and_resources(case: str) -> None:
    """Long-running containers need liveness and readiness probes. Exempt: the `helm test`
    hook pod, Jobs and CronJobs, which run once to completion (a probe would have nothing to
    keep alive and no Service to gate). Every container, exempt or not, declares CPU and
    memory requests and limits."""
    for doc, pod in workloads(render(case)):
        hook_pod = doc["kind"] == "Pod" and "helm.sh/hook" in doc["metadata"].get("annotations", {})
        one_shot = hook_pod or doc["kind"] in ("Job", "CronJob")
        init = [c["name"] for c in pod.get("initContainers", [])]
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            where = f"{doc['kind']}/{doc['metadata']['name']}/{container['name']} ({case})"
            if not one_shot and container["name"] not in init:  # init containers run once
                assert container.get("livenessProbe"), f"{where}: no liveness probe"
                assert container.get("readinessProbe"), f"{where}: no readiness probe"
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resources.get(kind, {}).get(resource), f"{where}: no {kind}.{resource}"


@pytest.mark.parametrize("case", CASES)
def test_no_container_runs_as_root(case: str) -> None:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert re.findall(r"^USER\s+(\S+)", dockerfile, re.M)[-1].split(":")[0] == str(APP_UID)
    for doc, pod in workloads(render(case)):
        pod_sc = pod.get("securityContext", {})
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            where = f"{doc['kind']}/{doc['metadata']['name']}/{container['name']}"
            sc = {**pod_sc, **container.get("securityContext", {})}
            assert sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot is not true"
            assert sc.get("runAsUser", 0) != 0, f"{where}: runs as uid 0"
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), where
            image = container["image"].split("/")[-1]
            component = doc["metadata"]["labels"]["app.kubernetes.io/component"]
            store_pod = component in ("redis", "mysql", "backup", "password-rotation")
            if image.startswith(("redis:", "mysql:")) or store_pod:
                # the official images' own users; their data volumes are made writable by fsGroup
                assert (sc["runAsUser"], pod_sc.get("fsGroup")) == (STORE_UID, STORE_UID), where
            else:
                assert sc["runAsUser"] == APP_UID, where


@pytest.mark.parametrize("case", ["default", "everything-switched"])
def test_stores_keep_their_data(case: str) -> None:
    sets = statefulsets(render(case))
    redis = sets["redis"]["spec"]["template"]["spec"]["containers"][0]
    args = command_of(redis)
    assert "redis-server" in args[: len(redis["command"])]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    mysql = sets["mysql"]["spec"]["template"]["spec"]["containers"][0]
    assert re.fullmatch(r"mysql:8(\.\d+)*", mysql["image"]), mysql["image"]
    data = next(m for m in mysql["volumeMounts"] if m["name"] == "data")
    # the data dir is a subfolder of the volume (a fresh volume's lost+found breaks init)
    datadir = next(a for a in mysql["args"] if a.startswith("--datadir="))
    assert datadir.split("=", 1)[1].startswith(data["mountPath"] + "/")
    claims = {c["metadata"]["name"] for c in sets["mysql"]["spec"].get("volumeClaimTemplates", [])}
    assert "data" in claims
    if case == "default":
        redis_claims = sets["redis"]["spec"]["volumeClaimTemplates"]
        assert [c["metadata"]["name"] for c in redis_claims] == ["data"]


@pytest.mark.parametrize("case", ["default", "everything-switched"])
def test_gateway_autoscaling_and_disruption_budget(case: str) -> None:
    docs = render(case)
    deployment = one(docs, "Deployment", "gateway")
    pod_labels_ = deployment["spec"]["template"]["metadata"]["labels"]
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    if case == "default":
        (hpa,) = hpas
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        assert "replicas" not in deployment["spec"]  # the HPA owns it
    else:
        assert not hpas
        assert deployment["spec"]["replicas"] == 3
    (pdb,) = [
        b
        for b in of_kind(docs, "PodDisruptionBudget")
        if selects(b["spec"]["selector"]["matchLabels"], pod_labels_)
    ]
    assert "minAvailable" in pdb["spec"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


@pytest.mark.parametrize("case", ["default", "external-stores", "everything-switched"])
def test_network_policies(case: str) -> None:
    docs = render(case)
    policies = {
        p["metadata"]["labels"]["app.kubernetes.io/component"]: p
        for p in of_kind(docs, "NetworkPolicy")
    }
    sets = statefulsets(docs)
    gateway = one(docs, "Deployment", "gateway")["spec"]["template"]["metadata"]["labels"]
    node = sets["node"]["spec"]["template"]["metadata"]["labels"]
    rebalance = {
        **{
            k: v
            for k, v in node.items()
            if k in ("app.kubernetes.io/name", "app.kubernetes.io/instance")
        },
        "app.kubernetes.io/component": "rebalance",
    }
    stores = [s for s in ("redis", "mysql") if s in sets]
    assert set(policies) == {"gateway", "node", *stores}

    def main_rule(policy: dict[str, Any]) -> dict[str, Any]:
        """The rule of the pod's service port (the other one admits the metrics port)."""
        (rule,) = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] != "metrics"]
        return rule

    def peers(policy: dict[str, Any]) -> list[dict[str, Any]]:
        return main_rule(policy).get("from", [])

    def pod_peers(policy: dict[str, Any]) -> list[dict[str, str]]:
        return [p["podSelector"]["matchLabels"] for p in peers(policy) if "podSelector" in p]

    # the gateway takes traffic from anyone on its port only
    assert selects(policies["gateway"]["spec"]["podSelector"]["matchLabels"], gateway)
    assert peers(policies["gateway"]) == []
    # nodes: the gateway, rebalance Jobs and other nodes (the outbox relay delivers users'
    # history node to node) only, plus explicitly configured peers
    node_policy = policies["node"]
    assert selects(node_policy["spec"]["podSelector"]["matchLabels"], node)
    assert not selects(node_policy["spec"]["podSelector"]["matchLabels"], gateway)
    allowed = pod_peers(node_policy)
    assert len(allowed) == 3
    assert any(selects(a, gateway) for a in allowed)
    assert any(selects(a, rebalance) for a in allowed)
    assert any(selects(a, node) for a in allowed)
    redis_or_mysql = [sets[s]["spec"]["template"]["metadata"]["labels"] for s in stores]
    assert not any(selects(a, labels) for a in allowed for labels in redis_or_mysql)
    extra = [p for p in peers(node_policy) if "podSelector" not in p]
    assert len(extra) == (1 if case == "everything-switched" else 0)
    assert [p["port"] for p in main_rule(node_policy)["ports"]] == ["http"]
    # the metrics port is admitted on the gateway and the nodes
    for component in ("gateway", "node"):
        ports = [p["port"] for r in policies[component]["spec"]["ingress"] for p in r["ports"]]
        assert sorted(ports) == ["http", "metrics"], component
    migrate = {**rebalance, "app.kubernetes.io/component": "migrate"}
    # stores: node pods only, and for MySQL the backup and password-rotation Jobs' pods
    jobs = {
        j["metadata"]["labels"]["app.kubernetes.io/component"]: j
        for j in of_kind(docs, "Job") + of_kind(docs, "CronJob")
    }
    for store in stores:
        policy = policies[store]
        labels = sets[store]["spec"]["template"]["metadata"]["labels"]
        assert selects(policy["spec"]["podSelector"]["matchLabels"], labels)
        allowed = pod_peers(policy)
        assert len(allowed) == len(peers(policy)) == (4 if store == "mysql" else 1)
        assert selects(allowed[0], node)
        assert not any(selects(a, gateway) for a in allowed)
        assert any(selects(a, migrate) for a in allowed) == (store == "mysql")
        for component in ("backup", "password-rotation"):
            if component in jobs and store == "mysql":
                job = jobs[component]
                spec = job["spec"].get("jobTemplate", job)["spec"]
                assert any(selects(a, spec["template"]["metadata"]["labels"]) for a in allowed)


@pytest.mark.parametrize("case", ["default", "external-stores"])
def test_rebalance_rbac_is_just_enough(case: str) -> None:
    docs = render(case)
    (role,) = of_kind(docs, "Role")
    (binding,) = of_kind(docs, "RoleBinding")
    accounts = {a["metadata"]["name"]: a for a in of_kind(docs, "ServiceAccount")}
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r for r in role["rules"]}
    assert set(rules) == {
        (("apps",), ("statefulsets/scale",)),
        (("apps",), ("deployments",)),
        (("",), ("pods",)),
        (("",), ("configmaps",)),
    }
    deployments = rules[("apps",), ("deployments",)]
    assert deployments["verbs"] == ["get"]
    assert deployments["resourceNames"] == [one(docs, "Deployment", "gateway")["metadata"]["name"]]
    scale = rules[("apps",), ("statefulsets/scale",)]
    assert set(scale["verbs"]) == {"get", "patch"}
    assert set(scale["resourceNames"]) == {
        s["metadata"]["name"] for s in of_kind(docs, "StatefulSet")
    }
    assert set(rules[("",), ("pods",)]["verbs"]) == {"get", "list"}
    configmaps = rules[("",), ("configmaps",)]
    assert set(configmaps["verbs"]) == {"get", "update", "patch"}
    assert configmaps["resourceNames"] == [one(docs, "ConfigMap", "ring")["metadata"]["name"]]
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (subject,) = binding["subjects"]
    assert subject["kind"] == "ServiceAccount" and subject["name"] in accounts
    labels = accounts[subject["name"]]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "rebalance"
    # the services themselves get no API token; only rebalance-side Jobs (the pre-rollback
    # guard) run with the rebalance account
    for doc, pod in workloads(docs):
        if doc["metadata"]["labels"]["app.kubernetes.io/component"] == "rebalance":
            assert pod["serviceAccountName"] == subject["name"]
            continue
        assert pod.get("automountServiceAccountToken") is False
        assert pod.get("serviceAccountName") != subject["name"]


def test_helm_test_hook_calls_gateway_readyz() -> None:
    docs = render("default")
    (pod,) = [
        d
        for d in of_kind(docs, "Pod")
        if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"
    ]
    service = one(docs, "Service", "gateway")
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["python", "-c"]
    code, url, timeout = container["args"]
    compile(code, "helm-test", "exec")
    parts = urlsplit(url)
    assert parts.hostname == f"{service['metadata']['name']}.{NAMESPACE}.svc.{DOMAIN}"
    assert parts.port == service["spec"]["ports"][0]["port"]
    assert parts.path == "/readyz/shards"  # an installed release serves every shard
    assert float(timeout) > 0
    assert pod["spec"]["restartPolicy"] == "Never"


def test_dashboard_ships_and_uses_only_real_metrics() -> None:
    from prometheus_client.metrics import MetricWrapperBase

    from redpacket.core import metrics

    docs = render("default")
    shipped = json.loads(one(docs, "ConfigMap", "dashboard")["data"]["redpacket.json"])
    assert shipped == json.loads((CHART / "dashboards" / "redpacket.json").read_text())
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    series: dict[str, str] = {}  # series name -> metric family
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():  # a counter's family name has no _total
                series.update({family.name + end: family.name for end in suffixes[family.type]})
    assert len(set(series.values())) >= 9
    exprs = [t["expr"] for p in shipped["panels"] for t in p.get("targets", [])]
    used = {name for e in exprs for name in re.findall(r"\bredpacket_[a-z_]+", e)}
    assert used, "the dashboard queries nothing"
    assert used <= set(series), f"unknown metrics in the dashboard: {used - set(series)}"
    assert {series[u] for u in used} == set(series.values()), "metrics missing from the dashboard"
    switched_off = of_kind(render("everything-switched"), "ConfigMap")
    assert "dashboard" not in {
        c["metadata"]["labels"]["app.kubernetes.io/component"] for c in switched_off
    }


# -- values and their schema ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (("--set", "shards=0"), "/shards"),
        (("--set", "shards=1025"), "/shards"),
        (("--set-string", "shards=two"), "/shards"),
        (("--set", "secrets.jwtSecret=too-short"), "/secrets/jwtSecret"),
        (("--set", "secrets.paymentsSecret=too-short"), "/secrets/paymentsSecret"),
        (("--set", "node.config.walletHoldTimeoutS=0"), "/node/config/walletHoldTimeoutS"),
        (("--set", "gateway.service.type=Ingress"), "/gateway/service/type"),
        (("--set", "redis.appendfsync=sometimes"), "/redis/appendfsync"),
        (("--set", "externalStores.redisUrls={http://not-redis}"), "/externalStores/redisUrls"),
        (("--set", "shard=3"), "shard"),  # a typo of a top-level key
    ],
    ids=[
        "shards=0",
        "shards=1025",
        "shards-string",
        "short-jwt",
        "short-payments-secret",
        "hold-timeout-0",
        "service-type",
        "appendfsync",
        "redis-url",
        "typo",
    ],
)
def test_schema_rejects_bad_values(args: tuple[str, ...], complaint: str) -> None:
    proc = run_helm("template", RELEASE, str(CHART), *args)
    assert proc.returncode != 0, f"helm accepted {args}"
    assert "don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert complaint in proc.stderr, proc.stderr


def test_default_values_match_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(values)
    assert not jsonschema.Draft7Validator(schema).is_valid({**values, "shards": "2"})


def test_every_value_is_commented() -> None:
    """Each key of values.yaml has a comment on the line(s) above it, or at the end of it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for n, line in enumerate(lines):
        if not re.match(r"^\s*[A-Za-z_][\w.-]*:", line):
            continue
        above = lines[n - 1].strip() if n else ""
        if not (above.startswith("#") or " # " in line):
            undocumented.append(f"values.yaml:{n + 1}: {line.strip()}")
    assert not undocumented, "\n".join(undocumented)


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == CHART.name
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    assert chart["kubeVersion"].startswith(">=1.25")


# -- issue 20: the chart in a real cluster ----------------------------------------------------


def render_args(*args: str) -> tuple[dict[str, Any], ...]:
    """Render with ad-hoc arguments (not cached: each case is used once)."""
    proc = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert proc.returncode == 0, f"helm template {args} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def store_templates(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    """The pod templates of the Redis and MySQL StatefulSets, as canonical YAML text."""
    sets = statefulsets(docs)
    return {s: yaml.safe_dump(sets[s]["spec"]["template"]) for s in ("redis", "mysql")}


def test_store_pod_templates_ignore_the_image_the_chart_and_other_secrets() -> None:
    """A gateway hotfix at peak (a new image.tag), or a new chart version or JWT secret, must
    not roll every shard's Redis and MySQL: their pod templates are byte-identical."""
    fixed = ("secrets.redisPassword=r3dis", "secrets.mysqlPassword=mysq1")
    base = store_templates(render_args(*sets("image.tag=1.0.0", *fixed)))
    hotfix = store_templates(
        render_args(
            *sets(
                "image.tag=1.0.1-hotfix",
                "image.digest=sha256:" + "a" * 64,
                "gateway.config.rateOpenBurst=99",
                "secrets.jwtSecret=" + "j" * 40,
                "secrets.nodeSecret=" + "n" * 32,
                *fixed,
            )
        )
    )
    assert hotfix == base
    for store, text in base.items():
        labels = yaml.safe_load(text)["metadata"]["labels"]
        assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels, store
    # their own keys do roll them: a new Redis password restarts Redis only
    rotated = store_templates(
        render_args(*sets("image.tag=1.0.0", "secrets.redisPassword=n3w", fixed[1]))
    )
    assert rotated["redis"] != base["redis"]
    assert rotated["mysql"] == base["mysql"]


def test_secret_and_ring_are_made_once_and_kept() -> None:
    """Neither is part of a release revision (a pre-install hook), so `helm upgrade` and
    `helm rollback` never re-template them, and uninstall keeps them."""
    docs = render("default")
    secret = next(d for d in of_kind(docs, "Secret") if d["metadata"]["name"] == "rp-redpacket")
    for doc in (secret, one(docs, "ConfigMap", "ring")):
        annotations = doc["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-install", doc["metadata"]["name"]
        assert annotations["helm.sh/resource-policy"] == "keep"
        # made before the pods that mount them
        assert int(annotations["helm.sh/hook-weight"]) < 0
    # GitOps with `helm template`: the ring can be left to the operator
    assert not [
        d
        for d in of_kind(render_args(*sets("ring.create=false")), "ConfigMap")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "ring"
    ]


def rollback_guard(shards: int) -> list[str]:
    """The argv of the pre-rollback Job of a revision rendered with ``shards``."""
    docs = render_args("--namespace", "pay", *sets(f"shards={shards}"))
    (job,) = [
        d
        for d in of_kind(docs, "Job")
        if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "pre-rollback"
    ]
    assert job["spec"]["backoffLimit"] > 0
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "rp-redpacket-rebalance"
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-c"]
    return [sys.executable, "-c", *container["args"]]


@pytest.mark.parametrize(
    ("target", "running", "rebalancing", "allowed"),
    [(3, 3, False, True), (4, 3, False, True), (2, 3, False, False), (3, 3, True, False)],
    ids=["same", "more", "fewer", "mid-rebalance"],
)
async def test_pre_rollback_hook_refuses_fewer_shards_than_run(
    tmp_path: Path, target: int, running: int, rebalancing: bool, allowed: bool
) -> None:
    """The hook's real script, run against the fake API server of the backend's tests: a
    rollback to fewer shards than run (or mid-rebalance) fails, so helm aborts it."""
    import asyncio

    from aiohttp import web

    from redpacket.cli.children import free_ports
    from redpacket.sharding.ring import NodeSpec
    from tests.test_kubernetes_backend import FakeKube

    nodes = tuple(NodeSpec(f"shard-{i}", f"http://n{i}:9000") for i in range(running))
    ring = RingDoc(2, nodes)
    if rebalancing:
        ring = RingDoc(3, nodes, previous=RingDoc(2, nodes[:-1]))
    sts = {f"rp-redpacket-{c}": running for c in ("node", "redis", "mysql")}
    fake = FakeKube(sts, "rp-redpacket-ring", ring)
    runner = web.AppRunner(fake.app())
    await runner.setup()
    port = free_ports(1)[0]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    try:
        proc = await asyncio.create_subprocess_exec(
            *rollback_guard(target),
            env={**env, "KUBECONFIG": str(kubeconfig)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await runner.cleanup()
    text = out.decode()
    assert (proc.returncode == 0) == allowed, text
    assert ("ok:" if allowed else "refused:") in text, text
    assert fake.calls and all(method == "GET" for method, _ in fake.calls), fake.calls


def memory_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


@pytest.mark.parametrize("limit", ["1Gi", "1.5Gi", "600M"])
def test_redis_refuses_writes_at_60_percent_of_its_limit(limit: str) -> None:
    """A full Redis answers errors to writes (noeviction) well below its limit, instead of
    being OOM-killed and replaying its AOF; its requests equal its limits."""
    docs = render_args(
        *sets(f"redis.resources.limits.memory={limit}", f"redis.resources.requests.memory={limit}")
    )
    (redis,) = statefulsets(docs)["redis"]["spec"]["template"]["spec"]["containers"]
    args = command_of(redis)
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    maxmemory = int(args[args.index("--maxmemory") + 1])
    assert maxmemory == memory_bytes(limit) * 60 // 100


@pytest.mark.parametrize("case", ["default", "shards=3", "everything-switched"])
def test_stores_have_guaranteed_resources(case: str) -> None:
    sets_ = statefulsets(render(case))
    for store in ("redis", "mysql"):
        for container in sets_[store]["spec"]["template"]["spec"]["containers"]:
            resources = container["resources"]
            assert resources["requests"] == resources["limits"], (store, container["name"])


def test_stores_with_requests_below_limits_are_refused() -> None:
    proc = run_helm("template", RELEASE, str(CHART), *sets("mysql.resources.requests.memory=1Gi"))
    assert proc.returncode != 0
    assert "mysql.resources: requests must equal limits" in proc.stderr


def test_mysql_binlogs_expire() -> None:
    (mysql,) = statefulsets(render("default"))["mysql"]["spec"]["template"]["spec"]["containers"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in mysql["args"] if "=" in a)
    assert flags["sync-binlog"] == "1"  # the ledger's durability is not traded for space
    assert 86400 <= int(flags["binlog-expire-logs-seconds"]) <= 7 * 86400
    assert flags["binlog-row-image"] == "MINIMAL"
    # the server this repository's tests run on takes the same flags (MySQL 8 does too)
    help_text = subprocess.run(
        [shutil.which("mariadbd") or "/usr/sbin/mariadbd", "--verbose", "--help"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    for flag in ("binlog-expire-logs-seconds", "binlog-row-image", "sync-binlog"):
        assert re.search(rf"^{flag}\s", help_text, re.M), flag


def job_script(component: str, *args: str) -> tuple[str, dict[str, str]]:
    """The shell script and literal env of the (Cron)Job of ``component``, rendered by helm."""
    docs = render_args(*args)
    (job,) = [
        d
        for d in of_kind(docs, "Job") + of_kind(docs, "CronJob")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    spec = job["spec"]["jobTemplate"]["spec"] if job["kind"] == "CronJob" else job["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    assert container["command"][-1] == "-c", container["command"]
    (script,) = container["args"]
    return script, {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_backup_cronjob_dumps_every_shard_with_the_password_from_a_file() -> None:
    docs = render("default")
    (cron,) = of_kind(docs, "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    spec = cron["spec"]["jobTemplate"]["spec"]
    assert spec["backoffLimit"] > 0
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    script, env = job_script("backup")
    assert "mysqldump" in script and "--single-transaction" in script
    assert "pipefail" in script  # a failed dump is not hidden by gzip
    # no password in the env or the command line: a file from the Secret
    assert not [e for e in container["env"] if "valueFrom" in e]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    secret_dir = str(Path(env["MYSQL_PASSWORD_FILE"]).parent)
    assert volumes[mounts[secret_dir]]["secret"]["items"] == [
        {"key": "mysql-password", "path": "mysql-password"}
    ]
    # the shards come from the live ring, the dumps go to a kept volume
    assert_reads_the_ring(list(docs), pod, container, env["RING_FILE"])
    claim = volumes[mounts[env["BACKUP_DIR"]]]["persistentVolumeClaim"]["claimName"]
    (pvc,) = [p for p in of_kind(docs, "PersistentVolumeClaim") if p["metadata"]["name"] == claim]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert int(env["SHARDS_AT_LEAST"]) == expected_shards("default")


def test_storage_class_retains_and_expands() -> None:
    docs = render_args(
        *sets(
            "storageClass.create=true",
            "storageClass.provisioner=pd.csi.storage.gke.io",
            "mysql.persistence.storageClass=fast",
        )
    )
    (sc,) = of_kind(docs, "StorageClass")
    assert sc["reclaimPolicy"] == "Retain"
    assert sc["allowVolumeExpansion"] is True
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
    sets_ = statefulsets(docs)
    (redis_claim,) = sets_["redis"]["spec"]["volumeClaimTemplates"]
    assert redis_claim["spec"]["storageClassName"] == sc["metadata"]["name"]
    (mysql_claim,) = sets_["mysql"]["spec"]["volumeClaimTemplates"]
    assert mysql_claim["spec"]["storageClassName"] == "fast"  # an explicit class wins
    (backup,) = of_kind(docs, "PersistentVolumeClaim")
    assert backup["spec"]["storageClassName"] == sc["metadata"]["name"]
    assert not of_kind(render("default"), "StorageClass")


@pytest.mark.parametrize("case", ["default", "shards=3", "everything-switched"])
def test_no_store_password_in_argv_or_env(case: str) -> None:
    """Store passwords reach processes as files from the Secret: never in a command line
    (visible in `ps`), nor in the environment (visible in `kubectl describe`, crash dumps)."""
    docs = render(case)
    values = secret_data(docs)
    passwords = {v for data in values.values() for k, v in data.items() if k.endswith("password")}
    assert passwords
    for doc, pod in workloads(docs):
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            where = f"{doc['kind']}/{doc['metadata']['name']}/{container['name']}"
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef", {})
                assert not ref.get("key", "").endswith("password"), (where, var["name"])
                assert not any(p in var.get("value", "") for p in passwords), where
            assert not any(p in arg for p in passwords for arg in command_of(container)), where


def test_existing_secret_is_used_everywhere() -> None:
    docs = render_args(*sets("secrets.existingSecret=shop-credentials"))
    assert not of_kind(docs, "Secret")
    names = set()
    for _doc, pod in workloads(docs):
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                names.add(volume["secret"]["secretName"])
        for container in pod["containers"]:
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    names.add(ref["name"])
    assert names == {"shop-credentials"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_redis_starts_with_the_charts_command_password_file_and_maxmemory(tmp_path: Path) -> None:
    """The Redis container's real command, on this machine's redis-server (paths moved to a
    temp folder): the password comes from the Secret file and is not in its command line,
    and once maxmemory is reached writes are refused, nothing is evicted."""
    import redis as redis_client

    docs = render_args(*sets("secrets.redisPassword=s3cret-from-file", "redis.maxmemory=2mb"))
    sts = statefulsets(docs)["redis"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    files = secret_files(sts, container)
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    data = secret_data(docs)
    for path, (name, key) in files.items():
        (secrets_dir / Path(path).name).write_text(data[name][key])
    port = free_port()
    argv = [
        part.replace("/etc/redpacket/secrets", str(secrets_dir)).replace(
            "/tmp/auth.conf", str(tmp_path / "auth.conf")
        )
        for part in command_of(container)
    ]
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--dir") + 1] = str(tmp_path)
    argv += ["--bind", "127.0.0.1", "--appendonly", "no", "--save", ""]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        client = redis_client.Redis(port=port, password="s3cret-from-file")
        deadline = time.monotonic() + 20
        while True:
            try:
                assert client.ping()
                break
            except redis_client.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "redis did not start"
                time.sleep(0.1)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"s3cret" not in cmdline and b"redis-server" in cmdline
        with pytest.raises(redis_client.AuthenticationError):
            redis_client.Redis(port=port).set("k", "v")
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert int(client.config_get("maxmemory")["maxmemory"]) == 2 * 1024 * 1024
        with pytest.raises(redis_client.ResponseError, match="used memory > 'maxmemory'"):
            for i in range(10_000):
                client.set(f"packet:{i}", b"x" * 1024)
        assert client.exists("packet:0")  # nothing was evicted
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    # an empty password file (a Secret without the key's value) is refused, not "no auth"
    (secrets_dir / "redis-password").write_text("")
    empty = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert empty.returncode != 0 and "refusing to start" in empty.stderr


def test_password_rotation_job_sets_the_secrets_password(tmp_path: Path) -> None:
    """The rotation hook's real script against this machine's MariaDB: a user created with
    an old password (as MySQL's first init did) gets the Secret's new one on every shard of
    the ring; the old one stops working. RETAIN CURRENT PASSWORD is MySQL-only, so it is off
    here (MariaDB)."""
    import pymysql

    script, env = job_script("password-rotation", *sets("passwordRotation.retainCurrent=false"))
    assert "ALTER USER" in script
    user = f"rot_{os.getpid()}"
    root = pymysql.connect(host="127.0.0.1", port=3306, user="root", autocommit=True)
    try:
        with root.cursor() as cur:
            cur.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'old-pass'")
        secrets_dir = tmp_path / "secrets"
        secrets_dir.mkdir()
        (secrets_dir / "mysql-password").write_text("new-'pass\\x")  # quotes are escaped
        (secrets_dir / "mysql-root-password").write_text("")
        ring = tmp_path / "ring.json"
        ring.write_text(
            json.dumps(
                {"version": 1, "nodes": [{"name": f"shard-{i}", "url": "x"} for i in (0, 1)]}
            )
        )
        env.update(
            MYSQL_HOST="127.0.0.1",
            MYSQL_PORT="3306",
            MYSQL_USER=user,
            MYSQL_PASSWORD_FILE=str(secrets_dir / "mysql-password"),
            ROOT_PASSWORD_FILE=str(secrets_dir / "mysql-root-password"),
            RING_FILE=str(ring),
            WORK=str(tmp_path),
            PATH=os.environ["PATH"],
        )
        proc = subprocess.run(
            ["/bin/bash", "-c", script], env=env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.count("set from the Secret") == 2
        assert not (tmp_path / "root.cnf").exists()
        pymysql.connect(host="127.0.0.1", port=3306, user=user, password="new-'pass\\x").close()
        with pytest.raises(pymysql.err.OperationalError):
            pymysql.connect(host="127.0.0.1", port=3306, user=user, password="old-pass")
    finally:
        with root.cursor() as cur:
            cur.execute(f"DROP USER IF EXISTS '{user}'@'%'")
        root.close()


@pytest.mark.parametrize("case", CASES)
def test_every_shard_statefulset_has_a_disruption_budget(case: str) -> None:
    docs = render(case)
    budgets = of_kind(docs, "PodDisruptionBudget")
    for component, sts in statefulsets(docs).items():
        labels = sts["spec"]["template"]["metadata"]["labels"]
        (pdb,) = [b for b in budgets if selects(b["spec"]["selector"]["matchLabels"], labels)]
        assert pdb["spec"]["maxUnavailable"] == 1, component
        assert "minAvailable" not in pdb["spec"]


@pytest.mark.parametrize(("version", "policy"), [("1.25", None), ("1.33", "AlwaysAllow")])
def test_gateway_budget_lets_drains_evict_unready_gateways(
    version: str, policy: str | None
) -> None:
    """NotReady gateways may always be evicted (Kubernetes >= 1.27 has the field; older API
    servers would reject it, so it is left out there)."""
    docs = render("default", version)
    gateway = one(docs, "Deployment", "gateway")["spec"]["template"]["metadata"]["labels"]
    (pdb,) = [
        b
        for b in of_kind(docs, "PodDisruptionBudget")
        if selects(b["spec"]["selector"]["matchLabels"], gateway)
    ]
    assert pdb["spec"].get("unhealthyPodEvictionPolicy") == policy


@pytest.mark.parametrize("case", ["default", "shards=8", "external-stores"])
def test_pods_spread_across_hosts_and_zones(case: str) -> None:
    docs = render(case)
    spread = [one(docs, "Deployment", "gateway"), *statefulsets(docs).values()]
    for workload in spread:
        template = workload["spec"]["template"]
        constraints = {c["topologyKey"]: c for c in template["spec"]["topologySpreadConstraints"]}
        where = workload["metadata"]["name"]
        host = constraints["kubernetes.io/hostname"]
        assert (host["maxSkew"], host["whenUnsatisfiable"]) == (1, "DoNotSchedule"), where
        assert host["nodeTaintsPolicy"] == "Honor", where  # untolerated hosts do not count
        # zones only where nodes are labelled: a preference, never a block
        assert constraints["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"
        for constraint in constraints.values():  # counts this component's own pods
            assert (
                constraint["labelSelector"]["matchLabels"]
                == workload["spec"]["selector"]["matchLabels"]
            )
    # a component's own constraints replace the chart's
    (given,) = one(render("everything-switched"), "Deployment", "gateway")["spec"]["template"][
        "spec"
    ]["topologySpreadConstraints"]
    assert given["topologyKey"] == "topology.kubernetes.io/zone"


@pytest.mark.parametrize(
    ("action", "extra"),
    [("add", ()), ("remove", ()), ("add", EXTERNAL), ("resume", ())],
    ids=["add", "remove", "add-external-stores", "resume"],
)
def test_rebalance_job_ships_with_the_flags_the_backend_needs(
    action: str, extra: tuple[str, ...]
) -> None:
    """The rebalance Job the chart renders runs a real `redpacket rebalance` command whose
    kubernetes backend, built from its flags, drives exactly this release's objects."""
    from redpacket.sharding.backends.kubernetes import KubernetesNames

    shard = () if action == "resume" else sets("rebalance.job.node=shard-2")
    docs = render_args(*extra, *sets(f"rebalance.job.action={action}"), *shard)
    (job,) = [
        d
        for d in of_kind(docs, "Job")
        if "helm.sh/hook" not in d["metadata"].get("annotations", {})
    ]
    assert job["spec"]["backoffLimit"] > 0  # resumable: docs/rebalancing.md
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    argv = container["command"]
    assert_real_cli(argv)
    args = build_parser().parse_args(argv[1:])
    assert (args.backend, args.release, args.namespace) == ("kubernetes", RELEASE, NAMESPACE)
    names = KubernetesNames(
        namespace=args.namespace,
        release=args.release,
        fullname=args.fullname,
        redis_statefulset=None if args.redis_statefulset == "none" else args.redis_statefulset,
        mysql_statefulset=None if args.mysql_statefulset == "none" else args.mysql_statefulset,
        node_port=args.node_port,
        gateway_port=args.gateway_port,
        cluster_domain=args.cluster_domain,
    ).resolved()
    sts = statefulsets(docs)
    assert names.node_statefulset == sts["node"]["metadata"]["name"]
    assert names.redis_statefulset == (sts["redis"]["metadata"]["name"] if "redis" in sts else None)
    assert names.mysql_statefulset == (sts["mysql"]["metadata"]["name"] if "mysql" in sts else None)
    assert names.ring_configmap == one(docs, "ConfigMap", "ring")["metadata"]["name"]
    gateway = one(docs, "Deployment", "gateway")
    assert names.gateway_deployment == gateway["metadata"]["name"]
    assert selects(
        dict(kv.split("=") for kv in names.gateway_selector.split(",")),
        gateway["spec"]["template"]["metadata"]["labels"],
    )
    assert names.gateway_port == container_port(
        gateway["spec"]["template"]["spec"]["containers"][0], "http"
    )
    ring = RingDoc.parse(json.loads(one(docs, "ConfigMap", "ring")["data"]["ring.json"]))
    assert names.node_statefulset and ring.nodes[0].url.startswith(
        f"http://{names.node_statefulset}-0.{names.node_statefulset}.{NAMESPACE}.svc.{names.cluster_domain}:{names.node_port}"
    )
    # its account is the rebalance Role's, its node secret the nodes'
    (binding,) = of_kind(docs, "RoleBinding")
    assert pod["serviceAccountName"] == binding["subjects"][0]["name"]
    (secret_env,) = container["env"]
    assert secret_env["name"] == "REDPACKET_NODE_SECRET"
    assert secret_env["valueFrom"]["secretKeyRef"]["key"] == "node-secret"


def test_rebalance_job_is_not_part_of_a_release() -> None:
    assert not [
        d
        for d in render("default")
        if d["kind"] == "Job"
        and "rebalance-" in d["metadata"]["name"]
        and "guard" not in d["metadata"]["name"]
    ]
    proc = run_helm(
        "template",
        RELEASE,
        str(CHART),
        "--is-upgrade",
        *sets("rebalance.job.action=add", "rebalance.job.node=shard-2"),
    )
    assert proc.returncode != 0 and "never by an upgrade" in proc.stderr
    proc = run_helm("template", RELEASE, str(CHART), *sets("rebalance.job.action=remove"))
    assert proc.returncode != 0 and "needs rebalance.job.node" in proc.stderr


def test_the_chart_renders_the_shards_capacity_plans_for() -> None:
    """docs/capacity.md plans 308 shards for 760k opens/s; the chart takes up to 1024."""
    docs = render_args(*sets("shards=512"))
    for component, sts in statefulsets(docs).items():
        assert sts["spec"]["replicas"] == 512, component
    ring = RingDoc.parse(json.loads(one(docs, "ConfigMap", "ring")["data"]["ring.json"]))
    assert [n.name for n in ring.nodes][-1] == "shard-511"
    # a ConfigMap holds at most 1 MiB, and a rebalance writes the ring twice (with previous)
    assert 2 * len(one(docs, "ConfigMap", "ring")["data"]["ring.json"]) < 1024 * 1024 // 2
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("case", ["default", "everything-switched"])
def test_gateway_keeps_serving_while_its_endpoint_goes_and_liveness_is_patient(case: str) -> None:
    docs = render(case)
    pod = one(docs, "Deployment", "gateway")["spec"]["template"]["spec"]
    (gateway,) = pod["containers"]
    command = gateway["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    sleep_s = int(command[1])
    assert sleep_s >= 5  # EndpointSlice -> kube-proxy / load balancers take seconds
    assert pod["terminationGracePeriodSeconds"] > sleep_s + 5  # time to drain after SIGTERM
    # the image has the sleep binary the hook runs (a Debian-based python image)
    assert "slim-bookworm" in (REPO / "docker" / "Dockerfile").read_text()
    node = statefulsets(docs)["node"]["spec"]["template"]["spec"]["containers"][0]
    for container in (gateway, node):
        probe = container["livenessProbe"]
        assert probe["timeoutSeconds"] >= 5 and probe["failureThreshold"] >= 5, container["name"]


def test_liveness_below_5_is_refused() -> None:
    proc = run_helm(
        "template", RELEASE, str(CHART), *sets("gateway.livenessProbe.timeoutSeconds=3")
    )
    assert proc.returncode != 0 and "/gateway/livenessProbe/timeoutSeconds" in proc.stderr
    proc = run_helm("template", RELEASE, str(CHART), *sets("gateway.preStopSleepSeconds=40"))
    assert proc.returncode != 0 and "must exceed gateway.preStopSleepSeconds" in proc.stderr


# metric families the alerts use that other branches add (issue 19: dead letters, the
# wallet: credit lag), documented in docs/deploy.md "Alerts"; the rest are core/metrics.py's
PENDING_METRICS = {"redpacket_dead_letters", "redpacket_credit_lag_seconds"}


def known_series() -> set[str]:
    import importlib

    from prometheus_client import REGISTRY

    for module in ("redpacket.core.metrics", "redpacket.node.relay"):  # register the families
        importlib.import_module(module)
    names = {m.name for m in REGISTRY.collect()}
    series = set()
    for name in names | PENDING_METRICS:
        series |= {name, f"{name}_total", f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return series


@pytest.mark.parametrize("case", ["default", "monitoring"])
def test_metrics_port_is_scraped_but_never_public(case: str) -> None:
    docs = render(case)
    port = yaml.safe_load((CHART / "values.yaml").read_text())["metricsPort"]
    assert port == 9100
    public = one(docs, "Service", "gateway")
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    for workload in (one(docs, "Deployment", "gateway"), statefulsets(docs)["node"]):
        template = workload["spec"]["template"]
        (container,) = template["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert (
            env["REDPACKET_METRICS_PORT"] == str(container_port(container, "metrics")) == str(port)
        )
        assert template["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        metrics_svc = services[f"rp-redpacket-{component}-metrics"]
        assert metrics_svc["spec"]["clusterIP"] == "None"
        assert selects(metrics_svc["spec"]["selector"], template["metadata"]["labels"])
        assert [p["targetPort"] for p in metrics_svc["spec"]["ports"]] == ["metrics"]
    # the public Service forwards the API port only
    assert [p["targetPort"] for p in public["spec"]["ports"]] == ["http"]


def test_service_monitor_alerts_and_exporters() -> None:
    docs = render("monitoring")
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert monitor["apiVersion"] == OPERATOR_API
    scraped = [
        s
        for s in of_kind(docs, "Service")
        if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert {s["metadata"]["labels"]["app.kubernetes.io/component"] for s in scraped} == {
        "gateway",
        "node",
        "redis",
        "mysql",
    }
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert all(s["spec"]["ports"][0]["name"] == "metrics" for s in scraped)

    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {
        "RedpacketShardDown",
        "RedpacketGatewayUnavailable",
        "RedpacketDeadLetters",
        "RedpacketCreditLag",
        "RedpacketOutboxBacklog",
        "RedpacketVolumeFilling",
        "RedpacketBackupMissing",
    } <= set(alerts)
    used = {n for r in alerts.values() for n in re.findall(r"\bredpacket_[a-z_]+", r["expr"])}
    assert used <= known_series(), used - known_series()
    assert "redpacket_dead_letters" in used and "redpacket_credit_lag_seconds_bucket" in used
    assert 'status="503"' in alerts["RedpacketGatewayUnavailable"]["expr"]
    assert "kubelet_volume_stats_used_bytes" in alerts["RedpacketVolumeFilling"]["expr"]
    assert "rp-redpacket-node-metrics" in alerts["RedpacketShardDown"]["expr"]
    deploy = (REPO / "docs" / "deploy.md").read_text()
    for name in PENDING_METRICS | set(alerts):
        assert name in deploy, f"{name} is not documented in docs/deploy.md"

    # exporters: sidecars in the store pods, on their own metrics port, admitted by policy
    sets_ = statefulsets(docs)
    policies = {
        p["metadata"]["labels"]["app.kubernetes.io/component"]: p
        for p in of_kind(docs, "NetworkPolicy")
    }
    for store in ("redis", "mysql"):
        pod = sets_[store]["spec"]["template"]["spec"]
        exporter = next(c for c in pod["containers"] if c["name"] == "exporter")
        assert container_port(exporter, "metrics") in (9121, 9104)
        assert not any(
            "password" in a.lower() and "file" not in a.lower() for a in command_of(exporter)
        )
        rules = policies[store]["spec"]["ingress"]
        (metrics_rule,) = [r for r in rules if r["ports"][0]["port"] == "metrics"]
        assert metrics_rule["from"][0]["namespaceSelector"]  # networkPolicy.metricsIngressFrom


def test_exporter_files_are_written_from_the_secret(tmp_path: Path) -> None:
    """The shells that give the exporters their passwords (Redis's start script, MySQL's init
    container), run for real with the paths moved: the files hold the Secret's password."""
    docs = render_args(*MONITORING)  # an existingSecret may hold any characters
    sets_ = statefulsets(docs)
    redis = sets_["redis"]["spec"]["template"]["spec"]["containers"][0]
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "redis-password").write_text('a"b\\c')
    (secrets_dir / "mysql-password").write_text("m1")
    script = redis["command"][2].replace("/tmp/", "$OUT/")
    script = script.replace("/etc/redpacket/secrets", str(secrets_dir))
    script = script.replace('exec redis-server "$@"', "exit 0 #")
    subprocess.run(["/bin/sh", "-c", script], check=True, timeout=10, env={"OUT": str(tmp_path)})
    assert json.loads((tmp_path / "exporter-passwords.json").read_text()) == {
        "redis://127.0.0.1:6379": 'a"b\\c'
    }
    (init,) = sets_["mysql"]["spec"]["template"]["spec"]["initContainers"]
    script = init["args"][0].replace("/etc/redpacket/secrets", str(secrets_dir))
    script = script.replace("/run/redpacket", str(tmp_path))
    subprocess.run(["/bin/sh", "-c", script], check=True, timeout=10)
    cnf = (tmp_path / "exporter.cnf").read_text()
    assert 'password="m1"' in cnf and "user=redpacket" in cnf


def test_a_restricted_gateway_still_answers_rebalance_jobs() -> None:
    """ring_loaded asks every gateway pod for its ring: a gatewayIngressFrom that left the
    rebalance Job out would make every rebalance wait for nothing and fail."""
    docs = render_args(
        *sets_json(
            'networkPolicy.gatewayIngressFrom=[{"namespaceSelector":'
            '{"matchLabels":{"kubernetes.io/metadata.name":"ingress"}}}]'
        ),
        *sets("rebalance.job.action=status"),
    )
    (policy,) = [
        p
        for p in of_kind(docs, "NetworkPolicy")
        if p["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
    ]
    (rule,) = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "http"]
    (job,) = [j for j in of_kind(docs, "Job") if "rebalance-status" in j["metadata"]["name"]]
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    assert any(
        selects(p.get("podSelector", {}).get("matchLabels", {"x": "y"}), job_labels)
        for p in rule["from"]
    )
    assert any("namespaceSelector" in p for p in rule["from"])


# -- every node pod migrates its own shard (a shard added by a rebalance too) ----------------


def mysql_env(container: dict[str, Any]) -> list[dict[str, Any]]:
    """The env entries that choose a container's MySQL: the URL, its password file, and the
    ordinal that fills {ordinal} in the URL."""
    return [
        v
        for v in container["env"]
        if v["name"] == "REDPACKET_ORDINAL" or v["name"].startswith("REDPACKET_MYSQL_")
    ]


@pytest.mark.parametrize("case", CASES)
def test_every_node_pod_migrates_its_own_shard_before_the_node_starts(case: str) -> None:
    """A shard added by `redpacket rebalance add --backend kubernetes` (the StatefulSets scaled
    up) gets an empty database no migration Job has seen: each node pod's init container runs
    `redpacket db migrate` with exactly the node's MySQL env and the same Secret files, so
    every pod i migrates database i before its node starts."""
    docs = render(case)
    sts = statefulsets(docs)["node"]
    pod = sts["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (node,) = pod["containers"]
    argv = command_of(init)
    if argv[:2] == ["/bin/sh", "-c"]:  # external MySQL: the URL from this shard's file
        assert command_of(node)[:2] == ["/bin/sh", "-c"]
        assert "mysql-url-${ordinal}" in argv[2]
        argv = shlex.split(argv[2].rstrip().splitlines()[-1])[1:]  # after `exec`
    assert argv[:3] == ["redpacket", "db", "migrate"]
    assert_real_cli(argv)
    assert argv[3:] == ["--wait-s", "300"]  # it may start before its MySQL does
    assert mysql_env(init) == mysql_env(node)
    assert init["image"] == node["image"]
    # the same files from the same Secret keys
    node_files = secret_files(sts, node)
    for path, source in secret_files(sts, init).items():
        assert node_files[path] == source, path
    secrets = secret_data(docs)
    for i in range(expected_shards(case)):
        labels = pod_labels(sts, i)
        hostname = f"{sts['metadata']['name']}-{i}"
        env = kubelet_env(init, secrets, labels, hostname)
        node_env = kubelet_env(node, secrets, labels, hostname)
        if "REDPACKET_MYSQL_URL" in node_env:  # in-chart MySQL: the URL of pod i's MySQL
            url = NodeSettings.from_env({**env, "REDPACKET_NODE_SECRET": "-"}).mysql_url
            assert url == NodeSettings.from_env(node_env).mysql_url
            assert f"-mysql-{i}." in url


def test_no_init_migration_when_migrations_are_off() -> None:
    docs = render_args(*sets("migrations.enabled=false"))
    assert "initContainers" not in statefulsets(docs)["node"]["spec"]["template"]["spec"]


# -- the wallet's settings ------------------------------------------------------------------


def gateway_env(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    (container,) = one(docs, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"]
    return kubelet_env(container, secret_data(docs), {}, "gateway-abc")


def test_gateway_gets_a_payments_secret_made_once_and_kept() -> None:
    """The top-up webhook's key comes from the chart's Secret (key payments-secret), generated
    at install like the other secrets (the Secret is a kept pre-install hook), so the webhook
    route exists."""
    docs = render("default")
    (secret,) = [d for d in of_kind(docs, "Secret") if d["metadata"]["name"] == "rp-redpacket"]
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    generated = secret_data(docs)["rp-redpacket"]["payments-secret"]
    settings = GatewaySettings.from_env(gateway_env(docs))  # refuses one under 32 bytes
    assert settings.payments_secret == generated
    assert "/v1/wallet/topups" in wallet_routes(settings.payments_secret)
    given = "p" * 40
    docs = render_args(*sets(f"secrets.paymentsSecret={given}"))
    assert GatewaySettings.from_env(gateway_env(docs)).payments_secret == given


def wallet_routes(payments_secret: str) -> set[str]:
    """Paths of the gateway's wallet routes with this secret (the gateway's own wiring)."""
    from aiohttp import web

    from redpacket.gateway.wallet import add_wallet_routes

    app = web.Application()
    add_wallet_routes(app, payments_secret)
    return {r.canonical for r in app.router.resources()}


def test_without_payments_the_gateway_has_no_secret_and_no_webhook() -> None:
    docs = render_args(*sets("payments.enabled=false"))
    assert "payments-secret" not in secret_data(docs)["rp-redpacket"]
    env = gateway_env(docs)
    assert "REDPACKET_PAYMENTS_SECRET" not in env
    settings = GatewaySettings.from_env(env)
    assert "/v1/wallet/topups" not in wallet_routes(settings.payments_secret)  # 404
    assert "/v1/me/wallet" in wallet_routes(settings.payments_secret)


def test_an_existing_secret_supplies_the_payments_secret() -> None:
    """With secrets.existingSecret the user's Secret holds payments-secret. The reference is
    optional: a release whose Secret predates the key (the chart's own is never re-templated)
    still starts its gateways, with the webhook at 404 until the key is added."""
    docs = render_args(*sets("secrets.existingSecret=shop-credentials"))
    (container,) = one(docs, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"]
    (var,) = [v for v in container["env"] if v["name"] == "REDPACKET_PAYMENTS_SECRET"]
    ref = var["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"], ref["optional"]) == (
        "shop-credentials",
        "payments-secret",
        True,
    )
    mine = {"jwt-secret": "j" * 32, "node-secret": "n" * 16}
    env = kubelet_env(container, {"shop-credentials": mine}, {}, "gw")
    assert GatewaySettings.from_env(env).payments_secret == ""
    env = kubelet_env(
        container, {"shop-credentials": {**mine, "payments-secret": "s" * 32}}, {}, "gw"
    )
    assert GatewaySettings.from_env(env).payments_secret == "s" * 32


@pytest.mark.parametrize("case", CASES)
def test_the_chart_never_gives_the_gateway_free_money(case: str) -> None:
    """A starting balance is a dev cluster's convenience (REDPACKET_DEV_LOGIN marks one): no
    gateway of the chart gets REDPACKET_DEV_STARTING_BALANCE or REDPACKET_DEV_LOGIN."""
    for doc, pod in workloads(render(case)):
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            names = {v["name"] for v in container.get("env", [])}
            where = f"{doc['kind']}/{doc['metadata']['name']}/{container['name']}"
            assert "REDPACKET_DEV_STARTING_BALANCE" not in names, where
            assert "REDPACKET_DEV_LOGIN" not in names, where
    assert GatewaySettings.from_env(gateway_env(render(case))).dev_starting_balance == 0


@pytest.mark.parametrize("name", ["REDPACKET_DEV_STARTING_BALANCE", "REDPACKET_DEV_LOGIN"])
def test_dev_settings_in_the_gateways_extra_env_are_refused(name: str) -> None:
    value = json.dumps([{"name": name, "value": "100"}])
    proc = run_helm("template", RELEASE, str(CHART), "--set-json", f"gateway.extraEnv={value}")
    assert proc.returncode != 0
    assert f"gateway.extraEnv sets {name}: that is for dev clusters only" in proc.stderr


@pytest.mark.parametrize("timeout_s", ["", "45.5"])
def test_nodes_get_the_wallet_hold_timeout(timeout_s: str) -> None:
    args = sets_json(f"node.config.walletHoldTimeoutS={timeout_s}") if timeout_s else ()
    docs = render_args(*args)
    sts = statefulsets(docs)["node"]
    (node,) = sts["spec"]["template"]["spec"]["containers"]
    env = kubelet_env(node, secret_data(docs), pod_labels(sts, 0), "rp-redpacket-node-0")
    default = yaml.safe_load((CHART / "values.yaml").read_text())["node"]["config"]
    expected = float(timeout_s or default["walletHoldTimeoutS"])
    assert NodeSettings.from_env(env).wallet_hold_timeout_s == expected

"""docker/Dockerfile, .dockerignore and docker/docker-compose.yml.

Statically: the compose file against the Compose Specification's JSON schema, every
service's healthcheck, the commands both files run against the real CLI, the settings each
container gets against the services' own settings classes, and the build context against
what `pip install .` needs.

For real (``container`` mark, slow the first time): the image is built on a real engine
(tests/containers.py starts one, and builds Debian stand-ins for the official base images
when no registry is reachable), the compose stack runs with 2 shards, a crowd of users goes
through its gateway, a node is crashed and comes back by its restart policy, and the ledger
of both shards is checked.

The Compose schema comes from the PyPI package check-jsonschema, which vendors it
(``check_jsonschema/builtin_schemas/vendor/compose-spec.json``); if that package is not
installed it is installed (without its dependencies, nothing imported) into ``.cache/``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jsonschema
import pytest
import yaml

from redpacket.cli.main import build_parser
from redpacket.cli.wallet import send_topup
from redpacket.core.ids import snowflake_of
from redpacket.gateway.auth import mint_token
from redpacket.gateway.settings import GatewaySettings
from redpacket.node.ledger import parse_mysql_url
from redpacket.node.settings import NodeSettings
from redpacket.sharding.ring import NodeSpec, Ring, RingDoc
from tests.containers import Engine, base_image, engine, run, tree_hash
from tests.helm_tool import REPO, pip_target

DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"
CHECK_JSONSCHEMA = ("check-jsonschema", "0.39.0")
COMPOSE_SCHEMA = Path("check_jsonschema", "builtin_schemas", "vendor", "compose-spec.json")
SHARDS = 2
JWT_SECRET = "compose-test-jwt-secret-" + "0123456789abcdef"
PAYMENTS_SECRET = "compose-test-payments-secret-" + "0123456789abcdef"
STACK_SECRETS = {"REDPACKET_JWT_SECRET": JWT_SECRET}  # what compose requires to start


# -- helpers ----------------------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    try:
        import check_jsonschema

        path = Path(check_jsonschema.__file__).parent.parent / COMPOSE_SCHEMA
    except ImportError:
        path = pip_target(*CHECK_JSONSCHEMA) / COMPOSE_SCHEMA
    return json.loads(path.read_text())


@functools.cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # merges the <<: anchors as compose does


def default_image(service: dict[str, Any]) -> str:
    """The image a service runs when no REDPACKET_*_IMAGE variable is set."""
    return interpolate(str(service.get("image", "")))


class Required(ValueError):
    """${VAR:?message} with VAR unset: compose refuses to start."""


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$ with an empty (or given)
    environment (the required secrets come from ``STACK_SECRETS`` unless told otherwise)."""
    env = STACK_SECRETS if env is None else env

    def sub(m: re.Match[str]) -> str:
        if m[0] == "$$":
            return "$"
        name, default = m["name"], m["default"] or ""
        if m["required"] is not None and not env.get(name):
            raise Required(f"{name}: {m['required']}")
        return env.get(name) or default

    return re.sub(
        r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
        r"(?::-(?P<default>[^}]*)|:\?(?P<required>[^}]*))?\}",
        sub,
        value,
    )


def service_env(name: str) -> dict[str, str]:
    env = compose()["services"][name].get("environment", {})
    assert isinstance(env, dict), f"{name}: use the mapping form of environment"
    return {k: interpolate(str(v)) for k, v in env.items()}


def app_services() -> dict[str, dict[str, Any]]:
    """Services that run the redpacket image."""
    return {n: s for n, s in compose()["services"].items() if "build" in s}


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list), f"use the exec (JSON) form: {rest}"
    return value


def image_argv(command: list[str] | None = None) -> list[str]:
    """ENTRYPOINT + CMD of the image, or ENTRYPOINT + a compose command."""
    stage = dict(final_stage())
    entrypoint = exec_form(stage["ENTRYPOINT"])
    return [*entrypoint, *(command if command is not None else exec_form(stage["CMD"]))]


def assert_real_cli(argv: list[str]) -> None:
    assert argv[0] == "redpacket", argv
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{shlex.join(argv)} is not a command of the real redpacket CLI")


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    patterns = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            patterns.append((line.startswith("!"), line.lstrip("!").rstrip("/")))
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, pattern in patterns:
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negated
    return excluded


# -- compose ----------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification() -> None:
    schema = compose_schema()
    assert schema.get("title") == "Compose Specification"
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    # the schema does reject a mistake
    broken = {**compose(), "services": {**compose()["services"], "x": {"image": 1}}}
    assert not validator.is_valid(broken)


def test_compose_runs_a_two_shard_cluster() -> None:
    services = compose()["services"]
    images = {name: default_image(s) for name, s in services.items()}
    nodes = sorted(n for n, s in app_services().items() if s["command"] == ["node"])
    gateways = [n for n, s in app_services().items() if s["command"] == ["gateway"]]
    redis = sorted(n for n, i in images.items() if i.startswith("redis:"))
    mysql = sorted(n for n, i in images.items() if i.startswith("mysql:"))
    assert len(gateways) == 1
    assert len(nodes) == len(redis) == len(mysql) == SHARDS
    for name in mysql:
        assert re.fullmatch(r"mysql:8(\.\d+)*", images[name]), images[name]
        assert any(v.endswith(":/var/lib/mysql") for v in services[name]["volumes"])
    for name in redis:
        argv = services[name]["command"]
        assert argv[argv.index("--appendonly") + 1] == "yes"
        assert any(v.endswith(":/data") for v in services[name]["volumes"])


def test_every_service_has_a_healthcheck() -> None:
    for name, service in compose()["services"].items():
        if service.get("restart") == "no":  # a one-shot (the migration): nothing to check
            continue
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        test = check["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name}: {test}"


def test_services_wait_for_healthy_dependencies() -> None:
    services = compose()["services"]
    gateway = next(s for s in app_services().values() if s["command"] == ["gateway"])
    nodes = [n for n, s in app_services().items() if s["command"] == ["node"]]
    assert {n: c["condition"] for n, c in gateway["depends_on"].items()} == dict.fromkeys(
        nodes, "service_healthy"
    )
    for node in nodes:
        deps = services[node]["depends_on"]
        # its own Redis and MySQL, healthy, and the schema migration, done
        assert deps.pop("migrate") == {"condition": "service_completed_successfully"}
        assert all(c["condition"] == "service_healthy" for c in deps.values())
        assert len(deps) == 2


def test_compose_commands_exist_in_the_cli() -> None:
    for name, service in app_services().items():
        assert "entrypoint" not in service, name
        assert_real_cli(image_argv(service["command"]))


def test_gateway_settings_and_ring() -> None:
    gateway_name, gateway = next(
        (n, s) for n, s in app_services().items() if s["command"] == ["gateway"]
    )
    env = service_env(gateway_name)
    settings = GatewaySettings.from_env(env)  # the gateway's own checks (secret length, ...)
    assert settings.host == "0.0.0.0"
    published = [p for p in gateway["ports"] if interpolate(p).endswith(f":{settings.port}")]
    assert published, gateway["ports"]
    mounts = [interpolate(v).split(":") for v in gateway["volumes"]]
    (host_path,) = [m[0] for m in mounts if m[1] == settings.ring_file]
    ring_file = (DOCKER / host_path).resolve()
    assert ring_file == DOCKER / "ring.json"
    ring = RingDoc.load(ring_file)  # the gateway's own parser
    nodes = {n: s for n, s in app_services().items() if s["command"] == ["node"]}
    assert len(ring.nodes) == len(nodes) == SHARDS
    for spec in ring.nodes:
        url = urlsplit(spec.url)
        node_settings = NodeSettings.from_env(service_env(url.hostname))
        assert node_settings.name == spec.name
        # the node reads the same ring (it keeps the history of the users the ring gives it)
        node_mounts = [interpolate(v).split(":") for v in nodes[url.hostname].get("volumes", [])]
        assert [m[0] for m in node_mounts if m[1] == node_settings.ring_file] == [host_path]
        assert node_settings.host == "0.0.0.0"
        assert url.port == node_settings.port
        assert node_settings.node_secret == settings.node_secret


def test_compose_needs_a_jwt_secret_and_publishes_the_gateway_on_loopback() -> None:
    gateway = compose()["services"]["gateway"]
    with pytest.raises(Required):
        interpolate(str(gateway["environment"]["REDPACKET_JWT_SECRET"]), {})
    (published,) = gateway["ports"]
    assert interpolate(published).startswith("127.0.0.1:")
    assert interpolate(
        published, {**STACK_SECRETS, "REDPACKET_GATEWAY_BIND": "0.0.0.0"}
    ).startswith("0.0.0.0:")
    for node in ("node-0", "node-1"):
        assert urlsplit(service_env(node)["REDPACKET_REDIS_URL"]).password  # Redis wants one


def test_node_i_uses_redis_i_and_mysql_i() -> None:
    services = compose()["services"]
    nodes = sorted(n for n, s in app_services().items() if s["command"] == ["node"])
    seen_redis, seen_mysql = set(), set()
    for node in nodes:
        settings = NodeSettings.from_env(service_env(node))
        redis_host = urlsplit(settings.redis_url).hostname
        target = parse_mysql_url(settings.mysql_url)
        assert redis_host in services[node]["depends_on"]
        assert target.host in services[node]["depends_on"]
        assert default_image(services[redis_host]).startswith("redis:")
        mysql_env = service_env(target.host)
        assert (target.user, target.password, target.database) == (
            mysql_env["MYSQL_USER"],
            mysql_env["MYSQL_PASSWORD"],
            mysql_env["MYSQL_DATABASE"],
        )
        seen_redis.add(redis_host)
        seen_mysql.add(target.host)
    assert len(seen_redis) == len(seen_mysql) == len(nodes)  # no two shards share a store


# -- Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_and_ends_non_root() -> None:
    instructions = dockerfile_instructions()
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) >= 2, "not a multi-stage build"
    stage_names = {f.split()[-1] for f in froms if " AS " in f.upper()}
    copies_from = [rest for word, rest in final_stage() if word == "COPY" and "--from=" in rest]
    assert copies_from and all(re.search(r"--from=(\S+)", c)[1] in stage_names for c in copies_from)
    users = [rest for word, rest in final_stage() if word == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    assert user.isdigit(), "a numeric USER lets Kubernetes' runAsNonRoot verify it"
    assert [w for w, _ in final_stage()].index("USER") > max(
        i for i, (w, _) in enumerate(final_stage()) if w in ("RUN", "COPY")
    )


def test_dockerfile_command_exists_in_the_cli() -> None:
    assert_real_cli(image_argv())
    # the build stage's smoke test runs the installed console script
    runs = " ".join(rest for word, rest in dockerfile_instructions() if word == "RUN")
    assert "redpacket --help" in runs
    healthcheck = dict(final_stage())["HEALTHCHECK"]
    argv = exec_form(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert argv[:2] == ["python", "-c"]
    compile(argv[2], "HEALTHCHECK", "exec")
    assert "/healthz" in argv[2]


def test_build_context_has_what_pip_install_needs() -> None:
    """Every file of the package (per pyproject's package-dir and package-data), the
    metadata and the README that pyproject names are sent to the build and copied in."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    folders = sorted(set(setuptools["package-dir"].values()))
    needed = ["pyproject.toml", "setup.py", pyproject["project"]["readme"]]
    tracked = subprocess.run(
        ["git", "ls-files", "--", *folders], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert tracked, "git ls-files found no package files"
    needed += tracked
    left_out = [p for p in needed if dockerignore_excludes(p)]
    assert not left_out, f".dockerignore leaves out files `pip install .` needs: {left_out}"
    # and the build stage copies each package folder and the metadata
    copied: set[str] = set()
    for word, rest in dockerfile_instructions():
        if word == "COPY" and "--from=" not in rest:
            *sources, _dest = shlex.split(rest)
            copied.update(s.rstrip("/") for s in sources)
    assert set(folders) | {"pyproject.toml", "setup.py", pyproject["project"]["readme"]} <= copied
    # package data (Lua, SQL, JSON, static/) lives in those folders: test_packaging checks
    # that the wheel built from them holds every file
    # while the bulky and private things stay out
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "var/dev/cluster.json",
        ".cache/x",
        "tests/test_docker.py",
        "core/__pycache__/ids.cpython-311.pyc",
    ):
        assert dockerignore_excludes(path), f"{path} would be sent to the Docker daemon"


def test_compose_file_works_with_compose_v1_and_v2() -> None:
    """Debian's docker-compose 1.29 refuses a top-level `name:`; images and the base image
    come from the environment with the official images as defaults."""
    assert "name" not in compose()
    services = compose()["services"]
    for name, service in services.items():
        assert re.fullmatch(r"\$\{REDPACKET_(\w+_)?IMAGE:-[^}]+\}", service["image"]), name
    for service in app_services().values():
        assert service["build"]["args"]["BASE_IMAGE"].startswith("${REDPACKET_BASE_IMAGE:-")
    assert "ARG BASE_IMAGE=python:" in DOCKERFILE.read_text()
    froms = [rest for word, rest in dockerfile_instructions() if word == "FROM"]
    assert all(f.startswith("${BASE_IMAGE}") for f in froms), froms


# -- built and run on a real engine ----------------------------------------------------------

APP_INPUTS = ["pyproject.toml", "setup.py", "README.md", ".dockerignore", "docker/Dockerfile"]
STACK_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def app_image(eng: Engine, base: str) -> str:
    """The image of this tree, built once per content: its tag is a hash of everything the
    build reads (Dockerfile, metadata, package folders) and of the base image's id."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    inputs = [REPO / p for p in APP_INPUTS] + [
        REPO / folder for folder in sorted(set(setuptools["package-dir"].values()))
    ]
    tag = f"redpacket:test-{tree_hash(inputs, extra=[eng.image_id(base)])}"
    if not eng.image_exists(tag):
        eng.build(tag, REPO, DOCKERFILE, build_args={"BASE_IMAGE": base})
        for ref in eng.run("images", "--format", "{{.Tag}}", "redpacket").stdout.split():
            if ref.startswith("test-") and f"redpacket:{ref}" != tag:
                eng.run("rmi", f"redpacket:{ref}", check=False)
    return tag


@pytest.fixture(scope="module")
def stack_env() -> dict[str, str]:
    """The environment that points compose at the images to run (official or stand-ins)."""
    eng = engine()  # EngineUnavailable fails the test with the reason; never a skip
    base = base_image("python:3.12-slim-bookworm")
    return {
        "REDPACKET_BASE_IMAGE": base,
        "REDPACKET_IMAGE": app_image(eng, base),
        "REDPACKET_REDIS_IMAGE": base_image("redis:7.4"),
        "REDPACKET_MYSQL_IMAGE": base_image("mysql:8.4"),
        "REDPACKET_GATEWAY_PORT": str(free_port()),
        "REDPACKET_JWT_SECRET": JWT_SECRET,
        "REDPACKET_PAYMENTS_SECRET": PAYMENTS_SECRET,
    }


def topup(gateway: str, uid: int, amount: int) -> int:
    """One signed top-up through the compose gateway's payments webhook."""

    async def send() -> int:
        async with aiohttp.ClientSession() as session:
            status, _ = await send_topup(
                session, gateway, PAYMENTS_SECRET, uid=uid, amount=amount, topup_id=f"t-{uid}"
            )
            return status

    return asyncio.run(send())


def http(method: str, url: str, token: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return 0, str(exc)


def wait_until(what: str, condition: Any, timeout_s: float, interval_s: float = 1.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(interval_s)


def container_of(eng: Engine, project: str, service: str) -> str:
    """The container of a service, by compose's labels (the same in Compose v1 and v2); one
    that has exited too (the one-shot ``migrate``)."""
    out = eng.run(
        "ps",
        "-aq",
        "--filter",
        f"label=com.docker.compose.project={project}",
        "--filter",
        f"label=com.docker.compose.service={service}",
    ).stdout.split()
    assert len(out) == 1, f"{service}: containers {out}"
    return out[0]


def inspect(eng: Engine, container: str, template: str) -> str:
    return eng.run("inspect", "-f", template, container).stdout.strip()


@pytest.mark.container
@pytest.mark.timeout(1800)  # a cold first run builds images for minutes
def test_the_compose_stack_serves_a_crowd_survives_a_node_crash_and_keeps_its_ledger(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    eng = engine()
    project = f"rptest{os.getpid()}"
    cmd = eng.compose_cmd(project, [COMPOSE_FILE])
    gateway = f"http://127.0.0.1:{stack_env['REDPACKET_GATEWAY_PORT']}"
    ok = False
    try:
        started = time.monotonic()
        run([*cmd, "up", "-d", "--no-build"], env=stack_env, timeout=STACK_TIMEOUT_S)
        wait_until(
            "the gateway's /readyz/shards (every shard up)",
            lambda: http("GET", f"{gateway}/readyz/shards", "")[0] == 200,
            STACK_TIMEOUT_S,
        )
        containers = {s: container_of(eng, project, s) for s in compose()["services"]}
        assert inspect(eng, containers.pop("migrate"), "{{.State.ExitCode}}") == "0"

        def all_healthy() -> bool:
            return all(
                inspect(eng, c, "{{.State.Health.Status}}") == "healthy"
                for c in containers.values()
            )

        wait_until("every container's healthcheck", all_healthy, 60)
        print(f"stack healthy after {time.monotonic() - started:.0f} s")

        # a crowd of users through the gateway, with the real CLI
        demo = subprocess.run(
            [sys.executable, "-m", "redpacket.cli", "demo", "--url", gateway, "--users", "120"],
            capture_output=True,
            text=True,
            timeout=300,
            env={
                **os.environ,
                "REDPACKET_JWT_SECRET": JWT_SECRET,
                "REDPACKET_PAYMENTS_SECRET": PAYMENTS_SECRET,  # the demo pays in first
            },
        )
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "DO NOT match" not in demo.stdout and "match" in demo.stdout, demo.stdout

        # a node crashes (SIGKILL of its process, as the OOM killer would) and comes back
        sender, opener = mint_token(JWT_SECRET, 8801, "sender"), mint_token(JWT_SECRET, 8802, "u")
        assert topup(gateway, 8801, 1000) == 201
        status, created = http(
            "POST",
            f"{gateway}/v1/red-packets",
            sender,
            {"total_amount": 1000, "total_packet": 5, "greeting": "crash"},
        )
        assert status == 201, created
        packet_id = created["red_packet_id"]
        status, first = http("POST", f"{gateway}/v1/red-packets/{packet_id}/open", opener)
        assert status == 200, first
        ring = json.loads((DOCKER / "ring.json").read_text())
        owner = Ring([NodeSpec(n["name"], n["url"]) for n in ring["nodes"]]).owner(
            snowflake_of(packet_id)
        )
        service = urlsplit(owner.url).hostname or ""
        container = container_of(eng, project, service)
        restarts = int(inspect(eng, container, "{{.RestartCount}}"))
        os.kill(int(inspect(eng, container, "{{.State.Pid}}")), signal.SIGKILL)
        answers = []

        def retried_open_answers() -> bool:
            answers.append(http("POST", f"{gateway}/v1/red-packets/{packet_id}/open", opener))
            return answers[-1][0] == 200

        wait_until(f"{service} back after a crash", retried_open_answers, 180, 0.5)
        again = answers[-1][1]
        assert again["amount"] == first["amount"] and again["replayed"] is True, (first, again)
        assert int(inspect(eng, container, "{{.RestartCount}}")) == restarts + 1
        assert {s for s, _ in answers[:-1]} <= {503, 502, 0}, answers  # unavailable, never wrong

        # the ledger of both shards, checked from inside the stack's network by the image
        check_ring = tmp_path / "check-ring.json"
        password = service_env("mysql-0")["MYSQL_PASSWORD"]
        redis_password = service_env("redis-0")["REDISCLI_AUTH"]
        check_ring.write_text(
            json.dumps(
                {
                    "version": 1,
                    "nodes": [
                        {
                            **n,
                            "redis": f"redis://:{redis_password}@redis-{i}:6379/0",
                            "mysql": f"mysql://redpacket:{password}@mysql-{i}:3306/redpacket",
                        }
                        for i, n in enumerate(ring["nodes"])
                    ],
                }
            )
        )
        check_ring.chmod(0o644)
        check = eng.run(
            "run", "--rm", "--network", f"{project}_default",
            "-v", f"{check_ring}:/etc/redpacket/check-ring.json:ro",
            stack_env["REDPACKET_IMAGE"], "check", "--ring", "/etc/redpacket/check-ring.json",
            check=False, timeout=180,
        )  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        assert re.search(r"^OK: \d+ red packets", check.stdout, re.M), check.stdout
        ok = True
    finally:
        if not ok:
            logs = run([*cmd, "logs", "--tail", "40"], env=stack_env, check=False, timeout=120)
            print(logs.stdout[-12000:], logs.stderr[-2000:])
        down = run([*cmd, "down", "-v", "--remove-orphans"], env=stack_env, check=False)
        assert down.returncode == 0, down.stderr
        leftover = eng.run(
            "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}"
        )
        assert not leftover.stdout.split(), f"down -v left volumes: {leftover.stdout}"

"""docker/Dockerfile, .dockerignore and docker/docker-compose.yml, checked without a Docker
engine (there is none here): the compose file against the Compose Specification's JSON
schema, every service's healthcheck, the commands both files run against the real CLI, the
settings each container gets against the services' own settings classes, and the build
context against what `pip install .` needs.

The Compose schema comes from the PyPI package check-jsonschema, which vendors it
(``check_jsonschema/builtin_schemas/vendor/compose-spec.json``); if that package is not
installed it is installed (without its dependencies, nothing imported) into ``.cache/``.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from redpacket.cli.main import build_parser
from redpacket.gateway.settings import GatewaySettings
from redpacket.node.ledger import parse_mysql_url
from redpacket.node.settings import NodeSettings
from redpacket.sharding.ring import RingDoc
from tests.helm_tool import REPO, pip_target

DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"
CHECK_JSONSCHEMA = ("check-jsonschema", "0.39.0")
COMPOSE_SCHEMA = Path("check_jsonschema", "builtin_schemas", "vendor", "compose-spec.json")
SHARDS = 2


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


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR}, ${VAR:-default} and $$ with an empty (or given) environment."""
    env = env or {}

    def sub(m: re.Match[str]) -> str:
        if m[0] == "$$":
            return "$"
        name, default = m["name"], m["default"] or ""
        return env.get(name) or default

    return re.sub(
        r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}", sub, value
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
    images = {name: s.get("image", "") for name, s in services.items()}
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
        assert all(c["condition"] == "service_healthy" for c in deps.values())
        assert len(deps) == 2  # its own Redis and MySQL


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
        assert services[redis_host]["image"].startswith("redis:")
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
    needed = ["pyproject.toml", pyproject["project"]["readme"]]
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
    assert set(folders) | {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    # package data (Lua scripts, schema.sql, openapi.json) is inside those folders
    for package, patterns in setuptools.get("package-data", {}).items():
        folder = setuptools["package-dir"][package]
        for pattern in patterns:
            assert any(
                fnmatch.fnmatch(Path(p).name, pattern) and p.startswith(folder + "/")
                for p in tracked
            ), f"{package}: no file matches {pattern}"
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

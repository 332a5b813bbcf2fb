"""A real container engine for the tests that build and run images (test_docker, fresh machine).

``engine()`` makes sure one runs and returns how to drive it:

- the Docker CLI and daemon come from Debian's ``docker.io`` (installed with apt when
  missing, with ``docker-compose`` and ``debootstrap``); when no daemon answers, ``dockerd``
  is started directly in the background (these machines have no systemd), its output in
  ``.cache/containers/dockerd.log``, and left running for the next test run;
- compose is ``docker compose`` (v2) when the CLI has it, else Debian's ``docker-compose``
  (v1.29): ``docker/docker-compose.yml`` works with both.

``base_image(official)`` returns an image to build or run from: the official one when it is
already here or can be pulled, else a local stand-in made from Debian packages, built once
and then reused (its tag carries a hash of what it is made from):

- ``redpacket-standin/debian:bookworm-*``: a minimal bookworm root filesystem made by
  ``debootstrap`` with the host's apt sources, imported with ``docker import``;
- ``redpacket-standin/python``, ``.../redis``, ``.../mysql``: built FROM it with Debian's
  python3 (3.11), redis-server (7.0) and mariadb-server (10.11); see docker/standins/.

Nothing here skips: when an engine cannot be had, ``EngineUnavailable`` says exactly why.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "containers"
DOCKERD_LOG = CACHE / "dockerd.log"
STANDINS = REPO / "docker" / "standins"
DEBIAN_PACKAGES = ["docker.io", "docker-compose", "debootstrap"]
DEBIAN_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
PULL_TIMEOUT_S = 90
# Bump when debian_base() makes a different root filesystem: the tag changes, it is rebuilt.
BASE_RECIPE = "2"

# official image -> (stand-in folder under docker/standins/, stand-in repository)
STANDIN_FOR = {
    "python": ("python", "redpacket-standin/python"),
    "redis": ("redis", "redpacket-standin/redis"),
    "mysql": ("mysql", "redpacket-standin/mysql"),
}


class EngineUnavailable(RuntimeError):
    """No container engine could be installed or started here; the message says why."""


def say(message: str) -> None:
    """Progress of slow steps (image builds), on stderr: shown with -s or on failure."""
    print(f"[containers] {message}", file=sys.stderr, flush=True)


def _root_prefix() -> list[str]:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo"):
        return ["sudo", "-n"]
    raise EngineUnavailable(
        "not root and no sudo: cannot install docker.io or start dockerd on this machine"
    )


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass(frozen=True)
class Engine:
    docker: str
    compose: tuple[str, ...]

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 600,
        input: bytes | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return run([self.docker, *args], check=check, timeout=timeout, env=env, cwd=cwd)

    def compose_cmd(self, project: str, files: Sequence[Path]) -> list[str]:
        cmd = [*self.compose, "-p", project]
        for f in files:
            cmd += ["-f", str(f)]
        return cmd

    def image_exists(self, ref: str) -> bool:
        return self.run("image", "inspect", ref, check=False, timeout=60).returncode == 0

    def image_id(self, ref: str) -> str:
        return self.run("image", "inspect", "-f", "{{.Id}}", ref).stdout.strip()

    def build(
        self,
        tag: str,
        context: Path,
        dockerfile: Path | None = None,
        build_args: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
    ) -> None:
        cmd = ["build", "-t", tag]
        if dockerfile is not None:
            cmd += ["-f", str(dockerfile)]
        for k, v in (build_args or {}).items():
            cmd += ["--build-arg", f"{k}={v}"]
        for k, v in (labels or {}).items():
            cmd += ["--label", f"{k}={v}"]
        say(f"building {tag} (first time only; later runs reuse it)")
        started = time.monotonic()
        # The legacy builder: Debian's dockerd has no buildx, and it needs nothing else.
        self.run(*cmd, str(context), timeout=1800, env={"DOCKER_BUILDKIT": "0"})
        say(f"built {tag} in {time.monotonic() - started:.0f} s")

    def remove_other_tags(self, repository: str, keep: str) -> None:
        """Drop older hash tags of one of our repositories so they do not pile up."""
        out = self.run(
            "images", "--format", "{{.Repository}}:{{.Tag}}", repository, check=False
        ).stdout
        for ref in out.split():
            if ref != keep and ref.startswith(repository + ":"):
                self.run("rmi", ref, check=False)


def run(
    cmd: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise with its output, so a failing test shows the reason."""
    full_env = {**os.environ, **(env or {})}
    try:
        proc = subprocess.run(
            list(cmd),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{' '.join(cmd)}: no result after {timeout} s") from exc
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def _install_debian_packages(packages: Iterable[str]) -> None:
    if not shutil.which("apt-get"):
        raise EngineUnavailable(
            f"no apt-get on this machine: install {' '.join(packages)} (a Docker engine, "
            "compose and debootstrap) by hand"
        )
    sudo = _root_prefix()
    say(f"installing {' '.join(packages)} with apt-get")
    try:
        run([*sudo, "apt-get", "update", "-q"], timeout=600)
        run(
            [
                *sudo,
                "env",
                "DEBIAN_FRONTEND=noninteractive",
                "apt-get",
                "install",
                "-yq",
                *packages,
            ],
            timeout=1200,
        )
    except RuntimeError as exc:
        raise EngineUnavailable(f"apt-get could not install {' '.join(packages)}: {exc}") from exc


def _daemon_answers(docker: str) -> bool:
    probe = subprocess.run(
        [docker, "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return probe.returncode == 0 and bool(probe.stdout.strip())


def _start_dockerd() -> None:
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not Path(dockerd).exists():
        raise EngineUnavailable("dockerd is not installed (Debian package docker.io)")
    CACHE.mkdir(parents=True, exist_ok=True)
    say(f"starting dockerd in the background (log: {DOCKERD_LOG})")
    with DOCKERD_LOG.open("ab") as log:
        # Its own session: it outlives this test run and is reused by the next one.
        subprocess.Popen(
            [*_root_prefix(), dockerd],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


@functools.cache
def engine() -> Engine:
    """A running engine and a compose that works with it, or EngineUnavailable saying why."""
    missing = [
        pkg
        for pkg, tool in (
            ("docker.io", "dockerd"),
            ("docker-compose", "docker-compose"),
            ("debootstrap", "debootstrap"),
        )
        if not (shutil.which(tool) or Path("/usr/sbin", tool).exists())
    ]
    if missing:
        _install_debian_packages(missing)
    docker = shutil.which("docker")
    if docker is None:
        raise EngineUnavailable("no docker CLI after installing docker.io")
    if not _daemon_answers(docker):
        _start_dockerd()
        deadline = time.monotonic() + 90
        while not _daemon_answers(docker):
            if time.monotonic() > deadline:
                raise EngineUnavailable(
                    f"dockerd did not answer within 90 s; last lines of {DOCKERD_LOG}:\n"
                    + _tail(DOCKERD_LOG)
                )
            time.sleep(1)
    v2 = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, check=False)
    compose: tuple[str, ...] = (
        (docker, "compose") if v2.returncode == 0 else (shutil.which("docker-compose") or "",)
    )
    if not compose[0]:
        raise EngineUnavailable("neither `docker compose` nor docker-compose is available")
    return Engine(docker=docker, compose=compose)


# -- images -----------------------------------------------------------------------------------


def tree_hash(paths: Iterable[Path], extra: Iterable[str] = ()) -> str:
    """A hash of files' names and contents (folders walked, bytecode skipped) and extra strings."""
    digest = hashlib.sha256()
    for item in extra:
        digest.update(item.encode() + b"\0")
    for top in paths:
        files = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top]
        for f in files:
            if "__pycache__" in f.parts or f.suffix in {".pyc", ".pyo"}:
                continue
            digest.update(str(f.relative_to(REPO)).encode() + b"\0")
            digest.update(f.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _pullable(eng: Engine, ref: str) -> bool:
    if eng.image_exists(ref):
        return True
    if os.environ.get("REDPACKET_NO_PULL"):
        return False
    try:
        pulled = eng.run("pull", ref, check=False, timeout=PULL_TIMEOUT_S)
    except RuntimeError:
        return False
    return pulled.returncode == 0


def _host_config_into(rootfs: Path) -> None:
    """The host's apt sources and proxy settings, and its local CA certificates, inside the
    image: what the host reaches (apt, PyPI through a TLS-inspecting proxy), images reach.

    The CAs in /usr/local/share/ca-certificates are trusted once ``ca-certificates`` is
    installed in an image (its postinst runs update-ca-certificates)."""
    local_cas = Path("/usr/local/share/ca-certificates")
    if local_cas.is_dir():
        shutil.copytree(local_cas, rootfs / local_cas.relative_to("/"), dirs_exist_ok=True)
    listed = Path("/etc/apt/sources.list.d").glob("*")
    sources = [
        Path("/etc/apt/sources.list"),
        *sorted(p for p in listed if p.suffix in {".list", ".sources"}),
    ]
    copied = False
    for src in sources:
        if src.is_file() and src.read_text(errors="replace").strip():
            dest = rootfs / src.relative_to("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            copied = True
    if copied:
        with contextlib.suppress(FileNotFoundError):
            # debootstrap's own one-line sources.list would list the mirror twice
            if any(p.suffix == ".sources" for p in sources if p.exists()):
                (rootfs / "etc/apt/sources.list").unlink()
    for conf in Path("/etc/apt/apt.conf.d").glob("*"):
        if conf.is_file() and "proxy" in conf.read_text(errors="replace").lower():
            shutil.copyfile(conf, rootfs / "etc/apt/apt.conf.d" / conf.name)


def _host_mirror() -> str:
    for src in [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]:
        if src.is_file():
            for word in src.read_text(errors="replace").split():
                if word.startswith("http") and word.rstrip("/").endswith("/debian"):
                    return word
    return DEBIAN_MIRROR


def debian_base(eng: Engine) -> str:
    """A minimal Debian bookworm image from debootstrap, imported once and reused."""
    version = hashlib.sha256(f"{SUITE}:{BASE_RECIPE}".encode()).hexdigest()[:12]
    ref = f"redpacket-standin/debian:{SUITE}-{version}"
    if eng.image_exists(ref):
        return ref
    if not shutil.which("debootstrap") and not Path("/usr/sbin/debootstrap").exists():
        _install_debian_packages(["debootstrap"])
    mirror = _host_mirror()
    say(f"debootstrap {SUITE} from {mirror} (about a minute)")
    with tempfile.TemporaryDirectory(prefix="redpacket-rootfs-") as tmp:
        rootfs = Path(tmp, "rootfs")
        run(
            [*_root_prefix(), "debootstrap", "--variant=minbase", SUITE, str(rootfs), mirror],
            timeout=1200,
        )
        _host_config_into(rootfs)
        # Like the official images: no apt caches, no docs, no recommends.
        (rootfs / "etc/apt/apt.conf.d/90redpacket-standin").write_text(
            'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n'
        )
        tarball = Path(tmp, "rootfs.tar")
        with tarfile.open(tarball, "w") as tar:
            for child in sorted(rootfs.iterdir()):
                tar.add(child, arcname=child.name)
        run(
            [
                eng.docker,
                "import",
                "--change",
                'CMD ["/bin/bash"]',
                "--change",
                "ENV LANG=C.UTF-8",
                str(tarball),
                ref,
            ],
            timeout=600,
        )
    eng.remove_other_tags("redpacket-standin/debian", ref)
    return ref


def base_image(official: str) -> str:
    """``official`` if it is here or pullable, else the Debian stand-in for it (built once)."""
    eng = engine()
    if _pullable(eng, official):
        return official
    name = official.split(":", 1)[0].rsplit("/", 1)[-1]
    if name not in STANDIN_FOR:
        raise EngineUnavailable(f"cannot pull {official} and there is no stand-in for it")
    folder, repository = STANDIN_FOR[name]
    base = debian_base(eng)
    ref = f"{repository}:{tree_hash([STANDINS / folder], extra=[base])}"
    if not eng.image_exists(ref):
        eng.build(ref, STANDINS / folder, build_args={"BASE_IMAGE": base})
        eng.remove_other_tags(repository, ref)
    return ref

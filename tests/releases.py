"""The releases CHANGELOG.md lists (newest first): version, commit, schema version.

The rolling-upgrade test and the migration rules read the previous release from here rather
than from git tags, which may not travel with a clone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CHANGELOG = Path(__file__).resolve().parent.parent / "CHANGELOG.md"


@dataclass(frozen=True)
class Release:
    version: str
    commit: str  # "unreleased" for the release being made
    schema: int  # the schema version its code needs (its highest migration)


def releases() -> list[Release]:
    found = []
    for block in re.split(r"^## ", CHANGELOG.read_text("utf-8"), flags=re.M)[1:]:
        version = block.split("\n", 1)[0].strip()
        commit = re.search(r"^- commit: (\S+)", block, re.M)
        schema = re.search(r"^- schema: (\d+)", block, re.M)
        assert commit and schema, f"CHANGELOG.md: release {version} lacks its commit or schema"
        found.append(Release(version, commit[1], int(schema[1])))
    return found


def previous_release() -> Release:
    """The newest release that has a commit (the one this code must upgrade from)."""
    return next(r for r in releases() if r.commit != "unreleased")

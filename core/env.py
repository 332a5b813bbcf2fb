"""Typed readers for ``REDPACKET_*`` environment variables.

Each service turns the environment into one frozen settings dataclass at start; these
readers make a wrong value fail loudly at that moment instead of deep inside a request.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot use."""


REDIS_PASSWORD_FILE = "REDPACKET_REDIS_PASSWORD_FILE"
MYSQL_PASSWORD_FILE = "REDPACKET_MYSQL_PASSWORD_FILE"


def password_from_file(variable: str, env: Mapping[str, str] | None = None) -> str | None:
    """The password in the file the variable names (as Kubernetes mounts a Secret), without
    its trailing newline; None when the variable is unset. Nodes, the checker and every tool
    read store passwords this way or from the store's URL (the URL wins)."""
    path = (os.environ if env is None else env).get(variable, "")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().rstrip("\r\n")
    except OSError as exc:
        raise SettingsError(f"{variable}: cannot read {path}: {exc.strerror}") from None


def env_str(env: Mapping[str, str], name: str, default: str) -> str:
    return env.get(name, default)


def env_int(env: Mapping[str, str], name: str, default: int, *, minimum: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name} must be >= {minimum}, got {value}")
    return value


def env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise SettingsError(f"{name} must not be negative, got {value}")
    return value


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def environ() -> Mapping[str, str]:
    return os.environ

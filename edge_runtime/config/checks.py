"""Value checks of config keys that need more than a range (used by :mod:`edge_runtime.config.model`).

Each returns a check: a function of the value giving "" when it is good, else
what is wrong (typed_toml names the key).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edge_runtime._util.strict_text import parse_decimal
from edge_runtime.errors import ConfigError

__all__ = ["listen", "url"]


def listen(value: str) -> str:
    """``HOST:PORT`` or ``unix:/absolute/path``."""
    if value.startswith("unix:"):
        return "" if value[5:].startswith("/") else "unix socket path must be absolute (unix:/run/...)"
    host, sep, port = value.rpartition(":")
    try:  # not str.isdigit(): '²' passes it, and int() then raises
        number = parse_decimal(port, "port", max_digits=5, error=ConfigError)
    except ConfigError:
        number = -1
    if not sep or not host or not 0 <= number <= 65535:
        return f"must be HOST:PORT or unix:/PATH, got {value!r}"
    return ""


def url(*schemes: str) -> Callable[[Any], str]:
    """Empty, or a URL with one of ``schemes``."""
    return lambda v: "" if not v or (v.split("://", 1)[0] in schemes and "://" in v) else (
        f"must be a URL with scheme {' or '.join(schemes)}")

"""Build frozen dataclasses from TOML tables, strictly.

Unknown keys are rejected, every value is type-checked against the field's
annotation, and each error names the full dotted key. Supported annotations:
str, int, float, bool, pathlib.Path, Optional[...] (``X | None``),
``tuple[X, ...]`` and nested dataclasses. A field may carry a validator in its
metadata: ``field(metadata={"check": fn})`` where ``fn(value)`` returns an error
text or "".
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from edge_runtime._util.fsutil import CappedReadError, read_capped
from edge_runtime.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 on JetPack 6
    import tomli as tomllib

__all__ = ["build", "in_range", "load_toml", "parse_toml"]

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def in_range(lo: float, hi: float) -> Callable[[Any], str]:
    """Validator: the number lies in [lo, hi]."""
    return lambda v: "" if lo <= v <= hi else f"must be between {lo:g} and {hi:g}, got {v!r}"


def parse_toml(text: str, where: str) -> dict[str, Any]:
    """Parse TOML text; raise ConfigError naming ``where`` on a syntax error."""
    try:
        table: dict[str, Any] = tomllib.loads(text)
        return table
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: invalid TOML: {e}") from e


def load_toml(path: Path, max_bytes: int = 1 << 20) -> dict[str, Any]:
    """Read and parse a TOML file of at most ``max_bytes``.

    Raises:
        ConfigError: unreadable, too large, not UTF-8 or not TOML.
    """
    try:
        raw = read_capped(path, max_bytes, follow_symlinks=True)  # a user-named file: links and pipes allowed
    except CappedReadError as e:
        raise ConfigError(f"{path}: larger than {e.limit} bytes") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8") from e
    return parse_toml(text, str(path))


def build(cls: type[T], table: Mapping[str, Any], where: str = "", base: Path | None = None) -> T:
    """Build dataclass ``cls`` from ``table``; relative Paths resolve against ``base``.

    Raises:
        ConfigError: unknown key, missing required key, or a bad value, naming it.
    """
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where or 'config'} must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in table:
        if key not in fields:
            raise ConfigError.unknown_key(_join(where, key))
    kwargs: dict[str, Any] = {}
    for name, fld in fields.items():
        key = _join(where, name)
        if name not in table:
            if fld.default is _MISSING and fld.default_factory is _MISSING:
                raise ConfigError("is required", key=key)
            continue
        value = _convert(hints[name], table[name], key, base)
        check: Callable[[Any], str] | None = fld.metadata.get("check")
        if check is not None and (problem := check(value)):
            raise ConfigError(problem, key=key, form="check")
        kwargs[name] = value
    return cls(**kwargs)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _convert(tp: Any, value: Any, key: str, base: Path | None) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(args[0], value, key, base)
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, list):
            raise ConfigError("must be a list", key=key)
        return tuple(_convert(item_tp, v, f"{key}[{i}]", base) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, base)  # type: ignore[arg-type]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError("must be true or false", key=key)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError("must be an integer", key=key)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError("must be a number", key=key)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError("must be a string", key=key)
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError("must be a non-empty path string", key=key)
        path = Path(value).expanduser()
        return path if path.is_absolute() or base is None else base / path
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # programming error

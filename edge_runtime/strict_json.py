"""JSON decoding helpers for documents from the network (channel documents, commands)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["unique_keys"]

PairsHook = Callable[[list[tuple[str, Any]]], dict[str, Any]]


def unique_keys(make_error: Callable[[str], Exception]) -> PairsHook:
    """An ``object_pairs_hook`` that refuses a repeated key with ``make_error(message)``.

    Two parsers could disagree on which of two values wins (a signed document read
    one way by the signer and another by the device), so the ambiguity is refused.
    """

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise make_error(f"repeats the key {key[:64]!r}")
            out[key] = value
        return out

    return hook

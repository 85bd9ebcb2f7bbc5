"""Operator pins, read from the cache state: which version of a model an operator froze.

A pin freezes *automatic* updates: the OTA poller skips a pinned model
(:func:`pinned_version`), and serving another version than the pinned one is
refused (:func:`pin_refusal`) until ``pin``/``unpin`` change it. Both the fleet
commands and OTA ask here, so neither has to know the other.
"""

from __future__ import annotations

from edge_runtime.cache.versions import ModelCache

__all__ = ["pin_refusal", "pinned_version"]


def pinned_version(cache: ModelCache, name: str) -> int | None:
    """The version of ``name`` an operator pinned, or None. The OTA poller skips pinned models.

    Raises CacheError: the state file is corrupt.
    """
    return cache.state.load().model(name).pinned


def pin_refusal(cache: ModelCache, name: str, serving: int | None = None) -> str | None:
    """Why serving ``serving`` of ``name`` (None: whichever a rollback picks) is refused, or None when it is not.

    The pin wins over a rollback or an activation: it is the operator's standing
    decision, changed only with ``pin``/``unpin``, so ``status``, ``models list``
    and the events never show a pin the device does not serve.

    Raises CacheError: the state file is corrupt.
    """
    pinned = pinned_version(cache, name)
    if pinned is None or pinned == serving:
        return None
    return f"{name} is pinned to v{pinned}: unpin it first, or pin the version to serve"

"""Publisher keys delivered by the TUF repository, and what a revocation does to the cache.

The repository's target ``trust/publisher-keys.json`` (:mod:`edge_runtime.bundle.publisher_keys`)
names the keys that sign bundle manifests. A device keeps the newest one it verified in
``<state>/trust/`` (0600), where it replaces the trust dir's ``*.pub`` files. When the set changes,
every cached version whose manifest no longer verifies with it (signed only by a revoked key) is
removed: active ones are first swapped for the newest version that still verifies, and the
anti-rollback floor is recomputed from what remains, so a version a leaked key signed (even one
numbered 2^53) stops counting. The repository's own target of that model is installed right after,
in the same poll.
"""

from __future__ import annotations

import logging

from edge_runtime._util.fsutil import atomic_write, make_private_dir
from edge_runtime.bundle.publisher_keys import parse_publisher_keys
from edge_runtime.errors import EdgeRuntimeError, SignatureError
from edge_runtime.telemetry.events import EventBus
from edge_runtime.update.activation import Activator
from edge_runtime.update.store import ModelStore

__all__ = ["adopt_publisher_keys", "sweep_revoked"]

_log = logging.getLogger(__name__)


def adopt_publisher_keys(store: ModelStore, data: bytes) -> bool:
    """Keep ``data`` (verified by TUF) as the device's publisher keys; False when they did not change.

    Raises:
        ManifestError: not a valid publisher-keys document (nothing changes).
    """
    parsed = parse_publisher_keys(data)
    path = store.trust.delivered
    assert path is not None
    make_private_dir(path.parent)
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    atomic_write(path, data, 0o600)
    _log.warning("publisher keys now %s (threshold %d), delivered by the update repository",
                 ", ".join(k[:16] for k in sorted(parsed.keys)), parsed.threshold)
    return True


def sweep_revoked(store: ModelStore, activator: Activator | None, events: EventBus) -> dict[str, list[int]]:
    """Remove every cached version that no longer verifies with the keys trusted now; name -> removed."""
    cache = store.cache
    removed: dict[str, list[int]] = {}
    for name in cache.names():
        versions = cache.versions(name)
        bad = [v for v in versions if not _verifies(store, name, v)]
        if not bad:
            continue
        good = [v for v in versions if v not in bad]
        active = cache.active_version(name)
        if active in bad and good:
            try:
                if activator is not None:
                    activator.rollback(name, good[-1], reason=f"v{active} is signed only by a revoked key", kind=None)
                else:
                    cache.rollback(name, good[-1])
            except EdgeRuntimeError as e:
                _log.error("cannot move %s off revoked v%s: %s", name, active, e.one_line())
        floor = min(cache.remove_revoked(name, version) for version in bad)  # the last removal's is the lowest
        removed[name] = bad
        events.emit("versions_revoked", model=name, version=cache.active_version(name),
                    reason=f"{', '.join(f'v{v}' for v in bad)} signed only by revoked keys: removed; "
                           f"anti-rollback floor now v{floor}", removed=bad, floor=floor)
    return removed


def _verifies(store: ModelStore, name: str, version: int) -> bool:
    try:
        store.cache.manifest(name, version)  # the signature is re-checked with the keys trusted now
    except SignatureError:
        return False
    except EdgeRuntimeError as e:  # unreadable or corrupt: the cache's own recovery deals with it
        _log.warning("%s v%s not checked against the new keys: %s", name, version, e.one_line())
    return True


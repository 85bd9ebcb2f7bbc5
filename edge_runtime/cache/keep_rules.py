"""Which cached versions are kept and which may go (behind :meth:`ModelCache.gc` and its kin).

A version is never deleted while it is active, previous, pinned or one of a
probation record's two versions, and nothing is deleted while a link is
corrupt (what it held is unknown). Deleting is one rename into a trash
dot-entry, then the delete: a crash in between leaves the dot-entry, which
recovery (:mod:`edge_runtime.cache.recovery`) removes, never a half-deleted
version dir.
"""

from __future__ import annotations

import os

from edge_runtime._util.fsutil import fsync_dir, remove_tree
from edge_runtime.cache.layout import CacheLayout, Fault, cache_errors, read_link
from edge_runtime.cache.state import State, StateStore
from edge_runtime.errors import CacheError

__all__ = ["GC_STEPS", "collect_old", "removable_versions", "remove_revoked", "remove_version"]

GC_STEPS = ("gc:trashed", "gc:removed")


def collect_old(layout: CacheLayout, state: StateStore, name: str, keep_versions: int, fault: Fault) -> list[int]:
    """Delete versions older than the newest ``keep_versions``; return those deleted.

    Never deletes active, previous, pinned or a probation record's
    versions; deletes nothing while a link is corrupt.
    Raises CacheError: the state is corrupt or the file system failed.
    """
    with state.locked(), cache_errors(f"cannot collect old versions of {name}"):
        versions = removable_versions(layout, state, name)
        newest = set(layout.versions(name)[-keep_versions:])
        removed = [v for v in versions if v not in newest]
        for version in removed:
            _trash(layout, name, version, fault)
        return removed


def removable_versions(layout: CacheLayout, state: StateStore, name: str) -> list[int]:
    """Versions of ``name`` that may ever be deleted, oldest first: not active, previous, pinned
    or a probation record's; none while a link is corrupt. Raises CacheError: the state is corrupt."""
    with state.locked():
        try:
            keep = {layout.link_version(name, "active"), layout.link_version(name, "previous")}
        except CacheError:
            return []
        model = state.load().model(name)
        keep |= {model.pinned}
        if model.probation is not None:
            keep |= {model.probation.version, model.probation.previous}
        return [v for v in layout.versions(name) if v not in keep]


def remove_version(layout: CacheLayout, state: StateStore, name: str, version: int, fault: Fault) -> None:
    """Delete one version that :func:`removable_versions` lists (to make room before an install).

    Raises CacheError: the version is not removable (any more), or the file system failed.
    """
    with state.locked(), cache_errors(f"cannot remove {name} v{version}"):
        if version not in removable_versions(layout, state, name):
            raise CacheError(f"{name} v{version} is active, previous, pinned or on probation: kept")
        _trash(layout, name, version, fault)


def remove_revoked(layout: CacheLayout, state: StateStore, name: str, version: int, fault: Fault) -> int:
    """Delete a version whose manifest no longer verifies with the keys trusted now, whatever it is.

    Unlike :func:`remove_version` an active or previous version goes too (its link is removed: the
    daemon may still serve it from memory until the next swap), and a pin or probation record of it is
    dropped. The anti-rollback floor is then recomputed from the versions that remain, so a version
    signed by a revoked key stops pinning it. Returns the new floor.

    Raises CacheError: the file system failed or the state is corrupt.
    """
    with state.locked(), cache_errors(f"cannot remove revoked {name} v{version}"):
        ndir = layout.name_dir(name)
        for which in ("active", "previous"):
            if read_link(ndir / which) == version:
                (ndir / which).unlink()
        fsync_dir(ndir)
        if layout.is_version_dir(name, version):
            _trash(layout, name, version, fault)
        remaining = [v for v in layout.versions(name) if v != version]
        floor = max(remaining, default=0)

        def forget(s: State) -> State:
            model = s.model(name)
            probation = model.probation
            if probation is not None and version in (probation.version, probation.previous):
                probation = None
            return s.with_model(name, highest=floor, pinned=None if model.pinned == version else model.pinned,
                                probation=probation)

        state.update(forget)
        return floor


def _trash(layout: CacheLayout, name: str, version: int, fault: Fault) -> None:
    ndir = layout.name_dir(name)
    # Rename first: a crash mid-delete leaves a dot-entry that
    # recover() removes, never a half-deleted "version" dir.
    trash = ndir / f".trash-{version}-{os.getpid()}"
    (ndir / str(version)).rename(trash)
    fsync_dir(ndir)
    fault("gc:trashed")
    remove_tree(trash)
    fault("gc:removed")

"""Start-up repair of the model cache (behind :meth:`ModelCache.recover`).

Every cache change is ordered so that any prefix of it leaves a complete,
hash-valid version active; what a crash can leave behind is removed here:
staging leftovers of dead processes, temp files, trash and stray dot-entries, and links that
are missing, corrupt, dangling or point at a version that fails its hashes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from edge_runtime._util.fsutil import fsync_dir, remove_tree
from edge_runtime.bundle.manifest import is_valid_name
from edge_runtime.bundle.staging_owner import sweep_staging
from edge_runtime.cache.layout import CacheLayout, cache_errors, read_link
from edge_runtime.cache.state import StateStore
from edge_runtime.errors import CacheError, EdgeRuntimeError

__all__ = ["recover_cache"]

Verify = Callable[[str, int], None]
"""``verify(name, version)``: re-hash a cached version; raise EdgeRuntimeError if it is not valid."""


def recover_cache(layout: CacheLayout, state: StateStore, verify: Verify) -> list[str]:
    """Repair the cache at start-up; return one human-readable note per repair.

    See :meth:`~edge_runtime.cache.versions.ModelCache.recover`.
    Raises CacheError: the state file is corrupt or the file system failed.
    """
    notes: list[str] = []
    with state.locked(), cache_errors("cannot recover the model cache"):
        notes += sweep_staging(layout.staging)  # a live CLI's install keeps its staging dir
        with os.scandir(layout.root) as it:
            for entry in it:
                temp = entry.name[:1] == "." and entry.name.endswith(".tmp")
                if temp and not entry.is_dir(follow_symlinks=False):
                    Path(entry.path).unlink()
                    notes.append(f"removed stray temp file {entry.name}")
        with os.scandir(layout.models) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if is_valid_name(entry.name) and entry.is_dir(follow_symlinks=False):
                notes += _recover_name(layout, state, verify, entry.name)
            else:
                notes.append(f"ignored unexpected entry models/{entry.name}")
    return notes


def _recover_name(layout: CacheLayout, state: StateStore, verify: Verify, name: str) -> list[str]:
    ndir, notes = layout.name_dir(name), []
    with os.scandir(ndir) as it:
        stray = [e.name for e in it if e.name.startswith(".")]
    for entry in stray:
        remove_tree(ndir / entry)
        notes.append(f"{name}: removed stray {entry}")
    versions = layout.versions(name)
    problem = _active_problem(ndir, verify, name, versions)
    if problem:
        chosen = _best_valid(ndir, verify, name, versions)
        if chosen is not None:
            layout.set_link(ndir, "active", chosen, "recover")
            notes.append(f"{name}: {problem}; activated version {chosen}")
        elif os.path.lexists(ndir / "active"):
            remove_tree(ndir / "active")
            notes.append(f"{name}: {problem}; no valid version left, none active")
    reason = ""
    try:
        prev = read_link(ndir / "previous")
        if prev is not None and prev not in versions:
            reason = f"previous -> {prev} is dangling"
        elif prev is not None and prev == read_link(ndir / "active"):
            reason = f"previous is the active version {prev}"
    except CacheError as e:
        reason = e.one_line()
    if reason:
        remove_tree(ndir / "previous")
        notes.append(f"{name}: removed previous link ({reason})")
    fsync_dir(ndir)
    top = max(versions, default=0)
    if state.load().model(name).highest < top:
        state.update(lambda s: s.with_floor_raised(name, top))
        notes.append(f"{name}: raised anti-rollback floor to installed version {top}")
    return notes


def _active_problem(ndir: Path, verify: Verify, name: str, versions: list[int]) -> str:
    """Why ``active`` needs repair, or "" if it is valid (or rightly absent)."""
    try:
        active = read_link(ndir / "active")
    except CacheError as e:
        return e.one_line()
    if active is None:
        return "no active version" if versions else ""
    if active not in versions:
        return f"active -> {active} is dangling"
    try:
        verify(name, active)
    except EdgeRuntimeError as e:
        return f"active version {active} is invalid ({e.one_line()})"
    return ""


def _best_valid(ndir: Path, verify: Verify, name: str, versions: list[int]) -> int | None:
    """``previous`` if it verifies, else the highest version that does."""
    try:
        previous = read_link(ndir / "previous")
    except CacheError:
        previous = None
    candidates = ([previous] if previous is not None and previous in versions else []) + versions[::-1]
    for version in candidates:
        try:
            verify(name, version)
            return version
        except EdgeRuntimeError:
            continue
    return None

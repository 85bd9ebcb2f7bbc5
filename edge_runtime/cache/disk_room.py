"""Make room on the state dir's file system *before* a download or install is staged.

Old versions are collected (``keep_versions``) only after an install
succeeded, so on a nearly full disk the install that would free space could
never land. :func:`make_room` runs first: when the free space (``statvfs``) is
below what the bundle needs plus :data:`MARGIN_BYTES`, it deletes the oldest
versions that may be deleted at all (never the active, the previous, a pinned
or a probation version: :meth:`ModelCache.removable_versions`), old versions
of the model being installed first, then those of other models by age, until
it fits. If even that is not enough it refuses with one line naming the bytes
free and needed, before anything is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from edge_runtime.cache.versions import ModelCache
from edge_runtime.errors import CacheError

__all__ = ["MARGIN_BYTES", "Statvfs", "make_room", "make_room_for_download"]

#: Kept free beyond the bundle itself: the spool, the event log and the state file still need to write.
MARGIN_BYTES = 4 << 20

Statvfs = Callable[[Path], os.statvfs_result]
_log = logging.getLogger(__name__)


def _free(cache: ModelCache, statvfs: Statvfs) -> int:
    try:
        st = statvfs(cache.state_dir)
    except OSError as e:
        raise CacheError(f"cannot tell the free space under {cache.state_dir}: {e.strerror or e}") from e
    return st.f_bavail * st.f_frsize  # f_bavail: what an unprivileged writer may use


def _candidates(cache: ModelCache, prefer: str) -> list[tuple[str, int]]:
    """(name, version) oldest first: ``prefer``'s old versions, then the others' by mtime."""
    def age(item: tuple[str, int]) -> float:
        try:
            return cache.version_dir(*item).stat().st_mtime
        except OSError:
            return 0.0

    own = [(prefer, v) for v in cache.removable_versions(prefer)] if prefer in cache.names() else []
    others = [(n, v) for n in cache.names() if n != prefer for v in cache.removable_versions(n)]
    return own + sorted(others, key=age)


def make_room(cache: ModelCache, need: int, *, prefer: str = "", margin: int = MARGIN_BYTES,
              statvfs: Statvfs = os.statvfs) -> list[str]:
    """Ensure ``need`` + ``margin`` bytes are free under the state dir; return one note per version deleted.

    Raises:
        CacheError: not enough room even with every removable version deleted
            (the message names the bytes free and needed), or the file system failed.
    """
    want = max(need, 0) + margin
    free = _free(cache, statvfs)
    if free >= want:
        return []
    notes = []
    with cache.state.locked():
        candidates = _candidates(cache, prefer)
        # Delete nothing when even all of it would not do: an old version lost for no install.
        if free + sum(_disk_bytes(cache.version_dir(*c)) for c in candidates) < want:
            raise CacheError(f"not enough disk space under {cache.state_dir}: {free} bytes free, {want} needed "
                             f"({max(need, 0)} for the bundle + {margin} margin), even with the {len(candidates)} "
                             "old versions that may be removed (active, previous and pinned ones are kept)")
        for name, version in candidates:
            cache.remove_version(name, version)
            notes.append(f"removed {name} v{version} to make room ({free} bytes were free, {want} needed)")
            _log.warning("%s", notes[-1])
            free = _free(cache, statvfs)
            if free >= want:
                return notes
    raise CacheError(f"not enough disk space under {cache.state_dir}: {free} bytes free, {want} needed "
                     f"({max(need, 0)} for the bundle + {margin} margin) after removing every old version "
                     "that may be removed")


def _disk_bytes(root: Path) -> int:
    """Bytes the tree under ``root`` occupies on disk (allocated blocks, links not followed)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in (*dirnames, *filenames):
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, entry)).st_blocks * 512  # noqa: PTH118
    return total


def make_room_for_download(cache: ModelCache, dest: Path, expected_size: int | None,
                           statvfs: Statvfs = os.statvfs) -> list[str]:
    """:func:`make_room` for the rest of a download into ``dest`` (a resumed partial counts as written).

    Nothing is checked when the size is not known in advance (the fetcher's cap still applies).
    Raises CacheError like :func:`make_room`.
    """
    if expected_size is None:
        return []
    try:
        held = dest.lstat().st_size
    except FileNotFoundError:
        held = 0
    return make_room(cache, expected_size - held, statvfs=statvfs)

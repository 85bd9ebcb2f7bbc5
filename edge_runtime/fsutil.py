"""Crash-safe file-system primitives used by the cache, state and spool.

Everything here creates files 0600 and directories 0700, never follows a
symlink when creating, and makes renames durable by fsyncing the directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "CHUNK",
    "atomic_write",
    "create_exclusive",
    "fsync_dir",
    "make_private_dir",
    "remove_tree",
    "replace_symlink",
    "sha256_file",
]

CHUNK = 1 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or create inside it survives power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 if missing; refuse a symlink.

    Raises:
        OSError: the path exists as a symlink or a non-directory.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise NotADirectoryError(f"{path} is a symlink or not a directory")
    return path


@contextlib.contextmanager
def create_exclusive(path: Path, mode: int = 0o600) -> Iterator[BinaryIO]:
    """Open a new file for writing: O_CREAT|O_EXCL|O_NOFOLLOW, ``mode`` 0600.

    The file is fsynced on clean exit. It fails if anything exists at ``path``,
    symlinks included, so a planted link can never redirect the write.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
    fd = os.open(path, flags, mode)
    with os.fdopen(fd, "wb") as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically: temp file, fsync, rename, fsync dir.

    A crash at any instant leaves either the old or the new content.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        with create_exclusive(tmp, mode) as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def replace_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` (relative) atomically via symlink + rename."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def sha256_file(path: Path) -> tuple[str, int]:
    """Stream ``path`` (not following a final symlink) and return (sha256 hex, size)."""
    digest = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def remove_tree(path: Path) -> None:
    """Delete a directory tree without following symlinks out of it."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)

"""Crash-safe file-system primitives used by the cache, state and spool.

Everything here creates files 0600 and directories 0700, never follows a
symlink when creating, and makes renames durable by fsyncing the directory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, BinaryIO

__all__ = [
    "CHUNK",
    "CLOEXEC",
    "NOFOLLOW",
    "CappedReadError",
    "atomic_write",
    "create_exclusive",
    "fsync_dir",
    "fsync_tree",
    "list_files",
    "make_private_dir",
    "read_capped",
    "read_stream_capped",
    "remove_tree",
    "replace_symlink",
    "sha256_file",
]

CHUNK = 1 << 20
#: Open flags that are 0 where the platform lacks them.
NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or create inside it survives power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path, file_mode: int | None = None, dir_mode: int | None = None) -> None:
    """fsync every file and directory under ``root`` (``root`` included), children first.

    With ``file_mode``/``dir_mode`` each entry is also chmod-ed through its own
    descriptor. Symlinks are never followed: opening one fails with ELOOP.

    Raises:
        OSError: an entry cannot be opened (a symlink, a device) or synced.
    """
    for top, dirs, files in os.walk(root, topdown=False, onerror=_reraise, followlinks=False):
        # os.walk lists a symlink to a directory under ``dirs``; opening it
        # with O_NOFOLLOW below raises, which is what we want.
        for name in files + dirs:
            _sync_one(Path(top) / name, name in dirs, file_mode, dir_mode)
    _sync_one(root, True, file_mode, dir_mode)


def _reraise(error: OSError) -> None:
    # os.walk skips unreadable directories by default; an unsynced one must fail.
    raise error


def _sync_one(path: Path, is_dir: bool, file_mode: int | None, dir_mode: int | None) -> None:
    # O_NONBLOCK so a planted FIFO fails the regular-file check instead of hanging.
    flags = os.O_RDONLY | os.O_NONBLOCK | NOFOLLOW | CLOEXEC | (os.O_DIRECTORY if is_dir else 0)
    fd = os.open(path, flags)
    try:
        if not is_dir and not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        mode = dir_mode if is_dir else file_mode
        if mode is not None:
            os.fchmod(fd, mode)
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
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC
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


def replace_symlink(link: Path, target: str, linked: Callable[[], None] | None = None) -> None:
    """Point ``link`` at ``target`` (relative) atomically via symlink + rename.

    ``linked()``, if given, runs once the temp link exists, before the rename
    (a hook for crash tests).
    """
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    if linked is not None:
        linked()
    os.replace(tmp, link)
    fsync_dir(link.parent)


def sha256_file(path: Path) -> tuple[str, int]:
    """Stream ``path`` (not following a final symlink) and return (sha256 hex, size)."""
    digest = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_RDONLY | NOFOLLOW | CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class CappedReadError(OSError):
    """A capped read found more than ``limit`` bytes at ``path`` (errno EFBIG).

    An OSError, so a caller that treats every read failure alike still can;
    callers that word their own message catch this first and use the fields.
    """

    def __init__(self, path: str, limit: int) -> None:
        super().__init__(errno.EFBIG, f"larger than {limit} bytes", path)
        self.path = path
        self.limit = limit


def read_capped(path: Path, max_bytes: int, *, follow_symlinks: bool = False) -> bytes:
    """Read a whole file of at most ``max_bytes``, in chunks.

    ``follow_symlinks=False`` (files inside the state dir) opens with
    O_NOFOLLOW | O_NONBLOCK: a planted final symlink fails with ELOOP and a
    planted FIFO reads as empty instead of hanging. ``True`` is for paths a user
    names (config, keys, inputs): opened as ``open()`` would, links and pipes included.

    Raises:
        CappedReadError: the file holds more than ``max_bytes``.
        OSError: unreadable, or a final symlink when ``follow_symlinks`` is False.
    """
    flags = os.O_RDONLY | CLOEXEC | (0 if follow_symlinks else os.O_NONBLOCK | NOFOLLOW)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as fh:
        return read_stream_capped(fh, max_bytes, str(path))


def read_stream_capped(fh: IO[bytes], max_bytes: int, name: str = "") -> bytes:
    """Read an open stream to its end, refusing more than ``max_bytes``.

    In chunks: ``read(max_bytes + 1)`` would allocate the whole cap up front,
    which a memory-capped gate child (RLIMIT_DATA) cannot afford for a 256 MB cap.
    At most ``max_bytes + 1`` bytes are ever read.

    Raises:
        CappedReadError: the stream holds more than ``max_bytes`` (``path`` is ``name``).
        OSError: the read failed.
    """
    buf = bytearray()
    while len(buf) <= max_bytes and (chunk := fh.read(min(CHUNK, max_bytes + 1 - len(buf)))):
        buf += chunk
    if len(buf) > max_bytes:
        raise CappedReadError(name or "stream", max_bytes)
    return bytes(buf)


def list_files(root: Path) -> dict[str, int]:
    """Map each regular file under ``root`` ('/'-separated relative path) to its size.

    Raises:
        OSError: a directory is unreadable, or an entry is a symlink or special
            file (ELOOP / EINVAL naming it): a tree that must hold only files
            and dirs is refused rather than walked through a link.
    """
    found: dict[str, int] = {}
    pending = [root]
    while pending:
        top = pending.pop()
        with os.scandir(top) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    pending.append(Path(entry.path))
                elif stat.S_ISREG(st.st_mode):
                    found[Path(entry.path).relative_to(root).as_posix()] = st.st_size
                else:
                    code = errno.ELOOP if stat.S_ISLNK(st.st_mode) else errno.EINVAL
                    raise OSError(code, "a symlink or special file", entry.path)
    return found


def remove_tree(path: Path) -> None:
    """Delete a directory tree without following symlinks out of it."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)

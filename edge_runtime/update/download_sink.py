"""Where a download's body goes: memory, or a file that a later download resumes.

Used by :class:`~edge_runtime.update.fetcher.Fetcher`: ``offset`` is the resume point,
``validator`` the strong ETag of what is held (for If-Range), and ``keep``
says whether a failed download leaves its partial file for the next call.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from pathlib import Path
from typing import BinaryIO

from edge_runtime._util.fsutil import CLOEXEC, NOFOLLOW
from edge_runtime.errors import FetchError

__all__ = ["CHUNK_BYTES", "FileSink", "Sink"]

#: Bytes read (and written) at a time.
CHUNK_BYTES = 64 << 10


class Sink:
    """Where the body goes; in memory, the base of the file sink."""

    def __init__(self) -> None:
        self.offset = 0
        self.validator: str | None = None  # strong ETag of what we hold, for If-Range
        self.keep = False  # keep a partial file: the failure was transient, a later call resumes
        self._data = bytearray()

    def open(self) -> None:
        """Called once a reply was accepted, before the first body byte."""

    def write(self, chunk: bytes) -> None:
        self._data += chunk
        self.offset += len(chunk)

    def restart(self) -> None:
        self._data.clear()
        self.offset = 0
        self.validator = None

    def value(self) -> bytes:
        return bytes(self._data)


class FileSink(Sink):
    """Streams into ``dest`` (0600, O_NOFOLLOW), hashing on the way; resumes what is there."""

    def __init__(self, dest: Path) -> None:
        super().__init__()
        self.dest = dest
        self._fh: BinaryIO | None = None
        self._hash = hashlib.sha256()
        if os.path.lexists(dest):
            self.open()

    def open(self) -> None:
        if self._fh is not None:
            return
        try:
            fd = os.open(self.dest, os.O_RDWR | os.O_CREAT | NOFOLLOW | CLOEXEC, 0o600)
        except OSError as e:
            raise FetchError(f"cannot open download file {self.dest}: {e.strerror or e}") from e
        fh = os.fdopen(fd, "r+b")
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FetchError(f"download file {self.dest} is not a regular file")
            os.fchmod(fd, 0o600)
            # Bytes an earlier attempt or call left are the resume point; hash them once.
            while chunk := fh.read(CHUNK_BYTES):
                self._hash.update(chunk)
                self.offset += len(chunk)
        except BaseException:
            fh.close()
            raise
        self._fh = fh

    def write(self, chunk: bytes) -> None:
        assert self._fh is not None
        try:
            self._fh.write(chunk)
        except OSError as e:  # disk full is final, not a network error to retry
            raise FetchError(f"cannot write {self.dest}: {e.strerror or e}") from e
        self._hash.update(chunk)
        self.offset += len(chunk)

    def restart(self) -> None:
        super().restart()
        self._hash = hashlib.sha256()
        if self._fh is not None:
            self._fh.seek(0)
            self._fh.truncate()

    def digest(self) -> str:
        return self._hash.hexdigest()

    def finish(self) -> None:
        """Flush and fsync: the caller installs from this file next."""
        assert self._fh is not None
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as e:
            raise FetchError(f"cannot write {self.dest}: {e.strerror or e}") from e
        self.close()

    def close(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None

    def abort(self) -> None:
        self.close()
        if not self.keep:
            with contextlib.suppress(FileNotFoundError):
                self.dest.unlink()

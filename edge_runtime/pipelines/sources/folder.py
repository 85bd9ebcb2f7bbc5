"""Folder source: every new image/.npy file dropped into a directory, processed once, in order.

A file is *ready* when it is a regular file (symlinks, directories and special
files are skipped, never followed), its name does not start with a dot, its
extension is one of ``extensions``, it is not empty, and its size and mtime are
unchanged across two consecutive scans (``poll_seconds`` apart): a file still
being written is not read half-way. Writers that can should write to a dotfile
or a ``.part`` name and rename it into place, which is always safe.

Ready files are read in (mtime, name) order. Progress lives in a small SQLite
database (WAL, 0600) keyed by file name with the size and mtime that were
processed: a restart never reprocesses a file, a file replaced by new content
is processed again, and entries of files that disappeared are pruned. A file
is recorded when the pipeline acks it, so a file in flight during a crash is
processed again after the restart (at least once; exactly once on clean stops).
Files that are unreadable or over ``max_bytes`` are reported and recorded with
their error, so they are not retried forever.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from edge_runtime._util.fsutil import CLOEXEC, NOFOLLOW, make_private_dir
from edge_runtime.config.model import Limits, SourceConfig
from edge_runtime.errors import ConfigError, InputError
from edge_runtime.pipelines.sources.base import Item, Source, SourceContext

__all__ = ["DEFAULT_EXTENSIONS", "FolderSource", "state_db_path"]

DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".npy")
_SCHEMA = """CREATE TABLE IF NOT EXISTS processed (
    name TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, error TEXT, at REAL NOT NULL)"""
Signature = tuple[int, int]  # (size, mtime_ns): what identifies one content of a file name

_log = logging.getLogger(__name__)


def state_db_path(state_dir: Path, pipeline: str) -> Path:
    """``<state_dir>/sources/<pipeline>.db``, the pipeline name made into a safe file name."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", pipeline).lstrip(".")
    if safe != pipeline:  # two names that sanitise alike must not share progress
        safe = f"{safe or 'pipeline'}-{hashlib.sha256(pipeline.encode()).hexdigest()[:8]}"
    return state_dir / "sources" / f"{safe}.db"


class FolderSource(Source):
    """Yields ``(file name, file bytes)`` for each new file in ``folder``; lossless (never drops)."""

    lossy = False

    def __init__(self, folder: Path, ctx: SourceContext, *, db_path: Path, max_bytes: int,
                 poll_seconds: float = 0.5, extensions: tuple[str, ...] = DEFAULT_EXTENSIONS) -> None:
        """Open (or create) the progress database at ``db_path``.

        Raises:
            OSError: the database cannot be created or opened (a corrupt one is
                moved aside and recreated, with a ``source_state_reset`` event).
        """
        super().__init__(ctx, f"folder:{folder}")
        self.folder = folder
        self.db_path = db_path
        self.max_bytes = max_bytes
        self.poll_seconds = poll_seconds
        self.extensions = tuple(e.lower() for e in extensions)
        self._lock = threading.Lock()  # the worker acks while the source thread scans
        self._seen: dict[str, Signature] = {}
        self._pending: dict[str, Signature] = {}  # yielded, not acked yet
        self._db: sqlite3.Connection | None = self._open_db()
        self._done: dict[str, Signature] = {
            name: (size, mtime) for name, size, mtime in self._db.execute("SELECT name, size, mtime_ns FROM processed")
        }

    @classmethod
    def from_config(cls, config: SourceConfig, ctx: SourceContext, *, state_dir: Path,
                    limits: Limits) -> FolderSource:
        """The folder source of a pipeline (``config.path``, ``config.poll_seconds``).

        Raises:
            ConfigError: no path configured. OSError: see the constructor.
        """
        if config.path is None:
            raise ConfigError(f"pipeline {ctx.pipeline!r}: source.path is required for a folder source")
        return cls(config.path, ctx, db_path=state_db_path(state_dir, ctx.pipeline),
                   max_bytes=limits.max_image_bytes, poll_seconds=config.poll_seconds)

    # ------------------------------------------------------------------ iteration

    def items(self) -> Iterator[Item]:
        """Scan every ``poll_seconds`` and yield each ready, unprocessed file once."""
        while not self.stop_event.is_set():
            for name in self.scan():
                if self.stop_event.is_set():
                    return
                data = self._read(name)
                if data is not None:
                    yield name, data
            if self._wait(self.poll_seconds):
                return

    def scan(self) -> list[str]:
        """One scan: the names of files that are ready and not processed, oldest first.

        Also prunes progress entries of files that are gone. A folder that
        cannot be listed is reported as a source failure (and nothing is
        pruned: an unmounted card must not erase the progress).
        """
        try:
            with os.scandir(self.folder) as it:
                entries = list(it)
        except OSError as e:
            self._failed(f"cannot list {self.folder}: {e.strerror or e}")
            return []
        self._recovered()
        current: dict[str, Signature] = {}
        for entry in entries:
            name = entry.name
            if name.startswith(".") or Path(name).suffix.lower() not in self.extensions:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # vanished between listing and stat
            if stat.S_ISREG(st.st_mode) and st.st_size > 0:
                current[name] = (st.st_size, st.st_mtime_ns)
        previous, self._seen = self._seen, current
        with self._lock:
            self._prune(current)
            ready = [name for name, sig in current.items()
                     if previous.get(name) == sig and self._done.get(name) != sig and name not in self._pending]
        ready.sort(key=lambda n: (current[n][1], n))
        return ready

    def ack(self, key: str, error: str | None = None) -> None:
        """Record ``key`` as processed (with ``error`` when it failed); ignored after :meth:`close`."""
        with self._lock:
            sig = self._pending.pop(key, None)
            if sig is not None:
                self._record(key, sig, error)

    def close(self) -> None:
        """Close the progress database (later acks are ignored: those files run again next start)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # ------------------------------------------------------------------ internals

    def _read(self, name: str) -> bytes | None:
        """The file's bytes, or None when it must not be yielded (reported, or changed since the scan)."""
        sig = self._seen[name]
        try:
            data = self._load(name, sig)
        except InputError as e:
            self._bad_item(name, e.one_line())
            with self._lock:
                self._record(name, sig, e.one_line())  # so it is not retried forever
            return None
        if data is not None:
            with self._lock:
                self._pending[name] = sig
        return data

    def _load(self, name: str, sig: Signature) -> bytes | None:
        """Read ``name`` if it still has signature ``sig``; None if it is gone or changing.

        Raises:
            InputError: unreadable, not a regular file, or over the size cap.
        """
        try:
            # O_NOFOLLOW: a file swapped for a symlink after the scan is refused, not followed.
            fd = os.open(self.folder / name, os.O_RDONLY | os.O_NONBLOCK | NOFOLLOW | CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise InputError(f"cannot open: {os.strerror(e.errno) if e.errno else e}") from e
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InputError("not a regular file")
            if (st.st_size, st.st_mtime_ns) != sig:
                return None  # still changing: it becomes ready again once stable
            if st.st_size > self.max_bytes:
                raise InputError(f"file of {st.st_size} bytes exceeds the {self.max_bytes}-byte cap")
            try:
                data = fh.read(self.max_bytes + 1)
            except OSError as e:
                raise InputError(f"read failed: {e.strerror or e}") from e
        return data if len(data) == sig[0] else None  # changed while reading: try again when stable

    def _record(self, name: str, sig: Signature, error: str | None) -> None:
        """Persist one processed file (caller holds the lock)."""
        self._done[name] = sig
        if self._db is None:
            return
        try:
            with self._db:
                self._db.execute("INSERT OR REPLACE INTO processed VALUES (?, ?, ?, ?, ?)",
                                 (name, sig[0], sig[1], error, time.time()))
        except sqlite3.Error as e:
            # Kept in memory for this run; after a restart the file runs again (at least once).
            _log.error("%s: cannot record %s as processed: %s", self.label, name, e)

    def _prune(self, current: dict[str, Signature]) -> None:
        """Forget files that are gone (caller holds the lock)."""
        gone = [name for name in self._done if name not in current and name not in self._pending]
        if not gone:
            return
        for name in gone:
            del self._done[name]
        if self._db is None:
            return
        try:
            with self._db:
                self._db.executemany("DELETE FROM processed WHERE name = ?", [(n,) for n in gone])
        except sqlite3.Error as e:
            _log.error("%s: cannot prune progress: %s", self.label, e)

    def _open_db(self) -> sqlite3.Connection:
        make_private_dir(self.db_path.parent)
        # Create it 0600 ourselves, refusing a planted symlink; SQLite gives -wal/-shm the same mode.
        fd = os.open(self.db_path, os.O_RDWR | os.O_CREAT | NOFOLLOW | CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        try:
            return self._connect()
        except sqlite3.OperationalError as e:  # unwritable, locked by another process, ...
            raise OSError(errno.EIO, f"cannot open source state {self.db_path}: {e}") from e
        except sqlite3.DatabaseError as e:
            # Not a database, or corrupt: start afresh (files run again) rather than never start.
            aside = self.db_path.with_name(f"{self.db_path.name}.corrupt-{int(time.time())}")
            os.replace(self.db_path, aside)
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    self.db_path.with_name(self.db_path.name + suffix).unlink()
            self.ctx.events.emit("source_state_reset", reason=f"{self.db_path}: {e}; moved to {aside.name}",
                                 pipeline=self.ctx.pipeline, source=self.label)
            fd = os.open(self.db_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC, 0o600)
            os.close(fd)
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL under WAL: a power cut may lose the last acks (files run again), never corrupts.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(_SCHEMA)
            db.execute("SELECT count(*) FROM processed").fetchone()
        except BaseException:
            db.close()
            raise
        return db

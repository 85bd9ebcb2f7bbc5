"""Which fleet commands already ran, and which signed-command nonces were seen: ``<state>/commands.db``.

A small SQLite database (WAL, ``synchronous=FULL``, file mode 0600) with two
tables:

- ``commands(id, started, reply, digest)``: one row per command id claimed within the
  last ``window_seconds``. ``reply`` is NULL while the command runs, then the
  JSON of its :class:`~edge_runtime.commands.parse.Reply`; ``digest`` is the
  SHA-256 of the verb and args that ran, so an id reused for a different
  command is told apart from a redelivery (:attr:`Claim.conflict`). :meth:`CommandLedger.claim`
  is one ``BEGIN IMMEDIATE`` transaction, so of two deliveries of an id (two
  threads, or a redelivery after a restart) exactly one gets to run it; the
  other is told it is running or gets the stored reply.
- ``nonces(nonce, expires)``: nonces of accepted signed commands, kept until
  their timestamp would be refused anyway (see :mod:`edge_runtime.commands.auth`).

Execution is at most once: a row still marked running when the ledger is
opened belongs to a process that died mid-command; it is closed with a failure
reply ("interrupted") rather than run again, because the command may have
done part of its work. A database that SQLite cannot read is moved aside to
``commands.db.corrupt`` and replaced by an empty one (logged): losing the
replay memory is better than a device that cannot start and so cannot be
commanded at all. One process uses the ledger at a time (the daemon).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edge_runtime._util.fsutil import CLOEXEC, NOFOLLOW, make_private_dir
from edge_runtime.commands.parse import Reply
from edge_runtime.errors import CommandError, EdgeRuntimeError

__all__ = ["Claim", "CommandLedger"]

_log = logging.getLogger(__name__)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (id TEXT PRIMARY KEY, started REAL NOT NULL, reply TEXT, digest TEXT);
CREATE INDEX IF NOT EXISTS commands_started ON commands (started);
CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS nonces_expires ON nonces (expires);
"""
_PRUNE_EVERY_S = 60.0
_INTERRUPTED = Reply(False, "command was interrupted by a daemon restart before it finished; "
                            "check the device state and send it again with a new id")


@dataclass(frozen=True)
class Claim:
    """The outcome of :meth:`CommandLedger.claim`.

    ``fresh``: the caller now owns the id and must run the command, then
    :meth:`~CommandLedger.record` its reply. Otherwise ``reply`` is the stored
    reply of the earlier run, or None while that run is still going.
    """

    fresh: bool
    reply: Reply | None = None
    conflict: bool = False
    """Not fresh, and the id was first used for a different verb or args (a digest mismatch)."""

    @property
    def running(self) -> bool:
        """Another delivery of this id is running it now."""
        return not self.fresh and self.reply is None


class CommandLedger:
    """Remembers executed command ids (with their replies) and seen nonces, on disk.

    ``clock`` is wall-clock Unix seconds: the window spans restarts. Thread-safe.
    ``max_commands`` bounds the table (oldest rows go first) so a flood of
    unique ids cannot fill the disk.
    """

    def __init__(self, path: Path, window_seconds: float, clock: Callable[[], float] = time.time, *,
                 max_commands: int = 100_000) -> None:
        """Open (or create) the ledger at ``path``; its directory is created 0700 if missing.

        Raises:
            CommandError: the file or its directory cannot be created or opened
                (a symlink at ``path`` is refused).
        """
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        self.path = path
        self.window_seconds = window_seconds
        self.max_commands = max_commands
        self._clock = clock
        self._lock = threading.Lock()
        self._last_prune = float("-inf")
        try:
            make_private_dir(path.parent)
            self._db = self._open()
        except (OSError, sqlite3.Error) as e:
            raise CommandError(f"command ledger {path}: cannot open: {e}") from e
        with self._guard("recover"):
            interrupted = self._db.execute("UPDATE commands SET reply = ? WHERE reply IS NULL",
                                           (_INTERRUPTED.to_json().decode(),)).rowcount
        if interrupted:
            _log.warning("%d command(s) were interrupted by the last shutdown; they will not run again", interrupted)

    def _open(self) -> sqlite3.Connection:
        # Created here with O_NOFOLLOW and 0600: sqlite would follow a planted link and use
        # the umask. Its -wal and -shm files copy this file's mode.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | NOFOLLOW | CLOEXEC, 0o600))
        try:
            return self._connect()
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError):
                raise  # locked, I/O, permissions: not corruption, do not discard anything
            _log.warning("command ledger %s is unreadable (%s); moving it aside and starting empty", self.path, e)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self.path}{suffix}", f"{self.path}.corrupt{suffix}")
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC, 0o600))
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), timeout=10.0, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: the "running" mark of a claim must reach the disk before the command acts.
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(commands)")}
            if "digest" not in columns:  # a ledger written before digests were kept
                db.execute("ALTER TABLE commands ADD COLUMN digest TEXT")
        except BaseException:
            db.close()
            raise
        return db

    # ------------------------------------------------------------------ commands

    def claim(self, command_id: str, digest: str | None = None) -> Claim:
        """Atomically take ``command_id`` for running, unless it ran or runs within the window.

        ``digest`` (of the verb and args) is stored with a fresh claim; a later
        claim of the id with another digest is marked ``conflict`` (rows without
        one never conflict).

        Raises:
            CommandError: the database failed (the command must then not run).
        """
        with self._guard("claim"), self._transaction():
            now = self._clock()
            self._prune_due(now)
            row = self._db.execute("SELECT started, reply, digest FROM commands WHERE id = ?",
                                   (command_id,)).fetchone()
            if row is not None and row[0] >= now - self.window_seconds:
                conflict = digest is not None and row[2] is not None and row[2] != digest
                return Claim(False, None if row[1] is None else self._decode(command_id, row[1]), conflict)
            self._db.execute("INSERT OR REPLACE INTO commands (id, started, reply, digest) VALUES (?, ?, NULL, ?)",
                             (command_id, now, digest))
            return Claim(True)

    def record(self, command_id: str, reply: Reply) -> None:
        """Store the reply of a command that ran; later deliveries of the id get it back.

        Raises:
            CommandError: the database failed.
        """
        data = reply.to_json().decode()
        with self._guard("record"), self._transaction():
            updated = self._db.execute("UPDATE commands SET reply = ? WHERE id = ?", (data, command_id)).rowcount
            if not updated:  # pruned meanwhile (a command that ran longer than the window)
                self._db.execute("INSERT INTO commands (id, started, reply) VALUES (?, ?, ?)",
                                 (command_id, self._clock(), data))

    def lookup(self, command_id: str) -> Reply | None:
        """The stored reply of ``command_id`` if it finished within the window, else None.

        Raises:
            CommandError: the database failed.
        """
        with self._guard("lookup"):
            row = self._db.execute("SELECT reply FROM commands WHERE id = ? AND reply IS NOT NULL AND started >= ?",
                                   (command_id, self._clock() - self.window_seconds)).fetchone()
        return None if row is None else self._decode(command_id, row[0])

    # ------------------------------------------------------------------ nonces

    def remember_nonce(self, nonce: str, expires_at: float) -> bool:
        """Record ``nonce`` until ``expires_at``; False if it is already recorded (a replay).

        Raises:
            CommandError: the database failed (treat the command as refused).
        """
        with self._guard("nonce"), self._transaction():
            now = self._clock()
            self._db.execute("DELETE FROM nonces WHERE nonce = ? AND expires < ?", (nonce, now))
            inserted = self._db.execute("INSERT OR IGNORE INTO nonces (nonce, expires) VALUES (?, ?)",
                                        (nonce, max(expires_at, now))).rowcount
        return inserted == 1

    # ------------------------------------------------------------------ upkeep

    def prune(self) -> int:
        """Forget commands older than the window (and past ``max_commands``) and expired nonces.

        Returns how many rows were deleted. Raises CommandError: the database failed.
        """
        with self._guard("prune"), self._transaction():
            return self._prune(self._clock())

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            self._db.close()

    def _prune_due(self, now: float) -> None:
        if now - self._last_prune >= _PRUNE_EVERY_S:
            self._prune(now)

    def _prune(self, now: float) -> int:
        self._last_prune = now
        deleted = self._db.execute("DELETE FROM commands WHERE started < ?", (now - self.window_seconds,)).rowcount
        deleted += self._db.execute(
            "DELETE FROM commands WHERE id IN (SELECT id FROM commands WHERE reply IS NOT NULL "
            "ORDER BY started DESC LIMIT -1 OFFSET ?)", (self.max_commands,)).rowcount
        deleted += self._db.execute("DELETE FROM nonces WHERE expires < ?", (now,)).rowcount
        return deleted

    def _decode(self, command_id: str, data: str) -> Reply:
        try:
            return dataclasses.replace(Reply.from_json(data.encode()), id=command_id)
        except EdgeRuntimeError:
            return dataclasses.replace(_INTERRUPTED, message="stored reply is unreadable", id=command_id)

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Hold the lock; turn SQLite errors into one-line CommandErrors."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as e:
                raise CommandError(f"command ledger {self.path}: {what} failed: {e}") from e

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

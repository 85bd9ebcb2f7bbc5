"""Bounded on-disk FIFO of outgoing MQTT messages (telemetry, events) that survives kill -9.

One sqlite3 database in WAL mode holds the messages not yet acknowledged by the
broker. Every message gets the next value of one sequence number shared by all
topics; ``append`` hands it to a ``build(seq)`` callback so the payload can carry
its own ``seq``. Sequence numbers are never reused: sqlite's AUTOINCREMENT keeps
the highest one ever assigned even after its row is deleted, and a small sidecar
file ``<name>.seq`` (:mod:`edge_runtime.mqtt.spool_floor`) holds a floor above every assigned seq so that a database
that had to be thrown away (corruption) does not restart numbering at 1, which
would make subscribers that drop duplicates by seq discard fresh messages.

Durability: ``synchronous=NORMAL`` (the default) commits each append to the WAL
with a ``write()`` and no fsync, so every append that returned survives kill -9
of the process (the data is in the kernel's page cache). A power cut may lose
the appends the kernel had not yet written back (normally the last ~30 s, the
dirty-page expiry) but never corrupts the file: WAL frames are checksummed.
``synchronous="FULL"`` adds an fsync per append for power-cut durability, about
8x the cost per append (``tools/bench_spool.py``) and one flash write per append.

Bound: when adding a message would exceed ``max_messages`` or ``max_bytes``
(payload plus topic bytes), the oldest messages are deleted first. They are
counted in a persisted ``dropped`` counter and their seq ranges are kept (the
latest ``MAX_DROPPED_RANGES``) so telemetry can tell subscribers which seqs are
gone for good: :mod:`edge_runtime.mqtt.spool_books` keeps these counts.

A database that sqlite reports as corrupt (at open or later) is moved aside as
``<name>.corrupt-<unix time>`` with a logged warning and recreated; the messages
it held are counted as dropped when they can be counted. A file deleted or
replaced while open is noticed at the next append: the open connection still
reads the old one, so it is copied into a new file at ``path`` (recreated and
counted, like corruption, if the copy fails). Other failures (disk full, I/O
error, a locked file) raise :class:`EdgeRuntimeError`; an append that fails so
still uses up its seq, which is counted as dropped at once (in memory, see
:mod:`edge_runtime.mqtt.spool_loss`, and in the file with the next append that works):
every seq is either stored or counted.

One ``Spool`` per file per process: counts are cached in memory. All methods
are thread-safe (one connection behind a lock).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime._util.fsutil import make_private_dir
from edge_runtime.errors import EdgeRuntimeError, InputError
from edge_runtime.mqtt.spool_books import MAX_DROPPED_RANGES, SpoolBooks
from edge_runtime.mqtt.spool_file import (
    connect,
    identity,
    is_corrupt,
    move_aside,
    prepare,
    rescue,
    salvage,
    set_last_seq,
    transaction,
)
from edge_runtime.mqtt.spool_floor import SEQ_RESERVE, SeqFloor
from edge_runtime.mqtt.spool_loss import LossLog, Lost

__all__ = ["SEQ_RESERVE", "Spool", "Spooled"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Spooled:
    """One stored message, as returned by :meth:`Spool.peek`."""

    seq: int
    topic: str
    payload: bytes
    qos: int


def _nothing() -> None:
    pass


class _Corrupt(Exception):
    """Internal: the database must be moved aside."""


class Spool:
    """A bounded, persistent, thread-safe FIFO of messages keyed by a global seq.

    Raises (constructor and every method):
        EdgeRuntimeError: the database cannot be used for a reason other than
            corruption (disk full, I/O error, permissions, a symlink at ``path``).
        ValueError: a bound below 1, an unknown ``synchronous`` mode or QoS (programming errors).
    """

    def __init__(self, path: Path, *, max_messages: int, max_bytes: int, synchronous: str = "NORMAL") -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("max_messages and max_bytes must be positive")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError("synchronous must be NORMAL or FULL")
        self.path = path
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._synchronous = synchronous
        self._lock = threading.Lock()
        self._books = SpoolBooks(max_messages, max_bytes)
        self._next_seq = 1
        self._conn: sqlite3.Connection | None = None
        self._ident: tuple[int, int] | None = None
        self._loss = LossLog()
        self._lost_seq = 0
        try:
            make_private_dir(path.parent)
        except OSError as e:
            raise EdgeRuntimeError(f"spool directory {path.parent}: {e.strerror or e}") from e
        self._floor = SeqFloor(path)
        with self._lock:
            self._open()

    # ------------------------------------------------------------------ public

    @property
    def pending(self) -> int:
        """Messages stored and not yet acknowledged."""
        return self._books.count

    @property
    def pending_bytes(self) -> int:
        """Payload plus topic bytes of the pending messages (what ``max_bytes`` bounds)."""
        return self._books.bytes

    @property
    def dropped(self) -> int:
        """Messages deleted unsent to respect the bound (or lost to corruption), ever."""
        return self._books.dropped

    def dropped_ranges(self) -> list[tuple[int, int]]:
        """Inclusive seq ranges of dropped messages, oldest first (the latest ``MAX_DROPPED_RANGES``)."""
        with self._lock:
            rows = self._run(self._books.stored_ranges)
            ranges = sorted(set(rows or ()) | set(self._loss.ranges()))
        return ranges[-MAX_DROPPED_RANGES:]

    def take_lost(self) -> list[Lost]:
        """Ranges of seqs that failed to store and are now recorded in the file; each handed out once.

        The daemon publishes them as an event once the spool works again.
        """
        return self._loss.take_saved()

    def stats(self) -> dict[str, Any]:
        """Counters for telemetry: pending, pending_bytes, dropped, dropped_ranges, next_seq."""
        ranges = self.dropped_ranges()
        return {"pending": self._books.count, "pending_bytes": self._books.bytes, "dropped": self._books.dropped,
                "dropped_ranges": [list(r) for r in ranges[-8:]], "next_seq": self._next_seq}

    def append(self, topic: str, build: Callable[[int], bytes], qos: int = 1) -> int:
        """Store ``build(seq)`` under the next seq and return that seq; durable once it returns.

        ``build`` runs under the spool's lock: it must be quick and must not call
        the spool. If it raises, nothing is stored and the seq is not consumed.
        Makes room by dropping the oldest messages when the bound is reached.

        Raises:
            InputError: the message alone is larger than ``max_bytes`` (it is
                counted as dropped under its seq, so subscribers see why it is missing).
            EdgeRuntimeError: the database cannot be written (disk full, I/O error).
        """
        if qos not in (0, 1, 2):
            raise ValueError("qos must be 0, 1 or 2")
        with self._lock:
            self._check_file()
            try:
                return self._append(topic, build, qos)
            except _Corrupt:
                # The database was recreated; the message goes into the new one.
                return self._append(topic, build, qos)

    def peek(self, limit: int, *, after: int = 0) -> list[Spooled]:
        """Up to ``limit`` pending messages with seq > ``after``, oldest first (nothing is removed)."""
        with self._lock:
            rows = self._run(lambda c: c.execute(
                "SELECT seq, topic, payload, qos FROM messages WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit)).fetchall())
        return [Spooled(int(s), str(t), bytes(p), int(q)) for s, t, p, q in rows or ()]

    def ack(self, seqs: int | Iterable[int], /) -> int:
        """Delete delivered messages: every seq <= ``seqs`` (an int), or exactly those listed.

        Returns the number of messages removed (already-gone seqs are ignored).
        """
        if isinstance(seqs, int):
            where, params = "seq <= ?", [seqs]
        else:
            params = sorted(set(seqs))
            if not params:
                return 0
            where = f"seq IN ({','.join('?' * len(params))})"
        with self._lock:
            result = self._run(lambda c: self._books.delete(c, where, params))
        return result or 0

    def close(self) -> None:
        """Close the database (a WAL checkpoint happens here); later calls raise."""
        with self._lock:
            self._close_quietly()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _append(self, topic: str, build: Callable[[int], bytes], qos: int) -> int:
        conn = self._connection()
        seq = self._next_seq
        payload = build(seq)
        size = len(payload) + len(topic.encode())
        saved: Callable[[], None] = _nothing
        try:
            self._floor.reserve(seq)
            with transaction(conn):
                saved = self._loss.save(lambda first, last, n: self._books.record_drop(conn, first, last, n))
                if size > self.max_bytes:
                    # Consume the seq and explain it: subscribers find it in dropped_ranges.
                    set_last_seq(conn, seq)
                    self._books.record_drop(conn, seq, seq, 1)
                else:
                    self._books.make_room(conn, size)
                    conn.execute("INSERT INTO messages(seq, topic, qos, payload, size) VALUES (?, ?, ?, ?, ?)",
                                 (seq, topic, qos, payload, size))
        except sqlite3.DatabaseError as e:
            self._reload_after_failure()
            try:
                self._handle(e)
            except EdgeRuntimeError as failed:
                self._lose(seq, topic, failed)
                raise
        except OSError as e:
            floor_failed = EdgeRuntimeError(f"spool seq floor {self._floor.path}: {e.strerror or e}")
            self._lose(seq, topic, floor_failed)
            raise floor_failed from e
        saved()
        self._next_seq = seq + 1
        if size > self.max_bytes:
            self._books.dropped += 1
            _log.warning("spool: message seq %d to %s is %d bytes, over the %d-byte bound: dropped",
                         seq, topic, size, self.max_bytes)
            raise InputError(f"message of {size} bytes exceeds the spool bound of {self.max_bytes} bytes")
        self._books.count += 1
        self._books.bytes += size
        return seq

    def _lose(self, seq: int, topic: str, failure: EdgeRuntimeError) -> None:
        """``seq`` could not be stored: use it up and count it, so its gap is explained."""
        self._next_seq = seq + 1
        self._lost_seq = seq  # used up even though the file has no trace of it yet
        self._books.dropped += 1
        self._loss.add(seq, failure.one_line())
        _log.warning("spool: message seq %d to %s not stored, counted as dropped: %s", seq, topic, failure.one_line())

    def _check_file(self) -> None:
        """Rescue the messages of a spool file deleted or replaced under us (the connection still reads it)."""
        if self._conn is None or identity(self.path) == self._ident:
            return
        old, count = self._conn, self._books.count
        _, _, span = salvage(old)
        _log.warning("spool %s was deleted or replaced while open: copying its %d messages into a new file",
                     self.path, count)
        try:
            rescue(old, self.path)
        except (sqlite3.Error, EdgeRuntimeError) as e:
            self._recover(f"deleted or replaced, and the copy failed: {e}", count, span, self._next_seq)
            self._ident = identity(self.path)
            return
        self._conn = None
        self._open_file()

    def _run(self, op: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run a read or delete; on corruption recreate the database and return None."""
        try:
            return op(self._connection())
        except sqlite3.DatabaseError as e:
            self._reload_after_failure()
            try:
                self._handle(e)
            except _Corrupt:
                return None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise EdgeRuntimeError(f"spool {self.path} is closed")
        return self._conn

    def _handle(self, error: sqlite3.DatabaseError) -> None:
        if not is_corrupt(error):
            raise EdgeRuntimeError(f"spool {self.path}: {error}") from error
        count, span = self._salvage()
        self._recover(str(error), max(count, self._books.count), span, self._next_seq)
        raise _Corrupt from error

    def _reload_after_failure(self) -> None:
        # A failed transaction was rolled back: re-read the cached counters so they match the file.
        with contextlib.suppress(sqlite3.Error, EdgeRuntimeError):
            self._load(self._connection())

    # ------------------------------------------------------------------ open / recover

    def _open(self) -> None:
        self._floor.load()
        self._open_file()

    def _open_file(self) -> None:
        try:
            self._conn = connect(self.path)
            self._ident = identity(self.path)
            problem = self._check(self._conn)
        except sqlite3.DatabaseError as e:
            if not is_corrupt(e):
                self._close_quietly()
                raise EdgeRuntimeError(f"spool {self.path}: {e}") from e
            problem = str(e)
        if problem is None:
            return
        # The floor, not the damaged file, says where numbering may safely go on.
        self._recover(problem, *self._salvage(), None)

    def _check(self, conn: sqlite3.Connection) -> str | None:
        """Set up the schema and load the counters; return why the file is unusable, or None."""
        problem = prepare(conn, self.path, self._synchronous)
        if problem is None:
            self._load(conn)
        return problem

    def _load(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        # Losses not yet written to the file stay counted; their seqs stay used up.
        self._books.load(conn, self._loss.unsaved)
        # The floor is a reservation ahead of use: only a database that lost its history
        # starts there (a gap subscribers can see), a healthy one continues exactly.
        self._next_seq = max(self._lost_seq + 1, int(row[0]) + 1 if row else max(1, self._floor.value))

    def _salvage(self) -> tuple[int, tuple[int, int] | None]:
        """Best effort on a corrupt file: how many messages it held and their seq range."""
        dropped, count, span = salvage(self._conn)
        self._books.dropped = max(self._books.dropped, dropped)
        return count, span

    def _recover(self, reason: str, lost: int, span: tuple[int, int] | None, next_seq: int | None) -> None:
        """Move the unusable database aside, start a fresh one, carry the counters over."""
        self._close_quietly()
        aside = move_aside(self.path)
        _log.warning("spool %s is unusable (%s): moved aside to %s and recreated; %d messages lost",
                     self.path, " ".join(reason.split()), aside.name, lost)
        dropped = self._books.dropped + lost
        self._floor.load()
        conn = self._conn = connect(self.path)
        self._ident = identity(self.path)
        problem = self._check(conn)
        if problem is not None:
            raise EdgeRuntimeError(f"spool {self.path}: a fresh database is unusable: {problem}")
        start = next_seq if next_seq is not None else max(self._floor.value, 1)
        with transaction(conn):
            conn.execute("UPDATE meta SET value = ? WHERE key = 'dropped'", (dropped,))
            if span is not None:
                conn.execute("INSERT INTO dropped_ranges(first, last) VALUES (?, ?)", span)
            if start > 1:
                set_last_seq(conn, start - 1)
        self._load(conn)

    def _close_quietly(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

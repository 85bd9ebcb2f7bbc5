"""The spool's books: what it holds and what it dropped, cached in memory and kept true in the file.

:class:`SpoolBooks` counts the pending messages and their bytes (payload plus
topic, what ``max_bytes`` bounds) and the messages dropped ever, and keeps the
latest :data:`MAX_DROPPED_RANGES` seq ranges of dropped messages in the
``dropped_ranges`` table so telemetry can tell subscribers which seqs are gone
for good. It runs the SQL that changes them: making room by deleting the
oldest messages, deleting acknowledged ones. :class:`edge_runtime.mqtt.spool.Spool`
calls it under its lock, inside its transactions; the file itself is
:mod:`edge_runtime.mqtt.spool_file`'s.
"""

from __future__ import annotations

import sqlite3

from edge_runtime.mqtt.spool_file import transaction

__all__ = ["MAX_DROPPED_RANGES", "SpoolBooks"]

MAX_DROPPED_RANGES = 32
_VACUUM_PAGES = 256


class SpoolBooks:
    """Counters of one spool file and the SQL that keeps them in step with it (not thread-safe: the spool locks)."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.count = self.bytes = self.dropped = 0
        self._last_range: tuple[int, int] | None = None

    def load(self, conn: sqlite3.Connection, unsaved: int) -> None:
        """Read the counters from the file; ``unsaved`` losses not yet written to it stay counted."""
        count, total = conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()
        dropped = int(conn.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()[0])
        last = conn.execute("SELECT first, last FROM dropped_ranges ORDER BY first DESC LIMIT 1").fetchone()
        self.count, self.bytes, self.dropped = int(count), int(total), dropped + unsaved
        self._last_range = None if last is None else (int(last[0]), int(last[1]))

    @staticmethod
    def stored_ranges(conn: sqlite3.Connection) -> list[tuple[int, int]]:
        """The dropped seq ranges the file holds, oldest first."""
        rows = conn.execute("SELECT first, last FROM dropped_ranges ORDER BY first").fetchall()
        return [(int(a), int(b)) for a, b in rows]

    def make_room(self, conn: sqlite3.Connection, size: int) -> None:
        """Delete the oldest messages until one of ``size`` bytes fits the bound; record them as dropped."""
        excess_count = self.count + 1 - self.max_messages
        excess_bytes = self.bytes + size - self.max_bytes
        if excess_count <= 0 and excess_bytes <= 0:
            return
        first = last = n = freed = 0
        rows = conn.execute("SELECT seq, size FROM messages ORDER BY seq")
        for seq, row_size in rows:
            first = first or int(seq)
            last, n, freed = int(seq), n + 1, freed + int(row_size)
            if n >= excess_count and freed >= excess_bytes:
                break
        rows.close()
        if n == 0:
            return
        conn.execute("DELETE FROM messages WHERE seq <= ?", (last,))
        self.count -= n
        self.bytes -= freed
        self.record_drop(conn, first, last, n)
        self.dropped += n

    def record_drop(self, conn: sqlite3.Connection, first: int, last: int, n: int) -> None:
        """Add ``n`` to the file's dropped counter and ``first..last`` to its ranges (merged with the last one)."""
        conn.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (n,))
        if self._last_range is not None and first == self._last_range[1] + 1:
            conn.execute("UPDATE dropped_ranges SET last = ? WHERE first = ?", (last, self._last_range[0]))
            self._last_range = (self._last_range[0], last)
        else:
            conn.execute("INSERT OR REPLACE INTO dropped_ranges(first, last) VALUES (?, ?)", (first, last))
            conn.execute("DELETE FROM dropped_ranges WHERE first NOT IN "
                         "(SELECT first FROM dropped_ranges ORDER BY first DESC LIMIT ?)", (MAX_DROPPED_RANGES,))
            self._last_range = (first, last)

    def delete(self, conn: sqlite3.Connection, where: str, params: list[int]) -> int:
        """Delete the messages matching ``where`` (delivered ones) in one transaction; the number removed."""
        with transaction(conn):
            n, freed = conn.execute(f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages WHERE {where}",  # noqa: S608
                                    params).fetchone()
            if n:
                conn.execute(f"DELETE FROM messages WHERE {where}", params)  # noqa: S608
        self.count -= int(n)
        self.bytes -= int(freed)
        if n and self.count == 0 and conn.execute("PRAGMA freelist_count").fetchone()[0] > _VACUUM_PAGES:
            # Give a drained backlog's pages back to the file system. executescript steps the
            # pragma to completion; execute() would free a single page.
            conn.executescript("PRAGMA incremental_vacuum;")
        return int(n)

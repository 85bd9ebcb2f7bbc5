"""Messages the spool could not store (disk full, I/O error): counted in memory until the file takes them.

A failed :meth:`Spool.append <edge_runtime.mqtt.spool.Spool.append>` still uses up
its seq, so subscribers see a gap, and the gap is explained: the seq joins an
in-memory range here, counted in ``Spool.dropped`` and listed in
``Spool.dropped_ranges`` at once, and written to the database with the next
append that succeeds. Written ranges are handed out once by :meth:`LossLog.take_saved`
so the daemon can publish an event about them. If the process ends before the
file takes them, the count is lost with it (and a restart numbers on from the
last stored seq: the lost seqs were never delivered, so no subscriber has them).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["LossLog", "Lost"]

Lost = tuple[int, int, str]
"""(first seq, last seq, why): an inclusive range of seqs that were never stored."""
_MAX_RANGES = 64  # merged ranges kept in memory; older ones only stay counted


class LossLog:
    """Thread-safe record of unstored seqs (the spool calls it under its own lock as well)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._unsaved: list[list[int | str]] = []
        self._unsaved_count = 0
        self._saved: list[Lost] = []

    @property
    def unsaved(self) -> int:
        """Messages lost and not yet written into the database's dropped counter."""
        return self._unsaved_count

    def add(self, seq: int, why: str) -> None:
        """Record that ``seq`` was never stored, because of ``why`` (one line)."""
        with self._lock:
            self._unsaved_count += 1
            last = self._unsaved[-1] if self._unsaved else None
            if last is not None and last[1] == seq - 1:
                last[1] = seq
                return
            self._unsaved.append([seq, seq, why])
            del self._unsaved[:-_MAX_RANGES]

    def ranges(self) -> list[tuple[int, int]]:
        """The unsaved ranges, oldest first."""
        with self._lock:
            return [(int(a), int(b)) for a, b, _ in self._unsaved]

    def save(self, write: Callable[[int, int, int], None]) -> Callable[[], None]:
        """Call ``write(first, last, n)`` per unsaved range (inside the caller's transaction).

        Returns the function to call once that transaction committed: it moves
        the ranges to the saved list. If the transaction fails, do not call it.
        """
        with self._lock:
            pending = [(int(a), int(b), str(w)) for a, b, w in self._unsaved]
            count = self._unsaved_count
        if not pending:
            return lambda: None
        spans = sum(b - a + 1 for a, b, _ in pending)
        for i, (first, last, _) in enumerate(pending):
            # Ranges forgotten past _MAX_RANGES are still counted: the first range carries them.
            write(first, last, last - first + 1 + (count - spans if i == 0 else 0))

        def committed() -> None:
            with self._lock:
                del self._unsaved[:len(pending)]
                self._unsaved_count -= count
                self._saved.extend(pending)
        return committed

    def take_saved(self) -> list[Lost]:
        """Ranges written to the database since the last call (each handed out once)."""
        with self._lock:
            saved, self._saved = self._saved, []
        return saved

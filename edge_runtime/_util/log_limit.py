"""Repeated log lines folded into summaries, for every logger of the daemon.

:func:`install` puts a :class:`RepeatFilter` on each handler of the root
logger (``edge-runtime serve`` calls it where it sets up logging), so it sees
every record of every logger: ours, paho's, onnxruntime's. Records are keyed
by logger, level and the *unformatted* message (``"dropped %s"``, not the
text), so lines that differ only in their arguments count as repeats. Per key,
the first ``burst`` records of each ``window_seconds`` pass; the rest are
counted, and when the window ends one line says how many were held back::

    WARNING edge_runtime.commands.intake: command intake over 20/s: dropped a message on edge/dev1/cmd/ping
    (repeated 9,512 times in the last 10 s)

A summary is written when the key's window ends, at the next record of any
key or, when the log is quiet, by the thread :func:`install` starts. Memory is
bounded: at most ``max_keys`` keys are tracked (a flood of distinct messages
passes through unfolded rather than growing the table).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RepeatFilter", "install"]


@dataclass
class _Window:
    start: float
    passed: int = 0
    held: int = 0
    last: logging.LogRecord | None = None


class RepeatFilter(logging.Filter):
    """Lets ``burst`` records per key per ``window_seconds`` through, summarises the rest (thread-safe)."""

    def __init__(self, handler: logging.Handler, *, burst: int = 5, window_seconds: float = 10.0,
                 max_keys: int = 1000, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._handler = handler
        self.burst = burst
        self.window_seconds = window_seconds
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, int, str], _Window] = {}
        self._summaries = threading.local()
        self.holding = threading.Event()
        """Set while some line is held back for a summary: the flush thread sleeps on it when idle."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Called by the handler for each record: True lets it through."""
        if getattr(self._summaries, "emitting", False):
            return True  # one of our summaries, written below
        now = self._clock()
        key = (record.name, record.levelno, str(record.msg))
        with self._lock:
            due = self._expired(now)
            window = self._windows.get(key)
            if window is None and len(self._windows) < self.max_keys:
                window = self._windows[key] = _Window(now)
            keep = window is None or window.passed < self.burst
            if window is not None:
                if keep:
                    window.passed += 1
                else:
                    window.held += 1
                    window.last = record
                    self.holding.set()
        self._emit(due)
        return keep

    def flush(self) -> None:
        """Write the summaries of windows that have ended (the quiet-log timer calls this)."""
        with self._lock:
            due = self._expired(self._clock())
            if not any(w.held for w in self._windows.values()):
                self.holding.clear()
        self._emit(due)

    def _expired(self, now: float) -> list[logging.LogRecord]:
        """Summaries of ended windows (their keys are dropped); the caller holds the lock."""
        due: list[logging.LogRecord] = []
        for key, window in list(self._windows.items()):
            if now - window.start < self.window_seconds:
                continue
            del self._windows[key]
            if window.held and window.last is not None:
                last = window.last
                summary = logging.makeLogRecord(last.__dict__)
                summary.msg = f"{last.getMessage()} (repeated {window.held:,} times in the last " \
                              f"{self.window_seconds:g} s)"
                summary.args = None
                summary.exc_info = summary.exc_text = None
                due.append(summary)
        return due

    def _emit(self, summaries: list[logging.LogRecord]) -> None:
        if not summaries:
            return
        self._summaries.emitting = True
        try:
            for summary in summaries:
                self._handler.handle(summary)
        finally:
            self._summaries.emitting = False


def install(logger: logging.Logger | None = None, *, burst: int = 5,
            window_seconds: float = 10.0) -> list[RepeatFilter]:
    """Add a :class:`RepeatFilter` to every handler of ``logger`` (default: root) and start the flush thread.

    Returns the filters (tests flush them). Idempotent per handler.
    """
    target = logger or logging.getLogger()
    filters: list[RepeatFilter] = []
    for handler in target.handlers:
        existing = next((f for f in handler.filters if isinstance(f, RepeatFilter)), None)
        if existing is None:
            existing = RepeatFilter(handler, burst=burst, window_seconds=window_seconds)
            handler.addFilter(existing)
            _start_flusher(existing)
        filters.append(existing)
    return filters


def _start_flusher(repeat: RepeatFilter) -> None:
    def run() -> None:
        while True:
            repeat.holding.wait()  # an idle daemon logs nothing held back: no wake-ups at all
            time.sleep(min(1.0, repeat.window_seconds / 4))
            try:
                repeat.flush()
            except Exception:  # noqa: S112 - logging must never take the daemon down
                continue

    threading.Thread(target=run, name="log-summaries", daemon=True).start()

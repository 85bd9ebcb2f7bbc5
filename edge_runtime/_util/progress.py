"""Progress, not presence: heartbeats of the threads that do the work, and the restart budget.

A thread *makes progress* when it finishes a step of its work (a frame read,
an inference done) or when it waits legitimately (an idle folder poll, an
empty MQTT queue, a backoff before a reconnect): every such wait is cut into
slices of at most :data:`BEAT_SECONDS` with a :meth:`Heartbeat.beat` between
them. A thread blocked inside a call (OpenCV's open on a FIFO nobody writes, a
hung RTSP server, a camera driver that never returns) stops beating, so its
heartbeat's :meth:`~Heartbeat.age` grows past the stall bound.

:class:`RestartBudget` decides whether a stalled source may be restarted once
more: at most ``max_restarts`` in any ``window_seconds``. Both take a clock
(monotonic seconds), so tests drive them with a fake one.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

__all__ = ["BEAT_SECONDS", "Clock", "Heartbeat", "RestartBudget", "beating_wait"]

BEAT_SECONDS = 0.5
"""The longest a legitimately waiting thread goes without a beat."""

Clock = Callable[[], float]


class Heartbeat:
    """When one thread last made progress, in ``clock`` seconds (monotonic by default).

    :meth:`beat` is called by the thread doing the work; any thread may read
    :meth:`age`. A float assignment is atomic under the GIL, so no lock is needed.
    """

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        """Progress now."""
        self._last = self._clock()

    @property
    def last(self) -> float:
        """The clock reading of the last beat (the creation time before the first)."""
        return self._last

    def age(self) -> float:
        """Seconds since the last beat (never negative)."""
        return max(0.0, self._clock() - self._last)


def beating_wait(event: threading.Event, seconds: float, heartbeat: Heartbeat) -> bool:
    """Wait up to ``seconds`` for ``event``, beating at least every :data:`BEAT_SECONDS`; True when it is set."""
    deadline = time.monotonic() + max(0.0, seconds)
    while True:
        heartbeat.beat()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return event.is_set()
        if event.wait(min(BEAT_SECONDS, remaining)):
            heartbeat.beat()
            return True


class RestartBudget:
    """At most ``max_restarts`` restarts in any ``window_seconds``; thread-safe.

    ``max_restarts = 0`` allows none: a stall is reported and the daemon gives up at once.
    """

    def __init__(self, max_restarts: int, window_seconds: float, clock: Clock = time.monotonic) -> None:
        self.max_restarts = max_restarts
        self.window_seconds = window_seconds
        self._clock = clock
        self._times: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Use one restart if the window has one left: True when the caller may restart."""
        with self._lock:
            now = self._clock()
            while self._times and now - self._times[0] >= self.window_seconds:
                self._times.popleft()
            if len(self._times) >= self.max_restarts:
                return False
            self._times.append(now)
            return True

    def used(self) -> int:
        """Restarts taken within the current window."""
        with self._lock:
            now = self._clock()
            return sum(1 for t in self._times if now - t < self.window_seconds)

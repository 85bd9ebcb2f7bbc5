"""The pipeline's bounded queue between its source thread and its worker thread.

Two ways in: :meth:`ItemQueue.put_latest` drops the oldest items for a lossy
source (latest-frame policy), :meth:`ItemQueue.put_wait` waits for room for a
lossless one. It knows the item in flight (so a finished source can be told
from one whose last item is still running) and :meth:`ItemQueue.close` wakes
every waiter. Waits are sliced by :data:`~edge_runtime._util.progress.BEAT_SECONDS`
so the waiting thread keeps beating its heartbeat.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from edge_runtime._util.progress import BEAT_SECONDS
from edge_runtime.pipelines.sources.base import Item

__all__ = ["ItemQueue"]


class ItemQueue:
    """A bounded FIFO that knows what is in flight, and can be closed to wake every waiter."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: collections.deque[Item] = collections.deque()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._closed = False

    def put_latest(self, item: Item) -> tuple[int, int]:
        """Append, dropping the oldest items to make room; returns (dropped, depth)."""
        with self._cond:
            dropped = 0
            while len(self._items) >= self.size:
                self._items.popleft()
                dropped += 1
            self._items.append(item)
            self._cond.notify_all()
            return dropped, len(self._items)

    def put_wait(self, item: Item, beat: Callable[[], None]) -> int | None:
        """Append once there is room (calling ``beat`` while waiting); the depth, or None once closed."""
        with self._cond:
            while not self._cond.wait_for(lambda: self._closed or len(self._items) < self.size, BEAT_SECONDS):
                beat()
            if self._closed:
                return None
            self._items.append(item)
            self._cond.notify_all()
            return len(self._items)

    def get(self, beat: Callable[[], None]) -> tuple[Item, int] | None:
        """The next item and the depth left, marked in flight (``beat`` while idle); None once closed."""
        with self._cond:
            while not self._cond.wait_for(lambda: self._closed or bool(self._items), BEAT_SECONDS):
                beat()
            if self._closed:
                return None
            self._in_flight += 1
            item = self._items.popleft()
            self._cond.notify_all()
            return item, len(self._items)

    def done(self) -> None:
        """The item taken by the last :meth:`get` is finished."""
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def idle(self) -> bool:
        """Nothing queued and nothing in flight."""
        with self._cond:
            return not self._items and not self._in_flight

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

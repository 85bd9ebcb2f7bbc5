"""Pieces of the MQTT link that hold no network state: the message and delivery types,
the reconnect schedule and the thread that runs subscription handlers.

Import :class:`Message` and :class:`Delivery` from :mod:`edge_runtime.mqtt.link`.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from edge_runtime._util.retry_policy import equal_jitter

__all__ = ["Delivery", "Dispatcher", "Message", "backoff_delay"]

_log = logging.getLogger("edge_runtime.mqtt.link")  # one logger for the whole link, whichever module speaks


@dataclass(frozen=True)
class Message:
    """One incoming message. ``response_topic`` and ``correlation_data`` are MQTT 5 only (None with 3.1.1)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()


class Delivery:
    """Handle for one outgoing publish: done once the broker acknowledged it (QoS 1) or it was
    written to the socket (QoS 0); failed when the connection was lost first or the broker refused it."""

    __slots__ = ("_done", "_failure", "topic")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._done = threading.Event()
        self._failure: str | None = None

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True when delivered, False on timeout or failure (never raises)."""
        self._done.wait(timeout)
        return self._done.is_set() and self._failure is None

    @property
    def done(self) -> bool:
        """Delivered or failed (no longer waiting on the network)."""
        return self._done.is_set()

    @property
    def failed(self) -> bool:
        """It will never be acknowledged: the connection was lost or the broker refused it."""
        return self._done.is_set() and self._failure is not None

    @property
    def reason(self) -> str:
        """Why it failed, one line; empty unless :attr:`failed`."""
        return self._failure or ""

    def finish(self, failure: str | None) -> None:
        """Mark delivered (``failure`` None) or failed; the first call wins. For the link only."""
        if not self._done.is_set():
            self._failure = failure
            self._done.set()

    def __repr__(self) -> str:
        state = "failed" if self.failed else "delivered" if self.done else "pending"
        return f"Delivery({self.topic!r}, {state})"


def backoff_delay(attempt: int, low: float, high: float, rng: random.Random) -> float:
    """Seconds to wait before reconnect ``attempt`` (0 = the first after a loss or at start-up failure).

    Exponential from ``low`` with equal jitter, within ``[low, high]``: devices that
    lost the same broker do not come back in lock-step.
    """
    return equal_jitter(attempt + 1, low, max(high, low), rng, floor=low)


class Dispatcher:
    """Runs handlers one at a time, in arrival order, on its own thread ("mqtt-dispatch").

    The network thread only enqueues, so a slow handler delays other handlers but
    never keepalives or acknowledgements, and a raising one is logged and skipped.
    The queue is bounded (items and bytes): past that, new messages are dropped
    and counted (``dropped``) rather than stalling the network thread.
    """

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.dropped = 0
        self._cond = threading.Condition()
        self._items: deque[tuple[str, Callable[[], None], int]] = deque()
        self._bytes = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        """The thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start (or restart) the thread."""
        with self._cond:
            if self._stopping or self.alive:
                return
            self._thread = threading.Thread(target=self._run, name="mqtt-dispatch", daemon=True)
            self._thread.start()

    def ensure_running(self) -> None:
        """Watchdog hook: restart the thread if something killed it (e.g. SystemExit in a handler)."""
        if self._thread is not None and not self._stopping and not self._thread.is_alive():
            _log.warning("mqtt: watchdog: handler thread died; restarting it")
            self.start()

    def submit(self, what: str, fn: Callable[[], None], size: int = 0, *, droppable: bool = True) -> bool:
        """Queue ``fn``; False (and counted) when the queue is full and ``droppable``, or when stopping."""
        with self._cond:
            if self._stopping:
                return False
            if droppable and (len(self._items) >= self.max_items or self._bytes + size > self.max_bytes):
                self.dropped += 1
                dropped = self.dropped
            else:
                self._items.append((what, fn, size))
                self._bytes += size
                self._cond.notify()
                return True
        if dropped == 1 or dropped % 100 == 0:  # a flood must not turn into a log flood
            _log.warning("mqtt: handlers are behind, dropped %s (%d dropped so far)", what, dropped)
        return False

    def stop(self, timeout: float) -> None:
        """Discard what is queued and end the thread (waits up to ``timeout`` for a running handler)."""
        with self._cond:
            self._stopping = True
            self._items.clear()
            self._bytes = 0
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                what, fn, size = self._items.popleft()
                self._bytes -= size
            try:
                fn()
            except Exception:
                _log.exception("mqtt: %s raised (ignored; the link keeps running)", what)

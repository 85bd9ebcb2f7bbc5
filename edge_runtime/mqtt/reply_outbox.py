"""Command replies that wait for the link instead of being lost.

A reply can be ready while the link is down: a command that ran through an
outage (an update downloading while the broker restarts), or one the broker
redelivered right after CONNACK, before our resubscription is acknowledged and
the link counts as connected. :class:`ReplyOutbox` publishes a reply at once
when it can and otherwise keeps it, bounded in number (``max_items``) and age
(``max_age_seconds``), and sends what it kept when the link is back
(:meth:`flush`, called on every connect). A reply that cannot wait (outbox
full, too old) is dropped, counted (``lost``) and logged with its topic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from edge_runtime.errors import LinkError
from edge_runtime.mqtt.parts import Delivery

__all__ = ["Publisher", "ReplyOutbox"]

_log = logging.getLogger(__name__)


class Publisher(Protocol):
    """The part of :class:`~edge_runtime.mqtt.link.MqttLink` the outbox uses."""

    @property
    def connected(self) -> bool:
        """Publishing now goes out."""
        ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False,
                response_topic: str | None = None, correlation_data: bytes | None = None,
                user_properties: tuple[tuple[str, str], ...] | list[tuple[str, str]] = ()) -> Delivery:
        """Send one message (raises LinkError when not connected)."""
        ...


@dataclass(frozen=True)
class _Reply:
    topic: str
    payload: bytes
    correlation: bytes | None
    user_properties: tuple[tuple[str, str], ...]
    queued_at: float


class ReplyOutbox:
    """Publishes replies (QoS 1) now, or when the link is back; bounded. Thread-safe."""

    def __init__(self, link: Publisher, *, max_items: int = 256, max_age_seconds: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._link = link
        self.max_items = max_items
        self.max_age_seconds = max_age_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # one flusher at a time, so no reply goes out twice
        self._waiting: deque[_Reply] = deque()
        self.lost = 0
        self.delayed = 0

    @property
    def waiting(self) -> int:
        """Replies kept for the link."""
        with self._lock:
            return len(self._waiting)

    def send(self, topic: str, payload: bytes, *, correlation: bytes | None = None,
             user_properties: tuple[tuple[str, str], ...] = ()) -> None:
        """Publish now, or keep it for :meth:`flush` when the link is down. Never raises."""
        reply = _Reply(topic, payload, correlation, user_properties, self._clock())
        with self._lock:
            older = bool(self._waiting)
            if older:  # keep replies in order: this one goes after those already waiting
                self._keep(reply)
        if older or not self._publish(reply):
            if not older:
                with self._lock:
                    self._keep(reply)
            if self._link.connected:  # the link came back between the failure and now: do not wait
                self.flush()

    def flush(self) -> int:
        """Send the replies kept while the link was down, oldest first; returns how many went out."""
        with self._flushing:
            return self._flush()

    def _flush(self) -> int:
        sent = 0
        while True:
            with self._lock:
                self._expire()
                if not self._waiting:
                    return sent
                reply = self._waiting[0]
            if not self._publish(reply):
                return sent
            with self._lock:
                if self._waiting and self._waiting[0] is reply:
                    self._waiting.popleft()
            sent += 1

    def _publish(self, reply: _Reply) -> bool:
        try:
            self._link.publish(reply.topic, reply.payload, qos=1, correlation_data=reply.correlation,
                               user_properties=reply.user_properties)
        except LinkError:
            return False
        return True

    def _keep(self, reply: _Reply) -> None:
        """Queue ``reply`` (the caller holds the lock); the oldest is lost when full."""
        self._expire()
        if len(self._waiting) >= self.max_items:
            self._lose(self._waiting.popleft(), f"more than {self.max_items} replies waiting")
        self._waiting.append(reply)
        self.delayed += 1
        _log.info("reply to %s waits for the MQTT link (%d waiting)", reply.topic[:200], len(self._waiting))

    def _expire(self) -> None:
        now = self._clock()
        while self._waiting and now - self._waiting[0].queued_at > self.max_age_seconds:
            self._lose(self._waiting.popleft(), f"link down for more than {self.max_age_seconds:g} s")

    def _lose(self, reply: _Reply, why: str) -> None:
        self.lost += 1
        _log.warning("reply to %s lost: %s (%d lost so far)", reply.topic[:200], why, self.lost)

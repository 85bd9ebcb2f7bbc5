"""Drain the on-disk spool to the MQTT broker: in order, paced, deleted only after PUBACK.

One daemon thread per :class:`Forwarder`. While the link is up it publishes the
spooled messages oldest first with their stored QoS, keeps at most
``max_inflight`` publishes waiting for their PUBACK, and deletes a message from
the spool only once it and every older message were acknowledged, so nothing
the broker did not acknowledge is ever lost; subscribers may see a message
twice and drop duplicates by ``seq``.

After a disconnect the in-flight window is kept: an MQTT client such as paho
re-sends its unacknowledged QoS 1 messages itself on reconnect, and publishing
newer messages before those would reorder the stream. If the window is not
acknowledged within ``resume_grace`` seconds of the reconnect (the link does not
re-send), a PUBACK takes longer than ``ack_timeout``, or a delivery failed
(``Delivery.failed``, or ``Delivery.wait`` raised :class:`LinkError`), the
window is forgotten and publishing starts again from the oldest unacknowledged
message in the spool. A message the broker refuses three times in a row while
the link stays up is given up (logged, counted in ``stats.refused``) so that it
cannot block the stream forever.

Pacing: a GCRA token bucket lets at most ``flush_rate`` messages per second
through, with bursts of at most 10 ms worth. Draining a long backlog at line
rate would overflow the broker's per-client queue (mosquitto's default
``max_queued_messages 1000``), which silently drops QoS 1 messages for a slow
subscriber.

Idle, the thread blocks on an event: :meth:`Forwarder.wake` (call it after each
append and on reconnect) or a 1 s timeout, so a missed wake-up costs at most a
second and an idle daemon does not spin.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from edge_runtime.errors import LinkError
from edge_runtime.mqtt.spool import Spool, Spooled

__all__ = ["Delivery", "Forwarder", "ForwarderStats", "Publisher", "TokenBucket"]

_IDLE_S = 1.0  # re-check link and spool this often when nobody wakes us
_HEAD_WAIT_S = 0.2  # longest block on one PUBACK before re-checking link and stop
_BATCH = 256  # rows read from the spool at a time
_ACK_EVERY_S = 0.05  # acknowledged rows are deleted in batches, at least this often
_ACK_BATCH = 256
_BURST_S = 0.01
_MAX_REFUSALS = 3
_log = logging.getLogger(__name__)


class Delivery(Protocol):
    """The handle a publish returns.

    It may also have a ``failed`` attribute, True once it will never be acknowledged
    (connection lost, broker refused it): the forwarder then stops waiting for it at once.
    """

    def wait(self, timeout: float, /) -> bool:
        """True once the broker acknowledged the message (PUBACK); False if ``timeout`` s passed first."""
        ...


class Publisher(Protocol):
    """What the forwarder needs from the MQTT link."""

    def publish(self, topic: str, payload: bytes, /, *, qos: int, retain: bool) -> Delivery:
        """Send one message. Raises :class:`LinkError` when the link is down."""
        ...


class TokenBucket:
    """GCRA pacing: at most ``rate`` takes per second, bursts of at most ``burst``.

    ``clock`` and ``sleep`` are injectable; the schedule advances by what was
    asked of ``sleep``, so an oversleep is not made up for with a burst.
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float], sleep: Callable[[float], None]) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self._interval = 1.0 / rate
        self._tolerance = (burst - 1.0) * self._interval
        self._clock, self._sleep = clock, sleep
        self._tat: float | None = None  # theoretical arrival time of the next take

    def take(self) -> None:
        """Block until one more message may go."""
        now = self._clock()
        tat = now if self._tat is None else max(self._tat, now)
        early = tat - now - self._tolerance
        if early > 1e-9:  # float rounding must not turn an allowed burst into a nap
            self._sleep(early)
        self._tat = tat + self._interval


@dataclass
class ForwarderStats:
    """Counters since start: publishes sent, messages acknowledged and deleted, drains abandoned,
    messages given up because the broker kept refusing them."""

    published: int = 0
    acked: int = 0
    aborted: int = 0
    refused: int = 0


@dataclass
class _InFlight:
    seq: int
    delivery: Delivery
    sent: float


class Forwarder:
    """Forwards the spool to a :class:`Publisher` from one background thread.

    ``connected`` says whether the link is up (cheap, called often); ``clock``
    and ``sleep`` pace the publishes (monotonic seconds).
    """

    def __init__(self, spool: Spool, publisher: Publisher, *, flush_rate: float, max_inflight: int,
                 connected: Callable[[], bool], clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, ack_timeout: float = 30.0,
                 resume_grace: float = 3.0) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        self._spool = spool
        self._publisher = publisher
        self._connected = connected
        self._clock = clock
        self._max_inflight = max_inflight
        self._ack_timeout = ack_timeout
        self._resume_grace = resume_grace
        # Publishes still waiting for their PUBACK, oldest first; kept across a reconnect.
        self._window: collections.deque[_InFlight] = collections.deque()
        self._refused_seq, self._refusals = 0, 0
        self._bucket = TokenBucket(flush_rate, max(1.0, flush_rate * _BURST_S), clock, sleep)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = ForwarderStats()

    def start(self) -> None:
        """Start the forwarding thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="spool-forwarder", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; unacknowledged messages stay in the spool for next time."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                _log.warning("spool forwarder did not stop within %.1f s", timeout)
            self._thread = None

    def wake(self) -> None:
        """Something changed (a message was appended, the link came back): look now."""
        self._wake.set()

    @property
    def alive(self) -> bool:
        """The thread is running (for the watchdog)."""
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ thread

    def _run(self) -> None:
        while not self._stop.is_set():
            # Clear before looking, so a wake() that lands while we drain is not lost.
            self._wake.clear()
            try:
                if self._connected() and self._spool.pending and self._drain():
                    continue
            except Exception:  # a spool or publisher bug must not kill the thread
                _log.exception("spool forwarder failed; retrying")
                self._stop.wait(_IDLE_S)
            self._wake.wait(_IDLE_S)

    def _drain(self) -> bool:
        """Publish until the spool is empty (True) or the link fails (False)."""
        window = self._window
        resuming = bool(window)
        for entry in window:  # the link could not deliver while it was down: restart their clocks
            entry.sent = self._clock()
        buffer: collections.deque[Spooled] = collections.deque()
        cursor = window[-1].seq if window else 0  # highest seq in flight
        acked = _Acker(self._spool, self._clock, self.stats)
        try:
            while not self._stop.is_set():
                if not self._reap(acked, block=False):
                    return self._delivery_failed()
                if not self._connected():
                    return self._abort("link down", forget=False)
                resuming = resuming and bool(window)
                if not buffer and not resuming:
                    buffer.extend(self._spool.peek(_BATCH, after=cursor))
                if resuming or not buffer or len(window) >= self._max_inflight:
                    if not window:
                        return True  # nothing in flight and nothing left
                    if not self._reap(acked, block=True):
                        return self._delivery_failed()
                    limit = self._resume_grace if resuming else self._ack_timeout
                    if window and self._clock() - window[0].sent > limit:
                        self._wake.set()  # the link is up: re-publish right away, not after the idle wait
                        return self._abort(f"no PUBACK for seq {window[0].seq} within {limit:.1f} s", forget=True)
                    continue
                message = buffer.popleft()
                self._bucket.take()
                try:
                    delivery = self._publisher.publish(message.topic, message.payload, qos=message.qos, retain=False)
                except LinkError as e:
                    return self._abort(e.one_line(), forget=False)
                self.stats.published += 1
                window.append(_InFlight(message.seq, delivery, self._clock()))
                cursor = message.seq
            return True
        finally:
            acked.flush()

    def _reap(self, acked: _Acker, *, block: bool) -> bool:
        """Pop the acknowledged head of the window; False when the head's delivery failed."""
        window = self._window
        timeout = _HEAD_WAIT_S if block else 0.0
        while window:
            delivery = window[0].delivery
            try:
                if delivery.wait(timeout):
                    acked.done(window.popleft().seq)
                    timeout = 0.0
                    continue
            except LinkError:
                return False
            if getattr(delivery, "failed", False):  # optional: the link says it will never be acknowledged
                return False
            break
        acked.maybe_flush()
        return True

    def _delivery_failed(self) -> bool:
        """The head's delivery failed: a lost connection (re-publish later) or a refusal by a broker still
        connected (re-publish now, and after ``_MAX_REFUSALS`` in a row give that one message up so it
        cannot block everything behind it forever)."""
        seq = self._window[0].seq
        if not self._connected():
            return self._abort(f"delivery of seq {seq} failed", forget=True)
        self._refusals = self._refusals + 1 if seq == self._refused_seq else 1
        self._refused_seq = seq
        if self._refusals >= _MAX_REFUSALS:
            _log.error("spool forwarder: the broker refused seq %d %d times in a row: dropping it", seq, self._refusals)
            self._spool.ack([seq])
            self.stats.refused += 1
            self._refusals = 0
        self._wake.set()
        return self._abort(f"the broker refused seq {seq}", forget=True)

    def _abort(self, reason: str, *, forget: bool) -> bool:
        """End a drain. ``forget``: the window will never be acknowledged, re-publish it from the spool."""
        self.stats.aborted += 1
        if forget:
            self._window.clear()
        _log.info("spool forwarder paused (%s); %d messages wait", reason, self._spool.pending)
        return False


class _Acker:
    """Deletes acknowledged messages from the spool in batches (fewer sqlite commits)."""

    def __init__(self, spool: Spool, clock: Callable[[], float], stats: ForwarderStats) -> None:
        self._spool, self._clock, self._stats = spool, clock, stats
        self._done = 0  # highest seq acknowledged, with every older one
        self._n = 0
        self._last = clock()

    def done(self, seq: int) -> None:
        self._done, self._n = seq, self._n + 1

    def maybe_flush(self) -> None:
        if self._n >= _ACK_BATCH or (self._n and self._clock() - self._last >= _ACK_EVERY_S):
            self.flush()

    def flush(self) -> None:
        if self._n:
            # The window is reaped head first, so everything up to _done was acknowledged.
            self._spool.ack(self._done)
            self._stats.acked += self._n
            self._n = 0
        self._last = self._clock()

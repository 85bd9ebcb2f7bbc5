"""The first gate a command message meets: retained messages refused, intake rate bounded.

:class:`CommandIntake` runs on the MQTT handler thread for every message on a
command topic, before anything is parsed or queued, and costs a few integer
operations, so a flood is shed where it arrives:

- **Retained messages never run.** With MQTT 5 (without Retain As Published,
  which we never ask for) and with 3.1.1 the broker sets the retain flag on
  delivery only for a message sent from its retained store when we subscribe,
  which happens on every connect. A live sender's message arrives with the
  flag clear even when it was published retained. So a flagged message is one
  a broker replays by itself: it is refused on the first connect and on each
  reconnect, whatever ``command_id_window_seconds`` says. It gets no reply
  (nobody is waiting for one, and a reply per device per reconnect would be a
  storm); it is counted (``refused_retained``) and logged, and the log filter
  of the daemon (:mod:`edge_runtime._util.log_limit`) folds repeats into a summary.
- **A token bucket bounds intake** for the whole device (all command topics
  together): ``rate`` messages per second, bursts of ``burst``. Past that a
  message is dropped without a reply (answering a flood would double it) and
  counted (``dropped_rate``). Honest operators send a few commands a minute;
  the bucket refills within a second once a flood stops.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["CommandIntake", "TokenBucket"]

_log = logging.getLogger(__name__)


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; starts full. Thread-safe."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Take one token; False (nothing taken) when the bucket is empty."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            return True


class CommandIntake:
    """Decides whether a command message goes on to be parsed and run (see the module doc)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._bucket = TokenBucket(rate, burst, clock)
        self._lock = threading.Lock()
        self.accepted = 0
        self.refused_retained = 0
        self.dropped_rate = 0

    def admit(self, topic: str, retain: bool) -> bool:
        """True when the message on ``topic`` may be handled; False when it is refused (and counted)."""
        if retain:
            with self._lock:
                self.refused_retained += 1
            _log.warning("refused a retained command on %s: commands never run from the broker's retained "
                         "store (clear it: publish an empty retained message to that topic)", topic[:200])
            return False
        if not self._bucket.take():
            with self._lock:
                self.dropped_rate += 1
            _log.warning("command intake over %g/s: dropped a message on %s", self._bucket.rate, topic[:200])
            return False
        with self._lock:
            self.accepted += 1
        return True

    def counts(self) -> dict[str, int]:
        """``accepted``, ``refused_retained`` and ``dropped_rate`` since start."""
        with self._lock:
            return {"accepted": self.accepted, "refused_retained": self.refused_retained,
                    "dropped_rate": self.dropped_rate}

"""The base classes of every input source: :class:`Source`, what it reports to, what it yields.

See :mod:`edge_runtime.pipelines.sources` for the source types and :func:`~edge_runtime.pipelines.sources.build_source`.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from numpy.typing import NDArray

from edge_runtime._util.progress import Heartbeat, beating_wait
from edge_runtime.telemetry.events import EventBus
from edge_runtime.telemetry.metrics import Metrics

__all__ = ["Item", "MqttInputs", "NoSource", "Payload", "Source", "SourceContext"]

Payload = bytes | NDArray[Any]
Item = tuple[str, Payload]

# The package's logger name, as before the base classes moved here (users filter logs by it).
_log = logging.getLogger("edge_runtime.pipelines.sources")


@dataclass(frozen=True)
class MqttInputs:
    """How ``mqtt`` sources subscribe: the link's ``subscribe`` and the default topic base."""

    subscribe: Callable[[str, Callable[[Any], None]], None]
    topic_base: str
    max_bytes: int
    answer: Callable[[str | None, dict[str, Any], bytes], None] | None = None  # see mqtt_input.Answer


@dataclass(frozen=True)
class SourceContext:
    """What every source reports to: its pipeline's name, metrics, events, and the stop event."""

    pipeline: str
    metrics: Metrics
    events: EventBus
    stop_event: threading.Event
    mqtt: MqttInputs | None = None


class Source(abc.ABC):
    """Base of every source: the item iterator plus failure/recovery reporting.

    Subclasses write :meth:`items`; they call :meth:`_failed` on every failed
    attempt (each is counted in ``metrics.source_error``, but only the first of
    an outage emits a ``source_failed`` event) and :meth:`_recovered` once data
    flows again (one ``source_recovered`` event). ``label`` names the source in
    logs and events and must never contain a secret.

    ``progress`` is the source thread's heartbeat: the pipeline beats it for
    every item, :meth:`_wait` while waiting; a source blocked in a call stops
    beating and is reported as stalled (:mod:`edge_runtime.liveness`).
    ``ctx.stop_event`` belongs to this source alone: setting it ends this one.
    """

    lossy: ClassVar[bool] = False

    def __init__(self, ctx: SourceContext, label: str) -> None:
        self.ctx = ctx
        self.label = label
        self.stop_event = ctx.stop_event
        self._down_since: float | None = None
        self._failures = 0
        self.progress = Heartbeat()

    @abc.abstractmethod
    def items(self) -> Iterator[Item]:
        """Yield ``(key, payload)`` until the source ends or ``stop_event`` is set.

        Waits check ``stop_event`` and beat ``progress`` at least every half second. Source failures
        are reported and retried inside; an exception escaping here is a bug
        (the pipeline reports it and stops being ``alive``).
        """

    def ack(self, key: str, error: str | None = None) -> None:  # noqa: B027 - optional hook
        """``key`` was processed (``error``: why it failed, one line). Called from the worker thread."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the source holds; called once, after its iterator has finished."""

    @property
    def down(self) -> bool:
        """True during an outage (between a failure and the next recovery)."""
        return self._down_since is not None

    def _wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds`` (woken at once by a stop), beating ``progress``; True when stopping."""
        return beating_wait(self.stop_event, seconds, self.progress)

    def _failed(self, reason: str) -> None:
        """One failed attempt: counted always, an event only when the outage starts."""
        self.ctx.metrics.source_error(self.ctx.pipeline)
        self._failures += 1
        if self._down_since is None:
            self._down_since = time.monotonic()
            _log.warning("%s: source failed: %s (retrying)", self.label, reason)
            self.ctx.events.emit("source_failed", reason=f"{self.label}: {reason}", pipeline=self.ctx.pipeline,
                                 source=self.label)
        else:
            _log.debug("%s: still failing: %s", self.label, reason)

    def _recovered(self) -> None:
        """Data flows again: closes the outage with one event (no-op when not down)."""
        if self._down_since is None:
            return
        outage = time.monotonic() - self._down_since
        attempts, self._down_since, self._failures = self._failures, None, 0
        _log.info("%s: source recovered after %.1f s (%d failed attempts)", self.label, outage, attempts)
        self.ctx.events.emit("source_recovered", reason=f"{self.label}: recovered after {outage:.1f} s",
                             pipeline=self.ctx.pipeline, source=self.label, outage_s=round(outage, 3),
                             attempts=attempts)

    def _bad_item(self, key: str, reason: str) -> None:
        """One input that cannot be used (unreadable, oversized): counted and reported, per item."""
        self.ctx.metrics.source_error(self.ctx.pipeline)
        _log.warning("%s: skipping %s: %s", self.label, key, reason)
        self.ctx.events.emit("source_error", reason=f"{key}: {reason}", pipeline=self.ctx.pipeline,
                             source=self.label, key=key)


class NoSource(Source):
    """Type ``none``: yields nothing and ends at once (the model is served through the API only)."""

    def items(self) -> Iterator[Item]:
        """An empty iterator."""
        return iter(())

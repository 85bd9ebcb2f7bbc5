"""Input sources for pipelines: one module per source type, chosen by ``SourceConfig.type``.

A source yields ``(key, payload)`` items from :meth:`Source.items` until it
ends or its stop event is set: ``bytes`` for files (JPEG/PNG/.npy, run with
``InferenceService.predict_bytes``) or a BGR ``np.ndarray`` for captured frames
(``predict_image``). The pipeline calls :meth:`Source.ack` once an item was
processed, so a source can persist progress, and :meth:`Source.close` at the end.

``lossy`` says what a full pipeline queue does with a new item: lossy sources
(cameras, streams) drop the oldest frame (latest-frame policy); lossless ones
(the folder) block until there is room, because every file must be processed.

Types: ``folder`` (:mod:`.folder`), ``video`` / ``camera`` / ``rtsp``
(:mod:`.capture`), ``mqtt`` (:mod:`.mqtt_input`), ``none`` (no input: the
model is served through the API only). Anything else is refused by
:func:`build_source` at start-up.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from numpy.typing import NDArray

from edge_runtime._util.progress import Heartbeat, beating_wait
from edge_runtime.config.model import Limits, SourceConfig
from edge_runtime.errors import ConfigError
from edge_runtime.telemetry.events import EventBus
from edge_runtime.telemetry.metrics import Metrics

__all__ = [
    "SOURCE_TYPES",
    "Item",
    "MqttInputs",
    "NoSource",
    "Payload",
    "Source",
    "SourceContext",
    "build_source",
]

Payload = bytes | NDArray[Any]
Item = tuple[str, Payload]
SOURCE_TYPES = ("folder", "video", "camera", "rtsp", "mqtt", "none")

_log = logging.getLogger(__name__)


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


SourceFactory = Callable[[SourceConfig, SourceContext, Path, Limits], Source]


def _folder(config: SourceConfig, ctx: SourceContext, state_dir: Path, limits: Limits) -> Source:
    from edge_runtime.pipelines.sources.folder import FolderSource

    return FolderSource.from_config(config, ctx, state_dir=state_dir, limits=limits)


def _capture(config: SourceConfig, ctx: SourceContext, state_dir: Path, limits: Limits) -> Source:
    from edge_runtime.pipelines.sources.capture import CaptureSource

    return CaptureSource.from_config(config, ctx)


def _mqtt(config: SourceConfig, ctx: SourceContext, state_dir: Path, limits: Limits) -> Source:
    from edge_runtime.pipelines.sources.mqtt_input import MqttInputSource

    if ctx.mqtt is None:
        raise ConfigError(f"pipeline {ctx.pipeline!r}: source type 'mqtt' needs [mqtt] enabled = true")
    topic = config.topic or f"{ctx.mqtt.topic_base}/input/{ctx.pipeline}"
    return MqttInputSource(ctx, topic=topic, subscribe=ctx.mqtt.subscribe, max_bytes=ctx.mqtt.max_bytes,
                           answer=ctx.mqtt.answer, buffer=max(config.queue, 8))


def _none(config: SourceConfig, ctx: SourceContext, state_dir: Path, limits: Limits) -> Source:
    return NoSource(ctx, "none")


# Modules are imported on use: a folder-only device never loads the capture code.
_FACTORIES: dict[str, SourceFactory] = {
    "folder": _folder,
    "video": _capture,
    "camera": _capture,
    "rtsp": _capture,
    "mqtt": _mqtt,
    "none": _none,
}


def build_source(config: SourceConfig, *, state_dir: Path, pipeline_name: str, limits: Limits, metrics: Metrics,
                 events: EventBus, stop_event: threading.Event, mqtt: MqttInputs | None = None) -> Source:
    """The source ``config.type`` names, reporting as pipeline ``pipeline_name``.

    The folder source keeps its progress in ``<state_dir>/sources/<pipeline>.db``.
    Nothing is opened or read for capture sources until the pipeline starts.

    Raises:
        ConfigError: unknown type, or a setting the type needs is missing.
        OSError: the folder source's state database cannot be created.
    """
    factory = _FACTORIES.get(config.type)
    if factory is None:
        raise ConfigError(f"unknown source type {config.type!r} for pipeline {pipeline_name!r} "
                          f"(known: {', '.join(SOURCE_TYPES)})")
    ctx = SourceContext(pipeline=pipeline_name, metrics=metrics, events=events, stop_event=stop_event, mqtt=mqtt)
    return factory(config, ctx, state_dir, limits)

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

import threading
from collections.abc import Callable
from pathlib import Path

from edge_runtime.config.model import Limits, SourceConfig
from edge_runtime.errors import ConfigError
from edge_runtime.pipelines.sources.base import Item, MqttInputs, NoSource, Payload, Source, SourceContext
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

SOURCE_TYPES = ("folder", "video", "camera", "rtsp", "mqtt", "none")

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

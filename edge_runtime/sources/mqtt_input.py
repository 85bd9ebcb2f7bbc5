"""Source type ``mqtt``: images or .npy tensors arriving on a topic.

Each message is one input. Its key (the ``correlation_id`` its result carries)
is the MQTT 5 correlation data (UTF-8, else hex), else the user property
``correlation_id``, else a generated ``mqtt-<n>``. Payloads over the cap are
refused and reported; when the device falls behind, new messages beyond the
bounded buffer are dropped and counted rather than queued without limit.
"""

from __future__ import annotations

import itertools
import queue
from collections.abc import Callable, Iterator
from typing import Protocol

from . import Item, Source, SourceContext

__all__ = ["InputMessage", "MqttInputSource", "Subscribe"]


class InputMessage(Protocol):
    """What the source reads from an incoming MQTT message (mqtt_link.Message fits)."""

    @property
    def payload(self) -> bytes: ...

    @property
    def correlation_data(self) -> bytes | None: ...

    @property
    def user_properties(self) -> tuple[tuple[str, str], ...]: ...


Subscribe = Callable[[str, Callable[[InputMessage], None]], None]


class MqttInputSource(Source):
    """Feeds a pipeline from ``topic``; ``subscribe(topic, handler)`` is the MQTT link's."""

    lossy = False  # every accepted message gets a result; overload is shed at the buffer instead

    def __init__(self, ctx: SourceContext, *, topic: str, subscribe: Subscribe, max_bytes: int,
                 buffer: int = 32) -> None:
        super().__init__(ctx, f"mqtt:{topic}")
        self.topic = topic
        self.max_bytes = max_bytes
        self._buffer: queue.Queue[Item] = queue.Queue(maxsize=buffer)
        self._counter = itertools.count(1)
        subscribe(topic, self._on_message)

    def _on_message(self, message: InputMessage) -> None:
        key = _correlation_id(message) or f"mqtt-{next(self._counter)}"
        if len(message.payload) > self.max_bytes:
            self._bad_item(key, f"payload of {len(message.payload)} bytes exceeds the {self.max_bytes}-byte cap")
            return
        try:
            self._buffer.put_nowait((key, bytes(message.payload)))
        except queue.Full:
            self.ctx.metrics.drop(self.ctx.pipeline)

    def items(self) -> Iterator[Item]:
        """Messages in arrival order until the stop event is set."""
        while not self.stop_event.is_set():
            try:
                yield self._buffer.get(timeout=0.5)
            except queue.Empty:
                self.progress.beat()  # idle is progress: nothing arrived, nothing is stuck
                continue


def _correlation_id(message: InputMessage) -> str:
    data = message.correlation_data
    if data:
        try:
            text = data.decode("utf-8")
            if text.isprintable():
                return text[:128]
        except UnicodeDecodeError:
            pass
        return data.hex()[:128]
    for key, value in message.user_properties:
        if key == "correlation_id":
            return value[:128]
    return ""

"""Source type ``mqtt``: images or .npy tensors arriving on a topic; every input gets one answer.

Each message is one input. Its key (the ``correlation_id`` its answer carries)
is the MQTT 5 correlation data (UTF-8, else hex), else the user property
``correlation_id``, else a generated ``mqtt-<n>``.

The answer is the result record, or ``{"ok": false, "error": ...}`` naming what
is wrong (undecodable payload, over the size cap, device busy, inference
failed). It goes to the message's MQTT 5 Response Topic with its Correlation
Data echoed when it has one, else to ``<prefix>/<device>/results/<model>``.
Bounded: payloads over the cap are refused; when the device falls behind, new
messages beyond the bounded buffer are dropped and counted rather than queued
without limit; and the answers to refused messages (which cost a sender
nothing to cause) are capped at ``REFUSAL_ANSWERS_PER_SECOND`` (the refused
input itself is always counted, as a drop or a source error).
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from edge_runtime.pipelines.sources.base import Item, Source, SourceContext

__all__ = ["REFUSAL_ANSWERS_PER_SECOND", "Answer", "InputMessage", "MqttInputSource", "Subscribe"]

REFUSAL_ANSWERS_PER_SECOND = 10
_MAX_RESPONSE_TOPIC = 512


class InputMessage(Protocol):
    """What the source reads from an incoming MQTT message (mqtt_link.Message fits)."""

    @property
    def payload(self) -> bytes: ...

    @property
    def correlation_data(self) -> bytes | None: ...

    @property
    def response_topic(self) -> str | None: ...

    @property
    def user_properties(self) -> tuple[tuple[str, str], ...]: ...


Subscribe = Callable[[str, Callable[[InputMessage], None]], None]
Answer = Callable[[str | None, dict[str, Any], bytes], None]
"""``answer(response_topic, doc, correlation)``: publish ``doc`` at the response topic, or the results
topic when None; the link's (it never raises: a lost answer is best effort like every result)."""

_Origin = tuple[str | None, bytes]  # (response topic, correlation data to echo)


class MqttInputSource(Source):
    """Feeds a pipeline from ``topic``; ``subscribe(topic, handler)`` is the MQTT link's, ``answer`` publishes."""

    lossy = False  # every accepted message gets a result; overload is shed at the buffer instead

    def __init__(self, ctx: SourceContext, *, topic: str, subscribe: Subscribe, max_bytes: int,
                 answer: Answer | None = None, buffer: int = 32) -> None:
        super().__init__(ctx, f"mqtt:{topic}")
        self.topic = topic
        self.max_bytes = max_bytes
        self._answer = answer
        self._buffer: queue.Queue[Item] = queue.Queue(maxsize=buffer)
        self._counter = itertools.count(1)
        # Where each accepted input's answer goes, by key (FIFO per key: senders may reuse one).
        # Bounded: an input leaves it when answered; past the cap the oldest is forgotten.
        self._origins: collections.OrderedDict[str, collections.deque[_Origin]] = collections.OrderedDict()
        self._origins_cap = 4 * buffer + 64
        self._lock = threading.Lock()
        self._refusal_window = (0.0, 0)  # (second, answers sent in it)
        subscribe(topic, self._on_message)

    def _on_message(self, message: InputMessage) -> None:
        key = _correlation_id(message) or f"mqtt-{next(self._counter)}"
        origin = (_usable_topic(message.response_topic), message.correlation_data or key.encode())
        if len(message.payload) > self.max_bytes:
            reason = f"payload of {len(message.payload)} bytes exceeds the {self.max_bytes}-byte cap"
            self._bad_item(key, reason)
            self._refused(origin, key, reason)
            return
        with self._lock:
            self._remember(key, origin)
        try:
            self._buffer.put_nowait((key, bytes(message.payload)))
        except queue.Full:
            self._take(key, newest=True)
            self.ctx.metrics.drop(self.ctx.pipeline)
            self._refused(origin, key, "device busy: input buffer full, message dropped")

    def items(self) -> Iterator[Item]:
        """Messages in arrival order until the stop event is set."""
        while not self.stop_event.is_set():
            try:
                yield self._buffer.get(timeout=0.5)
            except queue.Empty:
                self.progress.beat()  # idle is progress: nothing arrived, nothing is stuck
                continue

    def ack(self, key: str, error: str | None = None) -> None:
        """A failed input is answered with its error now; a good one by :meth:`answer` with its result."""
        if error is not None:
            origin = self._take(key)
            if origin is not None:
                self._send(origin, self._error_doc(key, error))

    def answer(self, record: dict[str, Any]) -> None:
        """Publish the pipeline's result ``record`` for its input (a no-op for a key never seen)."""
        key = str(record.get("key", ""))
        origin = self._take(key)
        if origin is not None:
            self._send(origin, {**record, "correlation_id": key, "ok": True})

    # ------------------------------------------------------------------ internals

    def _remember(self, key: str, origin: _Origin) -> None:
        self._origins.setdefault(key, collections.deque()).append(origin)
        self._origins.move_to_end(key)
        while len(self._origins) > self._origins_cap:
            self._origins.popitem(last=False)

    def _take(self, key: str, newest: bool = False) -> _Origin | None:
        with self._lock:
            pending = self._origins.get(key)
            if not pending:
                return None
            origin = pending.pop() if newest else pending.popleft()
            if not pending:
                del self._origins[key]
            return origin

    def _refused(self, origin: _Origin, key: str, reason: str) -> None:
        """Answer a message refused before the pipeline, within the per-second cap."""
        now = int(time.monotonic())
        with self._lock:
            second, sent = self._refusal_window
            if second != now:
                second, sent = now, 0
            if sent >= REFUSAL_ANSWERS_PER_SECOND:
                return  # the input is counted already (drop / source error); only its answer is shed
            self._refusal_window = (second, sent + 1)
        self._send(origin, self._error_doc(key, reason))

    def _error_doc(self, key: str, reason: str) -> dict[str, Any]:
        return {"pipeline": self.ctx.pipeline, "key": key, "correlation_id": key, "ok": False, "error": reason,
                "ts": round(time.time(), 3)}

    def _send(self, origin: _Origin, doc: dict[str, Any]) -> None:
        if self._answer is not None:
            self._answer(origin[0], doc, origin[1])


def _usable_topic(topic: str | None) -> str | None:
    """A response topic we can publish to: no wildcards, no NUL, bounded; anything else means none."""
    if not topic or len(topic) > _MAX_RESPONSE_TOPIC or any(c in topic for c in "+#\0"):
        return None
    return topic


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

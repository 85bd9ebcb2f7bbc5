"""A pipeline: one source feeding one model through a bounded queue, results to the log and a sink.

Two daemon threads. The *source thread* pulls items from the source into a
queue of ``config.source.queue`` items: a lossy source (camera, stream) drops
the oldest item when the queue is full (latest-frame policy, counted in
``metrics.drop``); a lossless one (folder) waits for room, so every file is
processed. The *worker thread* runs each item through the
:class:`InferenceService` and hands a JSON-ready record to ``on_result`` (the daemon prints it once, as
JSON on stdout, for ``results = "log"``; it is not logged a second time).

Errors never stop the worker: a bad input is counted as a source error and
reported per item (``source_error`` event); inference failures are counted
by the service and reported once per run of failures (``inference_error``,
then ``inference_recovered``). While the model is not loaded, a lossless
pipeline holds its item until it is; a lossy one drops frames. A source that
raises (a bug) ends its thread with a ``pipeline_failed`` event and
:attr:`Pipeline.alive` turns False, which stops the systemd watchdog.

Both threads beat a heartbeat (:mod:`edge_runtime._util.progress`): the source's for every
item and every slice of a legitimate wait, the worker's for every item and
while idle. :meth:`Pipeline.stalled` names a thread whose heartbeat is older
than a bound; :meth:`Pipeline.restart_source` abandons a stuck source thread
(a blocked OpenCV call cannot be interrupted) and starts a fresh source.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from edge_runtime._util.progress import BEAT_SECONDS, Heartbeat
from edge_runtime.config.model import PipelineConfig
from edge_runtime.errors import BusyError, CacheError, EdgeRuntimeError, InputError
from edge_runtime.pipelines.sources.base import Item, Source
from edge_runtime.runtime.service import InferenceService
from edge_runtime.telemetry.events import EventBus
from edge_runtime.telemetry.metrics import Metrics

__all__ = ["Pipeline", "ResultSink", "SourceFactory"]

ResultSink = Callable[[dict[str, Any]], None]
"""``on_result(record)``: ``{"pipeline", "model", "version", "key", "result", "latency_ms", "ts"}``.

``result`` is the postprocessed result of the one batch item (as ``edge-runtime run``
prints it), ``latency_ms`` the stage timings (``preprocess``, ``infer``,
``postprocess``, ``total``), ``ts`` Unix seconds. Every value is JSON-ready.
"""

SourceFactory = Callable[[], Source]
"""Builds a fresh source of the same configuration (to replace a stalled one)."""

_MODEL_RETRY_SECONDS = 0.5
_BLOCKED_SECONDS = 4 * BEAT_SECONDS  # a thread without a beat this long is blocked in a call, not waiting
_log = logging.getLogger(__name__)


class _ItemQueue:
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


class Pipeline:
    """Runs ``config.model`` on every item of ``source``; see the module docstring for the policy.

    Nothing runs until :meth:`start`. ``on_result`` is called from the worker
    thread (keep it quick); what it does with ``results`` is the caller's (the daemon's sink).
    ``new_source`` builds a replacement source for :meth:`restart_source`
    (None: this pipeline's source cannot be restarted).
    """

    def __init__(self, config: PipelineConfig, source: Source, service: InferenceService, metrics: Metrics,
                 events: EventBus, on_result: ResultSink | None = None, *,
                 new_source: SourceFactory | None = None) -> None:
        self.config = config
        self.name = config.label
        self.model = config.model
        self.source = source
        self.service = service
        self.metrics = metrics
        self.events = events
        self.on_result = on_result
        self._queue = _ItemQueue(config.source.queue)
        self._stopping = threading.Event()
        self._source_ended = threading.Event()  # the source finished by itself (a video's end)
        self._new_source = new_source
        self._abandoned: list[threading.Thread] = []  # source threads left blocked by restart_source
        self.restarts = 0
        self.worker_progress = Heartbeat()
        self._source_thread = self._source_thread_for(source)
        self._worker = threading.Thread(target=self._work, name=f"infer-{self.name}", daemon=True)
        self._closed = False
        self._inference_failures = 0  # consecutive; the worker thread alone touches these three
        self._bad_inputs = 0
        self._model_missing = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start both threads.

        Raises:
            RuntimeError: started twice (a pipeline runs once; build a new one to restart).
        """
        self.metrics.known_pipeline(self.name)  # its counters are exported from 0 on
        self.metrics.queue_depth(self.name, 0)
        self.worker_progress.beat()
        self.source.progress.beat()
        self._worker.start()
        self._source_thread.start()
        _log.info("pipeline %s: %s -> %s started (queue %d, %s)", self.name, self.source.label, self.model,
                  self._queue.size, "drop oldest when full" if self.source.lossy else "wait when full")

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop within about ``timeout`` seconds: the item in flight finishes, queued ones are abandoned.

        Sets the source's stop event, closes the queue, joins both threads and
        closes the source. Abandoned items of a lossless source were never
        acked, so they are processed after the next start. Returns True when
        both threads ended in time; a source thread blocked in a call (no
        progress for 2 s: a FIFO, a stream read without timeout) is not
        waited for, and its source is left open rather than closed under it.
        Safe to call twice and before :meth:`start`.
        """
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self.source.stop_event.set()
        self._queue.close()
        # The source thread is waited for while it beats; one that stopped beating is blocked in a call (a
        # FIFO, a hung stream) and will not see the stop. The worker is waited for: its item in flight drains.
        while self._source_thread.is_alive() and self.source.progress.age() <= _BLOCKED_SECONDS:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._source_thread.join(min(BEAT_SECONDS, left))
        if self._worker.is_alive():  # not alive: ended, or never started (stop before start)
            self._worker.join(max(0.0, deadline - time.monotonic()))
        if not self._source_thread.is_alive() and not self._closed:
            self._closed = True
            try:
                self.source.close()
            except Exception:  # a failing close must not break the daemon's ordered shutdown
                _log.exception("pipeline %s: closing the source failed", self.name)
        stopped = not self._source_thread.is_alive() and not self._worker.is_alive()
        if not stopped:
            _log.warning("pipeline %s: did not stop within %.1f s", self.name, timeout)
        self.metrics.queue_depth(self.name, 0)
        return stopped

    @property
    def alive(self) -> bool:
        """Both threads running (or the source ended cleanly, e.g. a finished video); False once stopped."""
        if self._stopping.is_set() or not self._worker.is_alive():
            return False
        return self._source_thread.is_alive() or self._source_ended.is_set()

    @property
    def restartable(self) -> bool:
        """A stalled source can be replaced (a factory was given and the pipeline is not stopping)."""
        return self._new_source is not None and not self._stopping.is_set()

    @property
    def abandoned_threads(self) -> int:
        """Source threads abandoned by :meth:`restart_source` that are still blocked."""
        self._abandoned = [t for t in self._abandoned if t.is_alive()]
        return len(self._abandoned)

    def stalled(self, bound: float) -> tuple[str, float] | None:
        """``("source" | "worker", seconds)`` for a running thread without progress for over ``bound`` s."""
        if self._stopping.is_set():
            return None
        if self._source_thread.is_alive() and not self._source_ended.is_set():
            age = self.source.progress.age()
            if age > bound:
                return "source", age
        if self._worker.is_alive():
            age = self.worker_progress.age()
            if age > bound:
                return "worker", age
        return None

    def progress_age(self) -> float:
        """Seconds since the pipeline last made progress: its slower thread (the worker alone once the source ended)."""
        ages = [self.worker_progress.age()]
        if not self._source_ended.is_set():
            ages.append(self.source.progress.age())
        return max(ages)

    def restart_source(self) -> bool:
        """Abandon the source thread (left blocked, a daemon thread) and start a fresh source on the same queue.

        The old source's stop event is set, so if its call ever returns the
        thread ends without feeding the queue. Returns False when this
        pipeline cannot restart its source (no factory, stopping).

        Raises:
            EdgeRuntimeError, OSError: building the new source failed (nothing changed).
        """
        if self._new_source is None or self._stopping.is_set():
            return False
        fresh = self._new_source()
        old, old_thread = self.source, self._source_thread
        old.stop_event.set()
        self._abandoned.append(old_thread)
        self.source, self._source_thread = fresh, self._source_thread_for(fresh)
        self.restarts += 1
        fresh.progress.beat()
        self._source_thread.start()
        _log.warning("pipeline %s: abandoned the stuck source thread; started a fresh %s", self.name, fresh.label)
        return True

    @property
    def finished(self) -> bool:
        """The source ended by itself and every item it yielded has been processed."""
        return self._source_ended.is_set() and self._queue.idle()

    # ------------------------------------------------------------------ threads

    def _source_thread_for(self, source: Source) -> threading.Thread:
        return threading.Thread(target=self._pump, args=(source,), name=f"source-{self.name}", daemon=True)

    def _pump(self, source: Source) -> None:
        items = source.items()
        try:
            for item in items:
                source.progress.beat()
                if self._stopping.is_set() or source.stop_event.is_set():  # stopping, or abandoned
                    return
                if source.lossy:
                    dropped, depth = self._queue.put_latest(item)
                    if dropped:
                        self.metrics.drop(self.name, dropped)
                else:
                    put = self._queue.put_wait(item, source.progress.beat)
                    if put is None:
                        return
                    depth = put
                self.metrics.queue_depth(self.name, depth)
            if not self._stopping.is_set() and not source.stop_event.is_set():
                self._source_ended.set()
        except Exception as e:  # a source bug: report it and let the watchdog see a dead pipeline
            _log.exception("pipeline %s: source %s failed", self.name, source.label)
            self.events.emit("pipeline_failed", model=self.model, reason=f"source {source.label}: {e!r}",
                             pipeline=self.name)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # run the generator's cleanup (release the capture) in this thread
            if source is not self.source:  # abandoned by restart_source: nobody else will close it
                _guarded_close(self.name, source)

    def _work(self) -> None:
        while True:
            self.worker_progress.beat()
            got = self._queue.get(self.worker_progress.beat)
            if got is None:
                return
            item, depth = got
            self.metrics.queue_depth(self.name, depth)
            try:
                self._process(item)
            except Exception:  # never let one item kill the worker; _process reports what it knows
                _log.exception("pipeline %s: unexpected error on %s", self.name, item[0])
            finally:
                self._queue.done()

    # ------------------------------------------------------------------ one item

    def _process(self, item: Item) -> None:
        key, payload = item
        while True:
            try:
                if isinstance(payload, bytes):
                    version, prediction = self.service.predict_bytes(self.model, payload)
                else:
                    version, prediction = self.service.predict_image(self.model, payload)
            except InputError as e:
                self._bad_input(key, e.one_line())
                return
            except BusyError as e:  # the decode budget is full (API traffic): a lossless item waits, is not lost
                if not self.source.lossy:
                    self.worker_progress.beat()
                    if self._stopping.wait(_MODEL_RETRY_SECONDS):
                        return  # stopping: left for the next start, as when the model is missing
                    continue
                self._inference_failed(key, e.one_line())
                return
            except CacheError as e:
                if self._wait_for_model(e):
                    continue  # a lossless item waits for the model instead of being lost
                if self.source.lossy:
                    self.metrics.drop(self.name)
                return
            except EdgeRuntimeError as e:  # ModelError and kin: the service counted it
                self._inference_failed(key, e.one_line())
                return
            except Exception as e:  # a bug below the service: count it like a failed inference
                _log.exception("pipeline %s: inference on %s raised", self.name, key)
                self.metrics.observe(self.model, 0.0, ok=False)
                self._inference_failed(key, repr(e))
                return
            break
        self._succeeded(key, version, prediction.results, prediction.timings_ms)

    def _succeeded(self, key: str, version: int, results: list[dict[str, Any]], timings: dict[str, float]) -> None:
        if self._model_missing:
            self._model_missing = False
            self.events.emit("model_available", model=self.model, version=version,
                             reason=f"pipeline {self.name}: serving again", pipeline=self.name)
        self._bad_inputs = 0
        if self._inference_failures:
            failures, self._inference_failures = self._inference_failures, 0
            self.events.emit("inference_recovered", model=self.model, version=version,
                             reason=f"pipeline {self.name}: inference works again after {failures} failures",
                             pipeline=self.name, failures=failures)
        self.source.ack(key)
        record: dict[str, Any] = {
            "pipeline": self.name,
            "model": self.model,
            "version": version,
            "key": key,
            "result": results[0] if len(results) == 1 else results,
            "latency_ms": {k: round(v, 3) for k, v in timings.items()},
            "ts": round(time.time(), 3),
        }
        if self.on_result is not None:
            try:
                self.on_result(record)
            except Exception:  # a sink bug (printer, MQTT) must not stop inference
                _log.exception("pipeline %s: result sink failed", self.name)

    def _bad_input(self, key: str, reason: str) -> None:
        self.metrics.source_error(self.name)
        self._bad_inputs += 1
        # Each bad file is its own story; bad frames are one story per run (no event per frame at 30 fps).
        if not self.source.lossy or self._bad_inputs == 1:
            _log.warning("pipeline %s: bad input %s: %s", self.name, key, reason)
            self.events.emit("source_error", model=self.model, reason=f"{key}: {reason}", pipeline=self.name,
                             source=self.source.label, key=key)
        self.source.ack(key, reason)  # a bad file stays bad: never retry it

    def _inference_failed(self, key: str, reason: str) -> None:
        self._inference_failures += 1
        if self._inference_failures == 1:
            _log.warning("pipeline %s: inference failed on %s: %s", self.name, key, reason)
            self.events.emit("inference_error", model=self.model, reason=f"pipeline {self.name}: {reason}",
                             pipeline=self.name, key=key)
        else:
            _log.debug("pipeline %s: inference failed on %s: %s", self.name, key, reason)
        # Acked with the error: a file that crashes the model would otherwise crash it after every restart.
        self.source.ack(key, reason)

    def _wait_for_model(self, error: CacheError) -> bool:
        """Report once per outage; for a lossless source wait a little: True to retry the item."""
        if not self._model_missing:
            self._model_missing = True
            _log.warning("pipeline %s: %s; waiting for it", self.name, error.one_line())
            self.events.emit("model_unavailable", model=self.model, reason=f"pipeline {self.name}: "
                             f"{error.one_line()}", pipeline=self.name)
        self.worker_progress.beat()  # waiting for a model to be installed is legitimate, not stuck
        if self.source.lossy:
            return False
        return not self._stopping.wait(_MODEL_RETRY_SECONDS)


def _guarded_close(name: str, source: Source) -> None:
    try:
        source.close()
    except Exception:  # a failing close of an abandoned source must not kill its (ending) thread noisily
        _log.exception("pipeline %s: closing the abandoned source failed", name)

"""The inference entry point shared by the API and the pipelines.

:class:`InferenceService` borrows the serving model of a name from its
:class:`ModelSlot`, runs it, and records every call in the metrics and with
the observers (the activation controller watches probation through them).
Input errors (the caller's fault) are not counted against the model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from numpy.typing import NDArray

from edge_runtime.errors import EdgeRuntimeError, InputError, ModelError, ModelNotServedError
from edge_runtime.runtime.loaded_model import LoadedModel, Prediction
from edge_runtime.runtime.slot import ModelSlot
from edge_runtime.telemetry.metrics import Metrics

__all__ = ["InferenceService", "Monitor", "Observer"]

Observer = Callable[[str, int, float, bool], None]
"""``observer(model, version, latency_ms, ok)`` after every inference."""
Monitor = Callable[[str, LoadedModel, "bytes | NDArray[Any]", Prediction], None]
"""``monitor(name, model, input, prediction)`` after every successful image or .npy prediction; never raises."""
T = TypeVar("T")
_log = logging.getLogger(__name__)


class InferenceService:
    """Runs inferences on the serving version of each model name."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.slots: dict[str, ModelSlot] = {}
        self._observers: list[Observer] = []
        self._monitor: Monitor | None = None
        self._first_ok = threading.Event()

    def add_slot(self, name: str) -> ModelSlot:
        """The slot for ``name``, created empty on first use."""
        slot = self.slots.get(name)
        if slot is None:
            slot = self.slots[name] = ModelSlot(name)
            self.metrics.known_model(name)  # its counters are exported from 0 on
        return slot

    def observe(self, fn: Observer) -> None:
        """Call ``fn`` after every inference (from the inferring thread; keep it cheap)."""
        self._observers.append(fn)

    def monitor(self, fn: Monitor) -> None:
        """Call ``fn`` after every successful prediction on an image or .npy input (drift, truth, shadow)."""
        self._monitor = fn

    @property
    def ready(self) -> bool:
        """True once any inference succeeded (``/v2/health/ready``, systemd READY=1)."""
        return self._first_ok.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._first_ok.wait(timeout)

    def warm_up(self, name: str, model: LoadedModel, feeds: Mapping[str, NDArray[Any]]) -> None:
        """Run ``model`` once before it serves (not counted as traffic); a success
        counts as the first good inference for readiness. Failures are logged only:
        the gates already judged the model, and some need real inputs."""
        try:
            model.infer(feeds)
        except EdgeRuntimeError as e:
            _log.warning("%s v%s warm-up failed: %s", name, model.version, e.one_line())
            return
        self._first_ok.set()

    def slot(self, name: str) -> ModelSlot:
        """The slot serving ``name``.

        Raises:
            ModelNotServedError: no such model is served here.
        """
        slot = self.slots.get(name)
        if slot is None:
            raise ModelNotServedError(name, tuple(sorted(self.slots)))
        return slot

    def predict_bytes(self, name: str, data: bytes, *, with_mask: bool = False) -> tuple[int, Prediction]:
        """Image (JPEG/PNG) or .npy bytes -> (version, prediction); ``with_mask`` adds a segmentation's PNG."""
        return self._counted(name, self._run(name, lambda m: m.predict_bytes(data, with_mask=with_mask), data))

    def predict_image(self, name: str, image: NDArray[Any]) -> tuple[int, Prediction]:
        """A decoded BGR frame -> (version, prediction)."""
        return self._counted(name, self._run(name, lambda m: m.predict_image(image), image))

    def _counted(self, name: str, served: tuple[int, Prediction]) -> tuple[int, Prediction]:
        self.metrics.detections.observe(name, served[1].results)  # detectors: per-frame counts and scores
        return served

    def infer(self, name: str, feeds: Mapping[str, NDArray[Any]]) -> tuple[int, dict[str, NDArray[Any]]]:
        """Raw tensors -> (version, raw outputs); feeds are cast/quantised to fit."""
        return self._run(name, lambda m: m.infer({k: m.to_tensor(v, k) for k, v in feeds.items()}))

    def _run(self, name: str, call: Callable[[LoadedModel], T], source: bytes | NDArray[Any] | None = None
             ) -> tuple[int, T]:
        with self.slot(name).use() as model:
            t0 = time.perf_counter()
            try:
                result = call(model)
            except InputError:
                raise  # the caller's fault: neither a model error nor a latency sample
            except ModelError:
                self._record(name, model.version, (time.perf_counter() - t0) * 1e3, False)
                raise
            self._record(name, model.version, (time.perf_counter() - t0) * 1e3, True)
            if source is not None and self._monitor is not None and isinstance(result, Prediction):
                self._monitor(name, model, source, result)  # still inside use(): the model is not closed under it
            return model.version, result

    def _record(self, name: str, version: int, latency_ms: float, ok: bool) -> None:
        self.metrics.observe(name, latency_ms, ok)
        if ok:
            self._first_ok.set()
        for fn in self._observers:
            fn(name, version, latency_ms, ok)

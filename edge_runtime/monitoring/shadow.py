"""Shadow runs: a candidate version beside the active one, on a share of live inputs.

The inferring thread only decides (a deterministic share accumulator: exactly
``share`` of the inputs, evenly spread) and hands the input and the active
result to a bounded queue with ``put_nowait``; when the queue is full the
input is dropped and counted. The candidate runs on its own thread at the
lowest CPU priority, so it never delays the active model's reply.

Per sample it records:

- agreement: the same top-1 class (classification), or the F1 of detections
  matched by class at IoU 0.5 (detection; 1 when both see nothing);
- distance: the relative L1 distance of the raw outputs when both have the
  same shape (mean |a - b| / mean |a|), else the difference of the top-1 score
  (classification) or of the box count (detection); 1 for results of different kinds;
- both latencies (end to end, each model's own preprocessing included).

With ``promote_after`` the run ends after that many samples: the candidate is
activated when its agreement is at least ``min_agreement`` (``shadow_passed``),
and left alone otherwise (``shadow_failed``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_runtime.config.monitoring import ShadowConfig
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.runtime.heads.nms import count_matches
from edge_runtime.runtime.loaded_model import LoadedModel, Prediction

__all__ = ["ShadowPlan", "ShadowRun", "compare"]

_log = logging.getLogger(__name__)
Emit = Callable[..., Any]
Promote = Callable[[str, int], None]
Source = bytes | NDArray[Any]
_LATENCIES = 1024


ShadowPlan = ShadowConfig
"""What to shadow and when to stop: the ``[monitoring.shadow]`` settings, also built by the fleet ``shadow`` verb."""


def compare(active: Prediction, shadow: Prediction) -> tuple[float, float]:
    """(agreement in [0, 1], distance >= 0) of two predictions of one input."""
    a, b = active.results[0], shadow.results[0]
    if "top" in a and "top" in b:
        agreement = float(a["top"][0]["index"] == b["top"][0]["index"])
        fallback = abs(float(a["top"][0]["score"]) - float(b["top"][0]["score"]))
    elif "detections" in a and "detections" in b:
        da, db = a["detections"], b["detections"]

        def arrays(dets: list[dict[str, Any]]) -> tuple[NDArray[Any], NDArray[Any]]:
            return (np.asarray([d["box"] for d in dets], np.float32).reshape(-1, 4),
                    np.asarray([d["class"] for d in dets], np.int64))

        matched = count_matches(*arrays(da), *arrays(db), 0.5)
        agreement = 1.0 if not da and not db else 2.0 * matched / (len(da) + len(db))
        fallback = float(abs(len(da) - len(db)))
    else:  # results of different kinds (a classifier against a detector): nothing agrees
        return 0.0, 1.0
    ra, rb = active.outputs, shadow.outputs
    if ra.keys() == rb.keys() and all(ra[k].shape == rb[k].shape for k in ra):
        num = sum(float(np.abs(ra[k] - rb[k]).mean()) for k in ra)
        den = sum(float(np.abs(ra[k]).mean()) for k in ra)
        return agreement, num / den if den > 0 else num
    return agreement, fallback


class ShadowRun:
    """One running shadow of ``plan.model``; :meth:`offer` is called from the inferring threads."""

    def __init__(self, plan: ShadowPlan, candidate: LoadedModel, emit: Emit, promote: Promote | None) -> None:
        self.plan, self.candidate, self._emit, self._promote = plan, candidate, emit, promote
        self._queue: queue.Queue[tuple[Source, Prediction] | None] = queue.Queue(maxsize=plan.queue)
        self._lock = threading.Lock()
        self._credit = 0.0
        self.offered = self.dropped = self.samples = self.errors = 0
        self._agreed = 0.0
        self._distance = 0.0
        self._active_ms: collections.deque[float] = collections.deque(maxlen=_LATENCIES)
        self._shadow_ms: collections.deque[float] = collections.deque(maxlen=_LATENCIES)
        self.outcome = ""
        self._thread = threading.Thread(target=self._work, name=f"shadow-{plan.model}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._emit("shadow_started", model=self.plan.model, version=self.plan.version,
                   reason=f"shadowing v{self.plan.version} on {self.plan.share:.0%} of the inputs",
                   share=self.plan.share, promote_after=self.plan.promote_after)

    def offer(self, source: Source, prediction: Prediction) -> None:
        """Queue this input for the candidate if its share says so (never blocks)."""
        with self._lock:
            self._credit += self.plan.share
            if self._credit < 1.0 or self.outcome:
                return
            self._credit -= 1.0
            self.offered += 1
        try:
            self._queue.put_nowait((source, prediction))
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def stop(self, reason: str, timeout: float = 5.0) -> None:
        """End the run (idempotent); the candidate is closed once its worker is done."""
        with self._lock:
            first = not self.outcome
            self.outcome = self.outcome or "stopped"
        if first:
            self._emit("shadow_stopped", model=self.plan.model, version=self.plan.version, reason=reason,
                       **self.figures())
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _work(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # lowest priority for this thread only (Linux)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                self._sample(*item)
                if self.outcome:
                    return
        finally:
            self.candidate.close()

    def _sample(self, source: Source, active: Prediction) -> None:
        try:
            shadow = (self.candidate.predict_bytes(source) if isinstance(source, bytes)
                      else self.candidate.predict_image(source))
            agreement, distance = compare(active, shadow)
        except EdgeRuntimeError as e:
            with self._lock:
                self.errors += 1
            _log.warning("shadow %s v%s failed on an input: %s", self.plan.model, self.plan.version, e.one_line())
            return
        with self._lock:
            self.samples += 1
            self._agreed += agreement
            self._distance += distance
            self._active_ms.append(active.timings_ms["total"])
            self._shadow_ms.append(shadow.timings_ms["total"])
            done = 0 < self.plan.promote_after <= self.samples
        if done:
            self._finish()

    def _finish(self) -> None:
        figures = self.figures()
        passed = figures["agreement"] >= self.plan.min_agreement
        with self._lock:
            self.outcome = "passed" if passed else "failed"
        verdict = "at least" if passed else "below"
        reason = (f"agreement {figures['agreement']:.3f} over {figures['samples']} samples is {verdict} "
                  f"{self.plan.min_agreement}" + ("; activating it" if passed and self._promote else ""))
        self._emit("shadow_passed" if passed else "shadow_failed", model=self.plan.model,
                   version=self.plan.version, reason=reason, **figures)
        if passed and self._promote is not None:
            try:
                self._promote(self.plan.model, self.plan.version)
            except EdgeRuntimeError as e:
                _log.error("promoting %s v%s after its shadow run failed: %s", self.plan.model, self.plan.version,
                           e.one_line())

    def figures(self) -> dict[str, Any]:
        """Agreement, distance, both latencies (p50/p95 ms), and the sample, drop and error counts."""
        with self._lock:
            n = self.samples
            active, shadow = list(self._active_ms), list(self._shadow_ms)
            out: dict[str, Any] = {"candidate": self.plan.version, "share": self.plan.share, "samples": n,
                                   "offered": self.offered, "dropped": self.dropped, "errors": self.errors,
                                   "agreement": round(self._agreed / n, 4) if n else None,
                                   "distance": round(self._distance / n, 6) if n else None,
                                   "outcome": self.outcome or "running"}
        for key, values in (("active", active), ("shadow", shadow)):
            p50, p95 = np.percentile(values, [50, 95]) if values else (None, None)
            out[f"{key}_p50_ms"] = None if p50 is None else round(float(p50), 3)
            out[f"{key}_p95_ms"] = None if p95 is None else round(float(p95), 3)
        return out

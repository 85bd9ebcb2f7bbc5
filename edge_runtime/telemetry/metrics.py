"""In-process metrics: counters, a latency histogram, percentiles, Prometheus text.

One :class:`Metrics` instance is shared by every stage. Updates are a lock and
a few integer adds (cheap on the hot path); reads build snapshots for
``GET /metrics`` and MQTT telemetry.

The Prometheus names use base units (``edge_inference_latency_seconds``, so
``promtool check metrics`` is clean), and every counter of a known model or
pipeline is exported from 0 on (:meth:`Metrics.known_model`,
:meth:`Metrics.known_pipeline`), so ``rate()`` and alerts see the first increment.
Internally latencies stay milliseconds (telemetry, the API's timings).
"""

from __future__ import annotations

import bisect
import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_runtime.telemetry.detection_stats import DetectionStats

__all__ = ["LATENCY_BUCKETS_MS", "Metrics", "ModelStats"]

LATENCY_BUCKETS_MS = (0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0)
_WINDOW = 1024  # latencies kept for percentiles and fps


@dataclass
class ModelStats:
    """Counters of one model name (all versions), plus a recent-latency window."""

    version: int = 0
    inferences: int = 0
    errors: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    latency_sum_ms: float = 0.0
    recent: collections.deque[tuple[float, float]] = field(
        default_factory=lambda: collections.deque(maxlen=_WINDOW)
    )


class Metrics:
    """Thread-safe metrics registry. ``clock`` is monotonic seconds (injectable)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._models: dict[str, ModelStats] = {}
        self._drops: collections.Counter[str] = collections.Counter()
        self._source_errors: collections.Counter[str] = collections.Counter()
        self._queue_depth: dict[str, int] = {}
        self._events: collections.Counter[str] = collections.Counter()
        self._stalls: collections.Counter[str] = collections.Counter()
        self._progress_age: dict[str, float] = {}  # pipeline -> seconds since it last made progress
        self._api_progress_age: float | None = None
        self.detections = DetectionStats()
        self._sections: dict[str, tuple[Callable[[], Any], Callable[[Callable[[str], str]], list[str]]]] = {}
        self.started = clock()

    def _model(self, name: str) -> ModelStats:
        stats = self._models.get(name)
        if stats is None:
            stats = self._models[name] = ModelStats()
        return stats

    # ------------------------------------------------------------------ updates

    def observe(self, model: str, latency_ms: float, ok: bool = True) -> None:
        """Record one inference (its latency counts only when it succeeded)."""
        now = self._clock()
        with self._lock:
            stats = self._model(model)
            if not ok:
                stats.errors += 1
                return
            stats.inferences += 1
            stats.latency_sum_ms += latency_ms
            stats.buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)] += 1
            stats.recent.append((now, latency_ms))

    def known_model(self, model: str) -> None:
        """Export ``model``'s counters (at 0) before its first inference."""
        with self._lock:
            self._model(model)

    def known_pipeline(self, pipeline: str) -> None:
        """Export ``pipeline``'s drop and source-error counters (at 0) and its queue depth before any update."""
        with self._lock:
            self._drops[pipeline] += 0
            self._source_errors[pipeline] += 0
            self._queue_depth.setdefault(pipeline, 0)

    def set_version(self, model: str, version: int) -> None:
        """The version now serving ``model``."""
        with self._lock:
            self._model(model).version = version

    def drop(self, pipeline: str, n: int = 1) -> None:
        """Frames a pipeline dropped (latest-frame policy)."""
        with self._lock:
            self._drops[pipeline] += n

    def source_error(self, pipeline: str) -> None:
        """A source failure (camera unplugged, stream ended, unreadable file)."""
        with self._lock:
            self._source_errors[pipeline] += 1

    def queue_depth(self, pipeline: str, depth: int) -> None:
        with self._lock:
            self._queue_depth[pipeline] = depth

    def stall(self, pipeline: str) -> None:
        """A pipeline's source or worker stalled (no progress past ``liveness.stall_seconds``)."""
        with self._lock:
            self._stalls[pipeline] += 1

    def pipeline_progress(self, pipeline: str, age_s: float) -> None:
        """Seconds since ``pipeline`` last made progress (set by the supervisor every tick)."""
        with self._lock:
            self._progress_age[pipeline] = age_s

    def api_progress(self, age_s: float) -> None:
        """Seconds since the API's serving loop last turned."""
        with self._lock:
            self._api_progress_age = age_s

    def event(self, kind: str) -> None:
        """Count a lifecycle event (update, rollback, ...) by kind."""
        with self._lock:
            self._events[kind] += 1

    def add_section(self, key: str, snapshot: Callable[[], Any],
                    prometheus: Callable[[Callable[[str], str]], list[str]]) -> None:
        """A part that reports its own figures: ``snapshot()`` goes under ``key`` in :meth:`snapshot`,
        ``prometheus(escape)`` adds its families to :meth:`render_prometheus` (monitoring uses this)."""
        self._sections[key] = (snapshot, prometheus)

    # ------------------------------------------------------------------ reads

    def model_summary(self, model: str, window_s: float = 60.0) -> dict[str, Any]:
        """p50/p95/p99 and fps over the recent window, plus totals, for one model."""
        now = self._clock()
        with self._lock:
            stats = self._models.get(model) or ModelStats()
            recent = [lat for t, lat in stats.recent if now - t <= window_s]
            out: dict[str, Any] = {"version": stats.version, "inferences": stats.inferences,
                                   "errors": stats.errors}
        if recent:
            p50, p95, p99 = np.percentile(np.asarray(recent), [50, 95, 99])
            out.update(p50_ms=round(float(p50), 3), p95_ms=round(float(p95), 3), p99_ms=round(float(p99), 3),
                       fps=round(len(recent) / min(window_s, max(now - self.started, 1e-3)), 3))
        else:
            out.update(p50_ms=None, p95_ms=None, p99_ms=None, fps=0.0)
        out.update(self.detections.summary(model))
        return out

    def snapshot(self) -> dict[str, Any]:
        """Everything, for telemetry: per-model summaries, drops, errors, queues, uptime."""
        with self._lock:
            names = sorted(self._models)
            drops, errors = dict(self._drops), dict(self._source_errors)
            depth, events = dict(self._queue_depth), dict(self._events)
            stalls, progress = dict(self._stalls), {p: round(a, 3) for p, a in self._progress_age.items()}
        return {
            "models": {n: self.model_summary(n) for n in names},
            "drops": drops,
            "source_errors": errors,
            "queue_depth": depth,
            "events": events,
            "stalls": stalls,
            "progress_age_s": progress,
            "uptime_s": round(self._clock() - self.started, 3),
        } | {key: snap() for key, (snap, _) in self._sections.items()}

    def render_prometheus(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.extend((f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"))

        with self._lock:
            models = {n: (s.version, s.inferences, s.errors, list(s.buckets), s.latency_sum_ms)
                      for n, s in sorted(self._models.items())}
            drops, errors, depth = dict(self._drops), dict(self._source_errors), dict(self._queue_depth)
            stalls, progress, api_age = dict(self._stalls), dict(self._progress_age), self._api_progress_age
        family("edge_inferences_total", "counter", "Successful inferences.")
        lines += [f'edge_inferences_total{{model="{_esc(n)}"}} {m[1]}' for n, m in models.items()]
        family("edge_inference_errors_total", "counter", "Failed inferences.")
        lines += [f'edge_inference_errors_total{{model="{_esc(n)}"}} {m[2]}' for n, m in models.items()]
        family("edge_model_version", "gauge", "Active model version per model name.")
        lines += [f'edge_model_version{{model="{_esc(n)}"}} {m[0]}' for n, m in models.items()]
        family("edge_inference_latency_seconds", "histogram", "Inference latency in seconds.")
        for n, (_, count, _, buckets, total) in models.items():
            cumulative = 0
            for bound, hits in zip((*LATENCY_BUCKETS_MS, float("inf")), buckets, strict=True):
                cumulative += hits
                le = "+Inf" if bound == float("inf") else repr(bound / 1000.0)
                lines.append(f'edge_inference_latency_seconds_bucket{{model="{_esc(n)}",le="{le}"}} {cumulative}')
            lines.append(f'edge_inference_latency_seconds_sum{{model="{_esc(n)}"}} {total / 1000.0:.9f}')
            lines.append(f'edge_inference_latency_seconds_count{{model="{_esc(n)}"}} {count}')
        lines += self.detections.prometheus_lines(_esc)
        family("edge_frames_dropped_total", "counter", "Frames dropped because inference was busy.")
        lines += [f'edge_frames_dropped_total{{pipeline="{_esc(p)}"}} {v}' for p, v in sorted(drops.items())]
        family("edge_source_errors_total", "counter", "Source failures (reconnects, unreadable inputs).")
        lines += [f'edge_source_errors_total{{pipeline="{_esc(p)}"}} {v}' for p, v in sorted(errors.items())]
        family("edge_queue_depth", "gauge", "Frames waiting for inference.")
        lines += [f'edge_queue_depth{{pipeline="{_esc(p)}"}} {v}' for p, v in sorted(depth.items())]
        family("edge_source_stalls_total", "counter", "Sources or workers that stalled (no progress past the bound).")
        lines += [f'edge_source_stalls_total{{pipeline="{_esc(p)}"}} {v}' for p, v in sorted(stalls.items())]
        family("edge_pipeline_progress_age_seconds", "gauge", "Seconds since the pipeline last made progress.")
        lines += [f'edge_pipeline_progress_age_seconds{{pipeline="{_esc(p)}"}} {v:.3f}'
                  for p, v in sorted(progress.items())]
        if api_age is not None:
            family("edge_api_progress_age_seconds", "gauge", "Seconds since the API's serving loop last turned.")
            lines.append(f"edge_api_progress_age_seconds {api_age:.3f}")
        for _, prometheus in self._sections.values():
            lines += prometheus(_esc)
        family("edge_uptime_seconds", "gauge", "Seconds since the daemon started.")
        lines.append(f"edge_uptime_seconds {self._clock() - self.started:.3f}")
        return "\n".join(lines) + "\n"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

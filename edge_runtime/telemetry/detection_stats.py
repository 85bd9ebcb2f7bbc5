"""What a detector sees, per model: detections per frame and their score distribution.

Monitoring a deployed detector starts here: a model that quietly gets worse
finds fewer objects, or the same ones with lower scores, long before anyone
looks at the pictures. Two Prometheus histograms with fixed buckets, so
fleets aggregate them.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["COUNT_BUCKETS", "SCORE_BUCKETS", "DetectionStats"]

COUNT_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


@dataclass
class _Model:
    frames: int = 0
    detections: int = 0
    score_sum: float = 0.0
    counts: list[int] = field(default_factory=lambda: [0] * (len(COUNT_BUCKETS) + 1))
    scores: list[int] = field(default_factory=lambda: [0] * (len(SCORE_BUCKETS) + 1))


class DetectionStats:
    """Thread-safe per-model detection histograms (only models whose results carry detections appear)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, _Model] = {}

    def observe(self, model: str, results: Iterable[Mapping[str, Any]]) -> None:
        """Count one frame per result that has ``detections``; others (classifiers, raw) are ignored."""
        frames = [r["detections"] for r in results if isinstance(r.get("detections"), list)]
        if not frames:
            return
        with self._lock:
            stats = self._models.setdefault(model, _Model())
            for detections in frames:
                stats.frames += 1
                stats.detections += len(detections)
                stats.counts[bisect.bisect_left(COUNT_BUCKETS, len(detections))] += 1
                for d in detections:
                    score = float(d.get("score", 0.0))
                    stats.score_sum += score
                    stats.scores[bisect.bisect_left(SCORE_BUCKETS, score)] += 1

    def summary(self, model: str) -> dict[str, Any]:
        """Frames, mean detections per frame and mean score (empty for a model without detections)."""
        with self._lock:
            stats = self._models.get(model)
            if stats is None or not stats.frames:
                return {}
            return {"detection_frames": stats.frames,
                    "detections_per_frame": round(stats.detections / stats.frames, 4),
                    "detection_score_mean": round(stats.score_sum / stats.detections, 6) if stats.detections
                    else None}

    def prometheus_lines(self, escape: Any) -> list[str]:
        """``edge_detections_per_frame`` and ``edge_detection_score`` histograms (none before a detection model ran)."""
        with self._lock:
            models = {n: (s.frames, s.detections, list(s.counts), s.detections, s.score_sum, list(s.scores))
                      for n, s in sorted(self._models.items())}
        if not models:
            return []
        lines = ["# HELP edge_detections_per_frame Detections a detector returned per frame.",
                 "# TYPE edge_detections_per_frame histogram"]
        for name, (frames, total, counts, *_rest) in models.items():
            lines += _histogram("edge_detections_per_frame", escape(name), COUNT_BUCKETS, counts, total, frames)
        lines += ["# HELP edge_detection_score Scores of the detections returned.",
                  "# TYPE edge_detection_score histogram"]
        for name, (_, _, _, n, score_sum, scores) in models.items():
            lines += _histogram("edge_detection_score", escape(name), SCORE_BUCKETS, scores, score_sum, n)
        return lines


def _histogram(family: str, model: str, bounds: tuple[float, ...], hits: list[int], total: float,
               count: int) -> list[str]:
    lines, cumulative = [], 0
    for bound, n in zip((*bounds, float("inf")), hits, strict=True):
        cumulative += n
        le = "+Inf" if bound == float("inf") else repr(float(bound))
        lines.append(f'{family}_bucket{{model="{model}",le="{le}"}} {cumulative}')
    lines.append(f'{family}_sum{{model="{model}"}} {total:.6f}')
    lines.append(f'{family}_count{{model="{model}"}} {count}')
    return lines

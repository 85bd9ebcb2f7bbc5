"""Field accuracy from delayed ground truth, matched to earlier results by their ``result_id``.

Each classification or detection result waits in a bounded, insertion-ordered
table (``truth_max_pending``, ``truth_ttl_seconds``); memory stays bounded
whatever arrives. Misses are counted by reason:

- ``expired``: a result's truth never came within the TTL;
- ``evicted``: the table was full and the oldest result made room;
- ``unknown``: truth for an id this device never issued, or issued long ago;
- ``duplicate``: a second truth for a result already matched;
- ``wrong_model``: truth sent for another model's (or pipeline's) result;
- ``wrong_kind``: a class for a detector's result, or boxes for a classifier's.

Accuracy is rolling over the last ``accuracy_window`` truths per model version:
top-1 for classification; precision and recall at IoU 0.5 for detection. It is
compared with the bundle's declared baseline: the ``accuracy`` event fires when
even the upper end of its 99 % Wilson interval is below ``baseline - margin``
(so the noise of a small window does not fire it), and ``accuracy_recovered``
when the rolling value is back above that line.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_runtime.bundle.reference_stats import Baseline
from edge_runtime.config.monitoring import MonitoringConfig
from edge_runtime.errors import InputError
from edge_runtime.monitoring.stats import wilson_bounds
from edge_runtime.runtime.heads.nms import count_matches

__all__ = ["TruthMatcher", "parse_truth"]

Emit = Callable[..., Any]
Rollback = Callable[[str, int, str], None]
_Z = 2.576  # two-sided 99 %
_IOU = 0.5
_MAX_BOXES = 1000
_RECENT_MATCHED = 1024
MISS_REASONS = ("expired", "evicted", "unknown", "duplicate", "wrong_model", "wrong_kind")


@dataclass(frozen=True)
class Truth:
    """One parsed ground-truth message: a class (index or label) or boxes with classes."""

    result_id: str
    label: int | str | None = None
    boxes: tuple[tuple[tuple[float, float, float, float], int], ...] | None = None


@dataclass
class _Pending:
    model: str
    version: int
    created: float
    label: tuple[int, str] | None  # (index, label) of the top-1 class
    boxes: Any = None  # (N, 4) float array and (N,) classes


@dataclass
class _Rolling:
    """The last ``window`` outcomes of one version: (correct, tp, fp, fn) each."""

    window: int
    detection: bool
    outcomes: collections.deque[tuple[int, int, int, int]] = field(default_factory=collections.deque)
    sums: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    matched: int = 0
    alarm: bool = False

    def add(self, outcome: tuple[int, int, int, int]) -> None:
        if len(self.outcomes) == self.window:
            old = self.outcomes.popleft()
            self.sums = [s - o for s, o in zip(self.sums, old, strict=True)]
        self.outcomes.append(outcome)
        self.sums = [s + o for s, o in zip(self.sums, outcome, strict=True)]
        self.matched += 1

    def figures(self) -> dict[str, tuple[int, int]]:
        """Metric -> (successes, trials) over the window."""
        correct, tp, fp, fn = self.sums
        if self.detection:
            return {"precision": (tp, tp + fp), "recall": (tp, tp + fn)}
        return {"accuracy": (correct, len(self.outcomes))}


def parse_truth(doc: Any) -> Truth:
    """One truth object: ``{"result_id", "label": index|name}`` or ``{"result_id", "boxes": [{"box", "class"}]}``.

    Raises:
        InputError: not an object, no string ``result_id``, neither or both of
            ``label`` and ``boxes``, or a malformed box.
    """
    if not isinstance(doc, dict):
        raise InputError("truth must be a JSON object")
    unknown = sorted(set(doc) - {"result_id", "label", "class", "boxes"})
    if unknown:
        raise InputError(f"truth has an unknown key {unknown[0]!r}")
    rid = doc.get("result_id")
    if not isinstance(rid, str) or not 1 <= len(rid) <= 64:
        raise InputError("truth needs a string result_id (1-64 characters)")
    label = doc.get("label", doc.get("class"))
    if ("label" in doc or "class" in doc) == ("boxes" in doc):
        raise InputError("truth needs exactly one of label (a class index or name) and boxes")
    if "boxes" not in doc:
        if isinstance(label, bool) or not isinstance(label, (int, str)) or (
                isinstance(label, str) and len(label) > 256):
            raise InputError("truth label must be a class index or a label name (at most 256 characters)")
        return Truth(rid, label=label)
    raw = doc["boxes"]
    if not isinstance(raw, list) or len(raw) > _MAX_BOXES:
        raise InputError(f"truth boxes must be a list of at most {_MAX_BOXES}")
    boxes = []
    for i, b in enumerate(raw):
        box, cls = (b.get("box"), b.get("class", 0)) if isinstance(b, dict) else (None, None)
        if not (isinstance(box, list) and len(box) == 4 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)) or \
                isinstance(cls, bool) or not isinstance(cls, int):
            raise InputError(f"truth boxes[{i}] must be {{\"box\": [x1, y1, x2, y2], \"class\": int}}")
        x1, y1, x2, y2 = (float(v) for v in box)
        boxes.append(((x1, y1, x2, y2), cls))
    return Truth(rid, boxes=tuple(boxes))


class TruthMatcher:
    """Pending results, their matching with truth, and rolling accuracy per model version. Thread-safe."""

    def __init__(self, config: MonitoringConfig, emit: Emit, *, rollback: Rollback | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config, self._emit, self._rollback, self._clock = config, emit, rollback, clock
        self._lock = threading.Lock()
        self._pending: collections.OrderedDict[str, _Pending] = collections.OrderedDict()
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._rolling: dict[tuple[str, int], _Rolling] = {}
        self._baselines: dict[tuple[str, int], Baseline] = {}
        self.misses: collections.Counter[str] = collections.Counter({r: 0 for r in MISS_REASONS})
        self.matched = 0

    def register(self, model: str, version: int, result_id: str, result: Mapping[str, Any],
                 baseline: Baseline) -> None:
        """A result that truth may come for later (classification or detection; others are not kept)."""
        if "top" in result:
            top = result["top"][0]
            entry = _Pending(model, version, 0.0, (int(top["index"]), str(top.get("label", top["index"]))))
        elif "detections" in result:
            dets = result["detections"]
            boxes = np.asarray([d["box"] for d in dets], dtype=np.float32).reshape(-1, 4)
            entry = _Pending(model, version, 0.0, None, (boxes, np.asarray([d["class"] for d in dets], np.int64)))
        else:
            return
        now = self._clock()
        entry.created = now
        with self._lock:
            self._baselines.setdefault((model, version), baseline)
            pending = self._pending
            pending[result_id] = entry
            ttl = self.config.truth_ttl_seconds
            while pending:  # oldest first: insertion order is time order
                first = next(iter(pending.values()))
                if now - first.created > ttl:
                    pending.popitem(last=False)
                    self.misses["expired"] += 1
                elif len(pending) > self.config.truth_max_pending:
                    pending.popitem(last=False)
                    self.misses["evicted"] += 1
                else:
                    break

    def add_truth(self, truth: Truth, model: str | None = None) -> dict[str, Any]:
        """Match one truth; ``model`` (when known from the topic or URL) must be the result's.

        Returns ``{"result_id", "matched": bool, "reason"?, "correct"?}`` for the sender.
        """
        with self._lock:
            entry = self._pending.get(truth.result_id)
            reason = ""
            if entry is None:
                reason = "duplicate" if truth.result_id in self._recent else "unknown"
            elif model is not None and entry.model != model:
                reason = "wrong_model"
            elif (entry.boxes is None) != (truth.boxes is None):
                reason = "wrong_kind"
            elif self._clock() - entry.created > self.config.truth_ttl_seconds:
                del self._pending[truth.result_id]
                reason = "expired"
            if reason:
                self.misses[reason] += 1
                return {"result_id": truth.result_id, "matched": False, "reason": reason}
            assert entry is not None
            del self._pending[truth.result_id]
            self._recent[truth.result_id] = None
            if len(self._recent) > _RECENT_MATCHED:
                self._recent.popitem(last=False)
            outcome = _outcome(entry, truth)
            key = (entry.model, entry.version)
            rolling = self._rolling.get(key)
            if rolling is None:
                rolling = self._rolling[key] = _Rolling(self.config.accuracy_window, entry.boxes is not None)
            rolling.add(outcome)
            self.matched += 1
            change = self._judge(rolling, self._baselines.get(key, Baseline()))
        if change is not None:
            self._announce(entry.model, entry.version, *change)
        return {"result_id": truth.result_id, "matched": True, "correct": bool(outcome[0]) if
                entry.boxes is None else None}

    def _judge(self, rolling: _Rolling, baseline: Baseline) -> tuple[str, str, float, float] | None:
        if len(rolling.outcomes) < self.config.accuracy_min_samples:
            return None
        margin = self.config.accuracy_margin
        for metric, (hits, trials) in rolling.figures().items():
            base = getattr(baseline, metric)
            if base is None or trials == 0:
                continue
            line = base - margin
            value = hits / trials
            if not rolling.alarm and wilson_bounds(hits, trials, _Z)[1] < line:
                rolling.alarm = True
                return "accuracy", metric, value, line
            if rolling.alarm and value >= line and all(
                    getattr(baseline, m) is None or t == 0 or h / t >= getattr(baseline, m) - margin
                    for m, (h, t) in rolling.figures().items()):
                rolling.alarm = False
                return "accuracy_recovered", metric, value, line
        return None

    def _announce(self, model: str, version: int, kind: str, metric: str, value: float, line: float) -> None:
        n = self.config.accuracy_window
        below = kind == "accuracy"
        reason = (f"field {metric} {value:.3f} over the last {n} truths is "
                  f"{'below' if below else 'back above'} the baseline minus margin {line:.3f}")
        rollback = below and self.config.rollback_on_accuracy and self._rollback is not None
        self._emit(kind, model=model, version=version, reason=reason, metric=metric, value=round(value, 4),
                   threshold=round(line, 4), window=n, rollback=bool(rollback))
        if rollback and self._rollback is not None:
            self._rollback(model, version, reason)

    def forget(self, model: str, version: int) -> None:
        """Drop the rolling accuracy of a version (it was replaced)."""
        with self._lock:
            self._rolling.pop((model, version), None)

    def snapshot(self) -> dict[str, Any]:
        """Rolling figures per model version, pending and matched counts, misses by reason."""
        with self._lock:
            models: dict[str, Any] = {}
            for (model, version), rolling in sorted(self._rolling.items()):
                figures = {k: round(h / t, 4) for k, (h, t) in rolling.figures().items() if t}
                base = self._baselines.get((model, version), Baseline())
                lines = {k: round(getattr(base, k) - self.config.accuracy_margin, 4) for k in rolling.figures()
                         if getattr(base, k) is not None}
                models.setdefault(model, {})[str(version)] = {**figures, "truths": len(rolling.outcomes),
                                                             "below_baseline": rolling.alarm, "thresholds": lines}
            return {"pending": len(self._pending), "matched": self.matched, "misses": dict(self.misses),
                    "accuracy": models}


def _outcome(entry: _Pending, truth: Truth) -> tuple[int, int, int, int]:
    if entry.boxes is None:
        if entry.label is None:
            return 0, 0, 0, 0
        index, name = entry.label
        return int(truth.label == index or truth.label == name), 0, 0, 0
    pred_boxes, pred_cls = entry.boxes
    true = truth.boxes or ()
    if not true:
        return 0, 0, len(pred_boxes), 0
    t_boxes = np.asarray([b for b, _ in true], dtype=np.float32)
    t_cls = np.asarray([c for _, c in true], dtype=np.int64)
    tp = count_matches(pred_boxes, pred_cls, t_boxes, t_cls, _IOU)
    return 0, tp, len(pred_boxes) - tp, len(true) - tp

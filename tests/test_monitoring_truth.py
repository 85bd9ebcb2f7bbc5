"""Field accuracy from delayed ground truth: matching by result id, bounded memory, misses, the accuracy event."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from edge_runtime.bundle.reference_stats import Baseline
from edge_runtime.config.monitoring import MonitoringConfig
from edge_runtime.errors import InputError
from edge_runtime.monitoring.truth import TruthMatcher, parse_truth


class Events:
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def __call__(self, kind: str, **data: Any) -> None:
        self.seen.append({"kind": kind, **data})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def classified(index: int) -> dict[str, Any]:
    return {"top": [{"index": index, "score": 0.9, "label": str(index * 180)}]}


def test_accuracy_event_fires_after_the_drop_and_not_before() -> None:
    events, rollbacks = Events(), []
    matcher = TruthMatcher(MonitoringConfig(rollback_on_accuracy=True), events,
                           rollback=lambda m, v, r: rollbacks.append((m, v)))
    rng = np.random.default_rng(5)
    fired_at = None
    for n in range(1000):
        rid = f"r{n}"
        predicted = int(rng.integers(0, 2))
        matcher.register("cls", 3, rid, classified(predicted), Baseline(accuracy=0.9))
        correct = rng.random() < (0.9 if n < 500 else 0.6)
        matcher.add_truth(parse_truth({"result_id": rid, "label": predicted if correct else 1 - predicted}), "cls")
        if fired_at is None and any(e["kind"] == "accuracy" for e in events.seen):
            fired_at = n
    assert fired_at is not None, "no accuracy event after the drop to 60 %"
    assert 500 < fired_at < 700, f"accuracy event at truth {fired_at}; the drop was at 500"
    event = next(e for e in events.seen if e["kind"] == "accuracy")
    assert event["model"] == "cls" and event["version"] == 3 and event["metric"] == "accuracy"
    assert event["value"] < event["threshold"] == pytest.approx(0.85) and event["rollback"] is True
    assert rollbacks == [("cls", 3)]
    assert [e["kind"] for e in events.seen].count("accuracy") == 1  # hysteresis: once, not per truth
    figures = matcher.snapshot()["accuracy"]["cls"]["3"]
    assert figures["accuracy"] == pytest.approx(0.6, abs=0.1) and figures["below_baseline"] is True


def test_matching_is_bounded_with_a_ttl_and_every_miss_counted() -> None:
    clock = Clock()
    matcher = TruthMatcher(MonitoringConfig(truth_max_pending=100, truth_ttl_seconds=60), Events(), clock=clock)
    for n in range(150):
        matcher.register("cls", 1, f"a{n}", classified(0), Baseline())
    snap = matcher.snapshot()
    assert snap["pending"] == 100 and snap["misses"]["evicted"] == 50
    assert matcher.add_truth(parse_truth({"result_id": "a10", "label": 0}))["reason"] == "unknown"  # evicted
    assert matcher.add_truth(parse_truth({"result_id": "a120", "label": 0}), "other")["reason"] == "wrong_model"
    assert matcher.add_truth(parse_truth({"result_id": "a120", "boxes": []}), "cls")["reason"] == "wrong_kind"
    assert matcher.add_truth(parse_truth({"result_id": "a120", "label": "0"}), "cls") == {
        "result_id": "a120", "matched": True, "correct": True}  # by label name too
    assert matcher.add_truth(parse_truth({"result_id": "a120", "label": 0}))["reason"] == "duplicate"
    clock.now += 61
    assert matcher.add_truth(parse_truth({"result_id": "a121", "label": 0}))["reason"] == "expired"
    matcher.register("cls", 1, "late", classified(0), Baseline())  # sweeps the expired ones
    snap = matcher.snapshot()
    assert snap["pending"] == 1 and snap["matched"] == 1
    assert snap["misses"] == {"expired": 99, "evicted": 50, "unknown": 1, "duplicate": 1, "wrong_model": 1,
                              "wrong_kind": 1}


def test_detection_truth_gives_precision_and_recall_at_iou_half() -> None:
    events = Events()
    matcher = TruthMatcher(MonitoringConfig(accuracy_min_samples=10), events)
    for n in range(30):
        result = {"detections": [{"box": [10, 10, 50, 50], "score": 0.9, "class": 0},
                                 {"box": [100, 100, 140, 140], "score": 0.8, "class": 0}]}
        matcher.register("faces", 2, f"d{n}", result, Baseline(precision=0.95, recall=0.9))
        # One true face where the first box is (IoU 0.68), one the detector missed; the second box is false.
        truth = {"result_id": f"d{n}", "boxes": [{"box": [15, 15, 55, 55], "class": 0},
                                                  {"box": [300, 300, 340, 340], "class": 0}]}
        matcher.add_truth(parse_truth(json.loads(json.dumps(truth))), "faces")
    figures = matcher.snapshot()["accuracy"]["faces"]["2"]
    assert figures["precision"] == 0.5 and figures["recall"] == 0.5
    assert [e["metric"] for e in events.seen if e["kind"] == "accuracy"] == ["precision"]


@pytest.mark.parametrize(("doc", "message"), [
    ([], "truth must be a JSON object"),
    ({"label": 1}, "needs a string result_id"),
    ({"result_id": "x"}, "exactly one of label"),
    ({"result_id": "x", "label": 1, "boxes": []}, "exactly one of label"),
    ({"result_id": "x", "label": True}, "class index or a label name"),
    ({"result_id": "x", "boxes": [{"box": [1, 2, 3]}]}, "boxes[0] must be"),
    ({"result_id": "x", "label": 1, "extra": 2}, "unknown key 'extra'"),
])
def test_malformed_truth_is_refused_with_one_line(doc: Any, message: str) -> None:
    with pytest.raises(InputError) as info:
        parse_truth(doc)
    assert message in str(info.value) and "\n" not in str(info.value)

"""The detection heads on synthetic tensors: layouts, NMS, mapping back, and hostile values."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge_runtime.bundle.postprocess_spec import Anchors, Detection, ssd_anchor_count
from edge_runtime.runtime.backends.base import TensorInfo
from edge_runtime.runtime.heads.anchors import generate_anchors
from edge_runtime.runtime.heads.detection import DetectionHead
from edge_runtime.runtime.heads.nms import hard_nms, weighted_nms
from edge_runtime.runtime.preprocess import Placement


def test_blazeface_anchors_are_mediapipes() -> None:
    anchors = generate_anchors(Anchors(), (128, 128))
    assert anchors.shape == (896, 4) == (ssd_anchor_count(Anchors(), (128, 128)), 4)
    # Stride 8: a 16x16 grid, 2 anchors a cell; then stride 16: 8x8 cells, 6 anchors each (3 layers x 2).
    np.testing.assert_allclose(anchors[0], [0.5 / 16, 0.5 / 16, 1, 1])
    np.testing.assert_allclose(anchors[1], anchors[0])
    np.testing.assert_allclose(anchors[2], [1.5 / 16, 0.5 / 16, 1, 1])
    np.testing.assert_allclose(anchors[512], [0.5 / 8, 0.5 / 8, 1, 1])
    np.testing.assert_allclose(anchors[-1], [7.5 / 8, 7.5 / 8, 1, 1])


def random_boxes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    xy = rng.uniform(0, 200, (n, 2))
    wh = rng.uniform(5, 80, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1), rng.uniform(0.3, 1.0, n)


@pytest.mark.parametrize("seed", range(5))
def test_hard_nms_keeps_what_opencv_keeps(seed: int) -> None:
    boxes, scores = random_boxes(np.random.default_rng(seed), 300)
    xywh = [[float(x1), float(y1), float(x2 - x1), float(y2 - y1)] for x1, y1, x2, y2 in boxes]
    theirs = cv2.dnn.NMSBoxes(xywh, scores.tolist(), 0.0, 0.45)
    ours = hard_nms(boxes, scores, 0.45, 1000)
    assert sorted(ours.tolist()) == sorted(np.asarray(theirs).reshape(-1).tolist())


def test_hard_nms_is_class_aware_unless_told() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], float)
    scores = np.array([0.9, 0.8, 0.7])
    classes = np.array([0, 1, 0])
    assert hard_nms(boxes, scores, 0.5, 10, classes).tolist() == [0, 1, 2]
    assert hard_nms(boxes, scores, 0.5, 10).tolist() == [0, 2]
    assert hard_nms(boxes, scores, 0.5, 1).tolist() == [0]


def test_weighted_nms_blends_a_cluster_by_score() -> None:
    data = np.array([[0, 0, 10, 10, 5, 5], [2, 0, 12, 10, 7, 5], [40, 40, 50, 50, 45, 45]], float)
    scores = np.array([0.75, 0.25, 0.6])
    lead, rows, kept = weighted_nms(data, scores, 0.3, 10)
    assert lead.tolist() == [0, 2] and kept.tolist() == [0.75, 0.6]
    np.testing.assert_allclose(rows[0], [0.5, 0, 10.5, 10, 5.5, 5])
    np.testing.assert_allclose(rows[1], data[2])


def yolo_head(layout: str, objectness: bool = False) -> tuple[DetectionHead, np.ndarray]:
    """Two boxes of class 2 (one a near duplicate) and one of class 0, in a 3-class head of 6 candidates."""
    values = 4 + int(objectness) + 3
    pred = np.zeros((6, values), np.float32)
    pred[:, :4] = [20, 20, 4, 4]
    pred[0, :4], pred[1, :4], pred[2, :4] = [50, 40, 20, 10], [51, 40, 20, 10], [100, 100, 30, 30]
    classes = pred[:, 4 + int(objectness):]
    classes[0, 2], classes[1, 2], classes[2, 0] = 0.9, 0.8, 0.7
    if objectness:
        pred[:, 4] = [1.0, 1.0, 0.5, 1.0, 1.0, 1.0]
    shape = (1, values, 6) if layout == "CN" else (1, 6, values)
    head = DetectionHead(Detection(layout="yolo", num_classes=3, objectness=objectness, score_threshold=0.3),
                         [TensorInfo("out", shape, "float32")], (160, 160))
    return head, (pred.T if layout == "CN" else pred)[None]


@pytest.mark.parametrize(("layout", "objectness"), [("CN", False), ("NC", False), ("NC", True)])
def test_yolo_layouts_decode_alike(layout: str, objectness: bool) -> None:
    head, out = yolo_head(layout, objectness)
    (result,) = head({"out": out}, [None])
    found = [(d["class"], d["box"], d["score"]) for d in result["detections"]]
    third = 0.35 if objectness else 0.7
    assert found == [(2, [40.0, 35.0, 60.0, 45.0], 0.9), (0, [85.0, 85.0, 115.0, 115.0], pytest.approx(third))]
    assert result["image_size"] == [160, 160]


def test_decoded_layout_reads_tflite_detection_outputs() -> None:
    outputs = [TensorInfo(n, s, "float32") for n, s in (("boxes", (1, 3, 4)), ("classes", (1, 3)),
                                                       ("scores", (1, 3)), ("count", (1,)))]
    head = DetectionHead(Detection(layout="decoded", score_threshold=0.5), outputs, (100, 200))
    boxes = np.array([[[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.4, 0.4]]], np.float32)
    (result,) = head({"boxes": boxes, "classes": np.array([[3, 1, 2]], np.float32),
                      "scores": np.array([[0.8, 0.4, 0.9]], np.float32), "count": np.array([2.0], np.float32)},
                     [None])
    # count 2: the third row is padding, whatever its score; yxyx normalised -> x1, y1, x2, y2 pixels.
    assert result["detections"] == [{"box": [40.0, 10.0, 120.0, 50.0], "score": 0.8, "class": 3}]


@pytest.mark.parametrize(("placement", "expected"), [
    (Placement((400, 200), (160, 160), 0.4, 0.8), [100.0, 43.75, 150.0, 56.25]),            # stretch
    (Placement((400, 200), (160, 160), 0.4, 0.4, 0.0, 40.0), [100.0, 0.0, 150.0, 12.5]),    # letterbox, centred
    (Placement((400, 200), (160, 160), 0.4, 0.4), [100.0, 87.5, 150.0, 112.5]),             # pad right/bottom
])
def test_boxes_map_back_through_the_placement(placement: Placement, expected: list[float]) -> None:
    head, out = yolo_head("CN")
    (result,) = head({"out": out}, [placement])
    assert result["detections"][0]["box"] == expected
    assert result["image_size"] == [400, 200]
    for d in result["detections"]:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 <= x2 <= 400 and 0 <= y1 <= y2 <= 200  # clipped to the image


def test_hostile_outputs_never_crash_or_give_nan() -> None:
    head, out = yolo_head("NC")
    out = out.copy()
    out[0, 0, :4] = np.nan
    out[0, 1, :4] = [np.inf, 0, 1e38, -np.inf]
    out[0, 3, 4:] = np.nan
    (result,) = head({"out": out}, [None])
    assert all(np.isfinite(d["box"]).all() and np.isfinite(d["score"]) for d in result["detections"])
    empty = np.zeros_like(out)
    assert head({"out": empty}, [None])[0]["detections"] == []
    many = np.tile(np.array([[10, 10, 5, 5, 0.9, 0, 0]], np.float32), (1, 500, 1))
    assert len(head({"out": many}, [None])[0]["detections"]) == 1  # 500 identical boxes: one survives


def test_every_anchor_above_threshold_still_decodes() -> None:
    boxes, scores = TensorInfo("regressors", (1, 896, 16), "float32"), TensorInfo("classificators", (1, 896, 1),
                                                                                     "float32")
    head = DetectionHead(Detection(layout="ssd_anchors", keypoints=6, score_activation="sigmoid", score_clip=100.0,
                                   nms="weighted", iou_threshold=0.3, max_detections=2000), [boxes, scores], (128, 128))
    raw = np.zeros((1, 896, 16), np.float32)
    raw[0, :, 2:4] = 10.0  # 10 px boxes, centred on each anchor
    (result,) = head({"regressors": raw, "classificators": np.full((1, 896, 1), 5.0, np.float32)}, [None])
    assert 64 <= len(result["detections"]) <= 896
    assert all(len(d["keypoints"]) == 6 for d in result["detections"])

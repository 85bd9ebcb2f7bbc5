"""Detection heads -> boxes in the original image's pixels.

One :class:`DetectionHead` per loaded model decodes its declared layout
(:mod:`edge_runtime.bundle.postprocess_spec`) with whole-array numpy: scores
are thresholded first, so only candidates are decoded; NMS loops once per
kept box; boxes and keypoints go back through the preprocessing's
:class:`~edge_runtime.runtime.preprocess.Placement` and are clipped to the image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_runtime.bundle.postprocess_spec import Detection, check_detection, ssd_outputs, yolo_classes
from edge_runtime.errors import InferenceError
from edge_runtime.runtime.backends.base import TensorInfo
from edge_runtime.runtime.heads.anchors import generate_anchors
from edge_runtime.runtime.heads.nms import hard_nms, weighted_nms
from edge_runtime.runtime.preprocess import Placement

__all__ = ["Candidates", "DetectionHead"]


@dataclass(frozen=True)
class Candidates:
    """Boxes that passed the score threshold: corners and keypoints in model-input pixels."""

    boxes: NDArray[Any]  # [N, 4] x1, y1, x2, y2
    scores: NDArray[Any]  # [N]
    classes: NDArray[Any]  # [N] int
    keypoints: NDArray[Any]  # [N, 2K] x, y pairs


def _activate(values: NDArray[Any], kind: str, clip: float = 0.0) -> NDArray[Any]:
    values = values.astype(np.float32, copy=False)
    if clip > 0:
        values = np.clip(values, -clip, clip)
    if kind == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * values))  # no overflow warning for large negative logits
    if kind == "softmax":
        shifted = np.exp(values - values.max(axis=-1, keepdims=True))
        normalised: NDArray[Any] = shifted / shifted.sum(axis=-1, keepdims=True)
        return normalised
    return values


def _corners(raw: NDArray[Any], box_format: str) -> NDArray[Any]:
    """``[N, 4]`` in ``box_format`` -> x1, y1, x2, y2."""
    raw = raw.astype(np.float64, copy=False)
    if box_format in ("xyxy", "yxyx"):
        return raw if box_format == "xyxy" else raw[:, [1, 0, 3, 2]]
    cx, cy, w, h = (raw.T if box_format == "cxcywh" else raw[:, [1, 0, 3, 2]].T)
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def _best_class(scores: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
    if scores.ndim == 1:
        return scores, np.zeros(scores.shape[0], np.int64)
    best = np.argmax(scores, axis=1)
    return np.take_along_axis(scores, best[:, None], axis=1)[:, 0], best


class DetectionHead:
    """Decodes one model's detection outputs. Thread-safe (no state after construction).

    Raises (from the constructor):
        ManifestError: the head does not fit the model's outputs (anchors, classes, names).
    """

    def __init__(self, spec: Detection, outputs: Sequence[TensorInfo], input_hw: tuple[int, int],
                 labels: Sequence[str] = ()) -> None:
        check_detection(spec, outputs, input_hw, len(labels))
        self.spec = spec
        self.labels = list(labels)
        self.input_hw = input_hw
        self.names: tuple[str, ...]
        if spec.layout == "ssd_anchors":
            boxes, scores = ssd_outputs(spec, outputs)
            self.names = (boxes.name, scores.name)
            self.anchors = generate_anchors(spec.anchors, input_hw)
            anchor_h, anchor_w = spec.anchors.input_size or input_hw
            self.box_scale = np.asarray(spec.box_scale or (anchor_w, anchor_h, anchor_w, anchor_h), np.float32)
        elif spec.layout == "yolo":
            self.names = (spec.boxes or outputs[0].name,)
        else:
            order = [o.name for o in outputs]  # TFLite's detection op: boxes, classes, scores, count
            self.names = (spec.boxes or order[0], spec.classes or order[1], spec.scores or order[2],
                          spec.count or order[3])

    def __call__(self, outputs: Mapping[str, NDArray[Any]], placements: Sequence[Placement | None]
                 ) -> list[dict[str, Any]]:
        """One ``{"detections": [...], "image_size": [w, h]}`` per batch item.

        ``placements[i]`` maps item ``i`` back to its source image; None keeps
        model-input pixels (a tensor input).

        Raises:
            InferenceError: an output is missing or its shape does not fit the declared head.
        """
        tensors = []
        for name in self.names:
            value = outputs.get(name)
            if value is None or value.ndim == 0:
                raise InferenceError(f"detection output {name!r} is missing or scalar")
            tensors.append(value)
        batch = min(t.shape[0] for t in tensors)
        return [self._item([t[i] for t in tensors], placements[i] if i < len(placements) else None)
                for i in range(batch)]

    # ------------------------------------------------------------------ decoding

    def _item(self, tensors: list[NDArray[Any]], placement: Placement | None) -> dict[str, Any]:
        spec = self.spec
        if spec.layout == "ssd_anchors":
            found = self._ssd(tensors[0], tensors[1])
        elif spec.layout == "yolo":
            found = self._yolo(tensors[0])
        else:
            found = self._decoded(*tensors)
        kept = self._suppress(found)
        return self._results(kept, placement)

    def _scale(self, corners: NDArray[Any], normalized: bool) -> NDArray[Any]:
        if normalized:
            h, w = self.input_hw
            corners = corners * np.asarray([w, h, w, h], np.float64)
        return corners

    def _ssd(self, raw_boxes: NDArray[Any], raw_scores: NDArray[Any]) -> Candidates:
        spec = self.spec
        if raw_boxes.ndim != 2 or raw_boxes.shape[0] != self.anchors.shape[0] or raw_scores.shape[0] != \
                raw_boxes.shape[0]:
            raise InferenceError(f"ssd head gave boxes {list(raw_boxes.shape)} and scores "
                                 f"{list(raw_scores.shape)} for {self.anchors.shape[0]} anchors")
        scores = _activate(raw_scores.reshape(raw_scores.shape[0], -1), spec.score_activation, spec.score_clip)
        best, classes = _best_class(scores if scores.shape[1] > 1 else scores[:, 0])
        hit = np.flatnonzero(best >= spec.score_threshold)
        raw = raw_boxes[hit].astype(np.float64)
        anchors = self.anchors[hit].astype(np.float64)
        yx_first = spec.resolved_box_format == "cycxhw"
        ix, iy = (1, 0) if yx_first else (0, 1)
        sx, sy, sw, sh = self.box_scale.astype(np.float64)
        cx = raw[:, ix] / sx * anchors[:, 2] + anchors[:, 0]
        cy = raw[:, iy] / sy * anchors[:, 3] + anchors[:, 1]
        w = raw[:, 2 + ix] / sw * anchors[:, 2]
        h = raw[:, 2 + iy] / sh * anchors[:, 3]
        corners = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        k = spec.keypoints
        points = raw[:, 4:4 + 2 * k].reshape(-1, k, 2)
        if yx_first:
            points = points[:, :, ::-1]
        points = points / np.asarray([sx, sy]) * anchors[:, None, 2:4] + anchors[:, None, 0:2]
        h_in, w_in = self.input_hw
        points = (points * np.asarray([w_in, h_in], np.float64)).reshape(-1, 2 * k)
        return Candidates(self._scale(corners, True), best[hit].astype(np.float64), classes[hit], points)

    def _yolo(self, head: NDArray[Any]) -> Candidates:
        spec = self.spec
        shape = (1, *head.shape)
        classes_n = yolo_classes(spec, shape) if head.ndim == 2 else 0
        values = 4 + int(spec.objectness) + classes_n
        if head.ndim != 2 or values not in head.shape:
            raise InferenceError(f"yolo head of shape {list(head.shape)} does not fit {values} values per box")
        # [4+C, N] (Ultralytics v8+) or [N, 4+C] (v5): the values axis is the one of the declared length.
        pred = head.T if head.shape[0] == values and head.shape[1] != values else head
        cls = _activate(pred[:, 4 + int(spec.objectness):], spec.score_activation)
        best, classes = _best_class(cls)
        if spec.objectness:
            best = best * _activate(pred[:, 4], spec.score_activation)
        hit = np.flatnonzero(best >= spec.score_threshold)
        corners = _corners(pred[hit, :4], spec.resolved_box_format)
        empty = np.zeros((hit.size, 0))
        return Candidates(self._scale(corners, spec.resolved_coordinates == "normalized"),
                          best[hit].astype(np.float64), classes[hit], empty)

    def _decoded(self, boxes: NDArray[Any], classes: NDArray[Any], scores: NDArray[Any],
                 count: NDArray[Any]) -> Candidates:
        spec = self.spec
        n = int(np.clip(np.asarray(count).reshape(-1)[0], 0, boxes.shape[0])) if count.size else boxes.shape[0]
        boxes, classes, scores = boxes.reshape(-1, 4)[:n], classes.reshape(-1)[:n], scores.reshape(-1)[:n]
        if not (boxes.shape[0] == classes.shape[0] == scores.shape[0] == n):
            raise InferenceError(f"decoded head gave {boxes.shape[0]} boxes, {classes.shape[0]} classes and "
                                 f"{scores.shape[0]} scores for a count of {n}")
        hit = np.flatnonzero(scores >= spec.score_threshold)
        corners = _corners(boxes[hit], spec.resolved_box_format)
        return Candidates(self._scale(corners, spec.resolved_coordinates == "normalized"),
                          scores[hit].astype(np.float64), np.rint(classes[hit]).astype(np.int64),
                          np.zeros((hit.size, 0)))

    def _suppress(self, c: Candidates) -> Candidates:
        spec = self.spec
        finite = np.isfinite(c.boxes).all(axis=1) & np.isfinite(c.scores)
        if not finite.all():  # a NaN box would poison every IoU it meets
            c = Candidates(c.boxes[finite], c.scores[finite], c.classes[finite], c.keypoints[finite])
        if spec.layout == "decoded" or spec.nms == "none":
            order = np.argsort(-c.scores, kind="stable")[: spec.max_detections]
            return Candidates(c.boxes[order], c.scores[order], c.classes[order], c.keypoints[order])
        if spec.nms == "weighted":
            lead, boxes, scores, points = weighted_nms(c.boxes, c.scores, c.keypoints, spec.iou_threshold,
                                                       spec.max_detections)
            return Candidates(boxes, scores, c.classes[lead], points)
        keep = hard_nms(c.boxes, c.scores, spec.iou_threshold, spec.max_detections,
                        None if spec.class_agnostic else c.classes)
        return Candidates(c.boxes[keep], c.scores[keep], c.classes[keep], c.keypoints[keep])

    def _results(self, c: Candidates, placement: Placement | None) -> dict[str, Any]:
        if placement is None:
            h, w = self.input_hw
            size = (w, h)
            boxes, points = c.boxes, c.keypoints
        else:
            size = placement.source
            boxes, points = placement.to_source(c.boxes), placement.to_source(c.keypoints)
        limit = np.asarray([size[0], size[1]] * 2, np.float64)
        boxes = np.clip(boxes, 0, limit)
        if points.size:
            points = np.clip(points, 0, np.tile(limit[:2], points.shape[1] // 2))
        detections = []
        for i in range(boxes.shape[0]):
            cls = int(c.classes[i])
            entry: dict[str, Any] = {"box": [round(float(v), 2) for v in boxes[i]],
                                     "score": round(float(c.scores[i]), 6), "class": cls}
            label_index = cls + self.spec.label_offset
            if 0 <= label_index < len(self.labels):
                entry["label"] = self.labels[label_index]
            if points.shape[1]:
                entry["keypoints"] = [[round(float(x), 2), round(float(y), 2)]
                                      for x, y in points[i].reshape(-1, 2)]
            detections.append(entry)
        return {"detections": detections, "image_size": [int(size[0]), int(size[1])]}

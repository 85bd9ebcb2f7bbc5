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
    """Boxes that passed the score threshold, in model-input pixels.

    ``data`` rows are x1, y1, x2, y2 then the keypoints' (x, y) pairs: one
    array, so mapping, clipping and rounding are one pass each.
    """

    data: NDArray[Any]  # [N, 4 + 2K]
    scores: NDArray[Any]  # [N]
    classes: NDArray[Any]  # [N] int

    def take(self, index: NDArray[Any]) -> Candidates:
        return Candidates(self.data[index], self.scores[index], self.classes[index])


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
            gain, offset = self._ssd_tables()
            self._table = np.stack([gain, offset], axis=1)  # one gather per call, not two
            # (cx, cy, w, h, keypoints...) @ corners = (x1, y1, x2, y2, keypoints...): one matmul, in float64.
            width = gain.shape[1]
            self._corners = np.eye(width, dtype=np.float64)
            self._corners[:4, :4] = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [-0.5, 0, 0.5, 0], [0, -0.5, 0, 0.5]])
            self._logit = self._logit_threshold()
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

    def _ssd_tables(self) -> tuple[NDArray[Any], NDArray[Any]]:
        """Per anchor, value = raw * gain + offset gives centre, size and keypoints in input pixels.

        Folding anchor size, box scale and input size into two tables makes the
        hot path one multiply-add over the candidates.
        """
        spec, anchors = self.spec, self.anchors.astype(np.float64)
        anchor_h, anchor_w = spec.anchors.input_size or self.input_hw
        sx, sy, sw, sh = spec.box_scale or (anchor_w, anchor_h, anchor_w, anchor_h)
        h_in, w_in = self.input_hw
        # Columns in the head's order: x-like values first unless the head is y-first (cycxhw).
        yx_first = spec.resolved_box_format == "cycxhw"
        kinds = ["y", "x", "h", "w"] if yx_first else ["x", "y", "w", "h"]
        kinds += (["y", "x"] if yx_first else ["x", "y"]) * spec.keypoints
        gain = np.empty((anchors.shape[0], len(kinds)), np.float64)
        offset = np.zeros_like(gain)
        for col, kind in enumerate(kinds):
            size = anchors[:, 2] if kind in "xw" else anchors[:, 3]
            scale = {"x": sx, "y": sy, "w": sw, "h": sh}[kind]
            pixels = w_in if kind in "xw" else h_in
            gain[:, col] = size / scale * pixels
            if kind in "xy":
                offset[:, col] = (anchors[:, 0] if kind == "x" else anchors[:, 1]) * pixels
        if yx_first:  # store as x, y, w, h, then (x, y) pairs, whatever the head's order
            order = [1, 0, 3, 2] + [4 + 2 * k + j for k in range(spec.keypoints) for j in (1, 0)]
            gain, offset = gain[:, order], offset[:, order]
        return gain.astype(np.float32), offset.astype(np.float32)

    def _ssd(self, raw_boxes: NDArray[Any], raw_scores: NDArray[Any]) -> Candidates:
        spec = self.spec
        width = self._table.shape[2]
        if raw_boxes.ndim != 2 or raw_boxes.shape[0] != self.anchors.shape[0] or raw_scores.shape[0] != \
                raw_boxes.shape[0] or raw_boxes.shape[1] < width:
            raise InferenceError(f"ssd head gave boxes {list(raw_boxes.shape)} and scores "
                                 f"{list(raw_scores.shape)} for {self.anchors.shape[0]} anchors")
        flat = raw_scores.reshape(raw_scores.shape[0], -1)
        if flat.shape[1] == 1:
            # Sigmoid is monotonic: threshold the logits, activate only the candidates.
            logits = flat[:, 0]
            if spec.score_activation == "sigmoid" and self._logit > -np.inf:
                hit = np.flatnonzero(logits >= self._logit)
                # Every candidate's logit is >= the threshold's, so exp(-x) cannot overflow.
                kept = logits[hit].astype(np.float64)
                best = 1.0 / (1.0 + np.exp(-(np.minimum(kept, spec.score_clip) if spec.score_clip > 0 else kept)))
            else:
                activated = _activate(logits, spec.score_activation, spec.score_clip)
                hit = np.flatnonzero(activated >= spec.score_threshold)
                best = activated[hit]
            classes = np.zeros(hit.size, np.int64)
        else:
            scores, cls = _best_class(_activate(flat, spec.score_activation, spec.score_clip))
            hit = np.flatnonzero(scores >= spec.score_threshold)
            best, classes = scores[hit], cls[hit]
        table = self._table[hit]
        raw = raw_boxes[hit] if raw_boxes.shape[1] == width else raw_boxes[hit, :width]
        values = (raw * table[:, 0] + table[:, 1]) @ self._corners
        return Candidates(values, best.astype(np.float64, copy=False), classes)

    def _logit_threshold(self) -> float:
        t = self.spec.score_threshold
        if t <= 0.0:
            return -np.inf
        if t >= 1.0:
            return np.inf
        logit = float(np.log(t / (1.0 - t)))
        clip = self.spec.score_clip
        # A clipped logit never exceeds the clip: a threshold above it keeps nothing, as the clipped sigmoid would.
        return min(logit, clip) if clip > 0 and logit > clip else logit

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
        return Candidates(self._scale(corners, spec.resolved_coordinates == "normalized"),
                          best[hit].astype(np.float64), classes[hit])

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
                          scores[hit].astype(np.float64), np.rint(classes[hit]).astype(np.int64))

    def _suppress(self, c: Candidates) -> Candidates:
        spec = self.spec
        finite = np.isfinite(c.data).all(axis=1) & np.isfinite(c.scores)
        if not finite.all():  # a NaN box would poison every IoU it meets
            c = c.take(np.flatnonzero(finite))
        if spec.layout == "decoded" or spec.nms == "none":
            return c.take(np.argsort(-c.scores, kind="stable")[: spec.max_detections])
        if spec.nms == "weighted":
            lead, rows, scores = weighted_nms(c.data, c.scores, spec.iou_threshold, spec.max_detections)
            return Candidates(rows, scores, c.classes[lead])
        keep = hard_nms(c.data[:, :4], c.scores, spec.iou_threshold, spec.max_detections,
                        None if spec.class_agnostic else c.classes)
        return c.take(keep)

    def _results(self, c: Candidates, placement: Placement | None) -> dict[str, Any]:
        if placement is None:
            h, w = self.input_hw
            size = (w, h)
            data = c.data
        else:
            size = placement.source
            data = placement.to_source(c.data)
        pairs = data.shape[1] // 2
        rows = np.round(np.minimum(np.maximum(data, 0.0), size * pairs), 2).tolist()
        detections = []
        for row, score, cls in zip(rows, c.scores.tolist(), c.classes.tolist(), strict=True):
            entry: dict[str, Any] = {"box": row[:4], "score": round(score, 6), "class": cls}
            label_index = cls + self.spec.label_offset
            if 0 <= label_index < len(self.labels):
                entry["label"] = self.labels[label_index]
            if len(row) > 4:
                entry["keypoints"] = [row[i:i + 2] for i in range(4, len(row), 2)]
            detections.append(entry)
        return {"detections": detections, "image_size": [int(size[0]), int(size[1])]}

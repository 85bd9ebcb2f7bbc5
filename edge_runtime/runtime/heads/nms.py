"""Non-maximum suppression over corner boxes, vectorised per kept box.

Each round keeps the best remaining box and drops, in one numpy pass, every
box that overlaps it too much, so the Python loop runs once per *kept* box
(at most ``max_detections``), never once per candidate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["hard_nms", "iou_one_to_many", "weighted_nms"]


def iou_one_to_many(box: NDArray[Any], boxes: NDArray[Any]) -> NDArray[Any]:
    """IoU of one ``[4]`` corner box (x1, y1, x2, y2) with each of ``[N, 4]``; 0 where the union is empty."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = max(float(box[2] - box[0]), 0.0) * max(float(box[3] - box[1]), 0.0)
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    union = area + areas - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _class_offset(boxes: NDArray[Any], classes: NDArray[Any] | None) -> NDArray[Any]:
    """Shift each class's boxes to their own region, so one pass never suppresses across classes."""
    if classes is None or boxes.shape[0] == 0:
        return boxes
    span = float(np.max(boxes) - np.min(boxes)) + 1.0
    return boxes + (classes.astype(np.float64) * span)[:, None]


def hard_nms(boxes: NDArray[Any], scores: NDArray[Any], iou_threshold: float, max_keep: int,
             classes: NDArray[Any] | None = None) -> NDArray[Any]:
    """Indices of the boxes greedy NMS keeps, best first.

    A box is dropped when its IoU with a kept box exceeds ``iou_threshold``
    (OpenCV's ``NMSBoxes`` rule); with ``classes`` only boxes of the same
    class suppress each other.
    """
    order = np.argsort(-scores, kind="stable")
    shifted = _class_offset(boxes.astype(np.float64), classes)[order]
    keep: list[int] = []
    alive = np.ones(order.shape[0], bool)
    pos = 0
    while len(keep) < max_keep:
        remaining = np.flatnonzero(alive[pos:])
        if remaining.size == 0:
            break
        pos += int(remaining[0])
        keep.append(int(order[pos]))
        alive[pos] = False
        rest = np.flatnonzero(alive)
        if rest.size:
            alive[rest[iou_one_to_many(shifted[pos], shifted[rest]) > iou_threshold]] = False
    return np.asarray(keep, np.int64)


def weighted_nms(boxes: NDArray[Any], scores: NDArray[Any], extra: NDArray[Any], iou_threshold: float,
                 max_keep: int) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any]]:
    """MediaPipe's blending NMS: each kept box is the score-weighted mean of the boxes it suppressed.

    ``extra`` (``[N, E]``, e.g. keypoints) is averaged the same way. Returns
    (indices of the leading boxes, blended boxes, their scores, blended extra);
    a cluster's score is its best box's score.
    """
    order = np.argsort(-scores, kind="stable")
    boxes64, extra64 = boxes.astype(np.float64)[order], extra.astype(np.float64)[order]
    ranked = scores.astype(np.float64)[order]
    lead: list[int] = []
    out_boxes: list[NDArray[Any]] = []
    out_scores: list[float] = []
    out_extra: list[NDArray[Any]] = []
    alive = np.ones(order.shape[0], bool)
    while len(lead) < max_keep:
        rest = np.flatnonzero(alive)
        if rest.size == 0:
            break
        top = rest[0]
        cluster = rest[iou_one_to_many(boxes64[top], boxes64[rest]) > iou_threshold]
        cluster = cluster if cluster.size else np.asarray([top])
        alive[cluster] = False
        alive[top] = False
        weights = ranked[cluster]
        total = float(weights.sum())
        lead.append(int(order[top]))
        out_scores.append(float(ranked[top]))
        if total > 0:
            out_boxes.append(weights @ boxes64[cluster] / total)
            out_extra.append(weights @ extra64[cluster] / total)
        else:
            out_boxes.append(boxes64[top])
            out_extra.append(extra64[top])
    width = extra.shape[1] if extra.ndim == 2 else 0
    return (np.asarray(lead, np.int64), np.asarray(out_boxes, np.float64).reshape(-1, 4),
            np.asarray(out_scores, np.float64), np.asarray(out_extra, np.float64).reshape(-1, width))

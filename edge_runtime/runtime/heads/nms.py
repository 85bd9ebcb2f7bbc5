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


def iou_one_to_many(box: NDArray[Any], boxes: NDArray[Any], areas: NDArray[Any] | None = None) -> NDArray[Any]:
    """IoU of one ``[4]`` corner box (x1, y1, x2, y2) with each of ``[N, 4]``; 0 where the union is empty.

    ``areas`` (of ``boxes``) may be passed in when computed once for many calls.
    """
    if areas is None:
        areas = _areas(boxes)
    inter = np.maximum(np.minimum(box[2:4], boxes[:, 2:4]) - np.maximum(box[:2], boxes[:, :2]), 0.0).prod(axis=1)
    union = _areas(box[None])[0] + areas - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _areas(boxes: NDArray[Any]) -> NDArray[Any]:
    areas: NDArray[Any] = np.maximum(boxes[:, 2:4] - boxes[:, :2], 0.0).prod(axis=1)
    return areas


def _class_offset(boxes: NDArray[Any], classes: NDArray[Any] | None) -> NDArray[Any]:
    """Shift each class's boxes to their own region, so one pass never suppresses across classes."""
    if classes is None or boxes.shape[0] < 2:
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
    if order.size < 2:
        return order[:max_keep]
    ranked = _class_offset(boxes.astype(np.float64), classes)[order]
    areas = _areas(ranked)
    keep: list[int] = []
    rest = np.arange(order.size)
    while rest.size and len(keep) < max_keep:
        top = rest[0]
        keep.append(int(order[top]))
        rest = rest[1:]
        if rest.size:
            rest = rest[iou_one_to_many(ranked[top], ranked[rest], areas[rest]) <= iou_threshold]
    return np.asarray(keep, np.int64)


def weighted_nms(data: NDArray[Any], scores: NDArray[Any], iou_threshold: float, max_keep: int
                 ) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """MediaPipe's blending NMS: each kept box is the score-weighted mean of the boxes it suppressed.

    ``data`` is ``[N, 4 + E]``: corner boxes, then values blended the same way
    (keypoints). Returns (indices of the leading boxes, blended rows, their
    scores); a cluster's score is its best box's score.
    """
    order = np.argsort(-scores, kind="stable")
    if order.size < 2:
        order = order[:max_keep]
        return order, data[order].astype(np.float64), scores[order].astype(np.float64)
    ranked = data.astype(np.float64)[order]
    weights_all = scores.astype(np.float64)[order]
    areas = _areas(ranked)
    lead: list[int] = []
    rows: list[NDArray[Any]] = []
    rest = np.arange(order.size)
    while rest.size and len(lead) < max_keep:
        top = rest[0]
        near = iou_one_to_many(ranked[top, :4], ranked[rest, :4], areas[rest]) > iou_threshold
        near[0] = True  # a degenerate (zero-area) best box still leads its own cluster
        cluster = rest[near]
        rest = rest[~near]
        weights = weights_all[cluster]
        total = float(weights.sum())
        lead.append(int(order[top]))
        rows.append(weights @ ranked[cluster] / total if total > 0 else ranked[top])
    leads = np.asarray(lead, np.int64)
    return leads, np.asarray(rows, np.float64).reshape(-1, data.shape[1]), scores.astype(np.float64)[leads]

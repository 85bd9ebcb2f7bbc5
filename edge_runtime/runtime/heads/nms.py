"""Non-maximum suppression over corner boxes, vectorised per kept box.

Each round keeps the best remaining box and drops, in one numpy pass, every
box that overlaps it too much, so the Python loop runs once per *kept* box
(at most ``max_detections``), never once per candidate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["count_matches", "hard_nms", "iou_one_to_many", "weighted_nms"]


def iou_one_to_many(box: NDArray[Any], boxes: NDArray[Any], areas: NDArray[Any] | None = None,
                    area: float | None = None) -> NDArray[Any]:
    """IoU of one ``[4]`` corner box (x1, y1, x2, y2) with each of ``[N, 4]``; 0 where the union is empty.

    ``areas`` (of ``boxes``) and ``area`` (of ``box``) may be passed in when computed once for many calls.
    """
    if areas is None:
        areas = _areas(boxes)
    if area is None:
        area = float(_areas(box[None])[0])
    wh = np.maximum(np.minimum(box[2:4], boxes[:, 2:4]) - np.maximum(box[:2], boxes[:, :2]), 0.0)
    inter = wh[:, 0] * wh[:, 1]  # not .prod(axis=1): a reduction costs more than a multiply on a few rows
    # An empty union has an empty intersection too: 0 / tiny = 0, without an errstate context per call.
    iou: NDArray[Any] = inter / np.maximum(areas + (area - inter), 1e-12)
    return iou


def count_matches(boxes_a: NDArray[Any], classes_a: NDArray[Any], boxes_b: NDArray[Any],
                  classes_b: NDArray[Any], threshold: float) -> int:
    """How many boxes of ``a`` pair with one of ``b`` of the same class at IoU >= ``threshold``.

    Greedy, best pair first, each box used once (the usual detection-metric matching).
    """
    if not len(boxes_a) or not len(boxes_b):
        return 0
    areas = _areas(boxes_b)
    iou = np.stack([iou_one_to_many(box, boxes_b, areas) for box in boxes_a])
    iou[classes_a[:, None] != classes_b[None, :]] = 0.0
    matches = 0
    while True:
        i, j = np.unravel_index(int(np.argmax(iou)), iou.shape)
        if iou[i, j] < threshold:
            return matches
        matches += 1
        iou[i, :] = 0.0
        iou[:, j] = 0.0


def _areas(boxes: NDArray[Any]) -> NDArray[Any]:
    wh = np.maximum(boxes[:, 2:4] - boxes[:, :2], 0.0)
    areas: NDArray[Any] = wh[:, 0] * wh[:, 1]
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
    ranked = _class_offset(np.asarray(boxes, np.float64), classes)[order]
    areas = _areas(ranked)
    keep: list[int] = []
    alive = np.ones(order.size, bool)
    top = 0
    while len(keep) < max_keep:
        keep.append(int(order[top]))
        alive &= iou_one_to_many(ranked[top], ranked, areas, float(areas[top])) <= iou_threshold
        alive[top] = False
        top = int(np.argmax(alive))
        if not alive[top]:
            break
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
        return order, np.asarray(data, np.float64)[order], np.asarray(scores, np.float64)[order]
    ranked = np.asarray(data, np.float64)[order]
    weights_all = np.asarray(scores, np.float64)[order]
    boxes = ranked[:, :4]
    areas = _areas(boxes)
    lead: list[int] = []
    rows: list[NDArray[Any]] = []
    alive = np.ones(order.size, bool)
    top = 0
    while len(lead) < max_keep:
        near = iou_one_to_many(boxes[top], boxes, areas, float(areas[top])) > iou_threshold
        near &= alive
        near[top] = True  # a degenerate (zero-area) best box still leads its own cluster
        alive &= ~near
        weights = weights_all[near]
        total = float(weights.sum())
        lead.append(int(order[top]))
        rows.append(weights @ ranked[near] / total if total > 0 else ranked[top])
        top = int(np.argmax(alive))
        if not alive[top]:
            break
    leads = np.asarray(lead, np.int64)
    return leads, np.asarray(rows, np.float64).reshape(-1, data.shape[1]), np.asarray(scores, np.float64)[leads]

"""Golden cases of detectors and segmenters compare what the model *says*, not its raw tensors.

The expected tensors of a case (computed by the publisher's runtime at pack
time) and the candidate's are both decoded by the bundle's own head; then
detections are matched by IoU and score, masks by agreement. Raw SSD or YOLO
tensors carry thousands of sub-threshold values that may drift harmlessly
between runtimes; the boxes a user gets must not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_runtime.bundle.manifest import GoldenCase
from edge_runtime.runtime.heads.nms import iou_one_to_many
from edge_runtime.runtime.postprocess import Postprocessor

__all__ = ["MASK_AGREEMENT", "MATCH_IOU", "compare_heads"]

MATCH_IOU = 0.9  # a candidate's box must overlap the expected one at least this much
MASK_AGREEMENT = 0.99  # share of pixels whose class must agree


def _iou(a: list[float], b: list[float]) -> float:
    return float(iou_one_to_many(np.asarray(a, np.float64), np.asarray([b], np.float64))[0])


def compare_heads(post: Postprocessor, case: GoldenCase, expected: Mapping[str, NDArray[Any]],
                  got: Mapping[str, NDArray[Any]]) -> str:
    """One failure line for ``case`` (empty when the decoded results agree).

    Detections: the same count; each expected one (best first) matched to an
    unused one of the same class with IoU >= :data:`MATCH_IOU` and a score
    within the case's ``rtol``/``atol``. Masks: the same size and at least
    :data:`MASK_AGREEMENT` of the pixels in the same class.
    """
    if post.detection is not None:
        return _compare_detections(post, case, expected, got)
    assert post.segmentation is not None
    want = post.segmentation.masks(expected, [None])
    have = post.segmentation.masks(got, [None])
    for i, (a, b) in enumerate(zip(want, have, strict=True)):
        if a.shape != b.shape:
            return f"{case.input}: mask {i} is {list(b.shape)}, expected {list(a.shape)}"
        agreement = float(np.mean(a == b))
        if agreement < MASK_AGREEMENT:
            return f"{case.input}: mask {i} agrees on {agreement:.1%} of the pixels, {MASK_AGREEMENT:.0%} required"
    return ""


def _compare_detections(post: Postprocessor, case: GoldenCase, expected: Mapping[str, NDArray[Any]],
                        got: Mapping[str, NDArray[Any]]) -> str:
    assert post.detection is not None
    for item, (want, have) in enumerate(zip(post.detection(expected, [None]), post.detection(got, [None]),
                                            strict=True)):
        wanted, found = want["detections"], have["detections"]
        if len(wanted) != len(found):
            return f"{case.input}: {len(found)} detections, expected {len(wanted)}"
        left = list(found)
        for w in sorted(wanted, key=lambda d: -d["score"]):
            same_class = [d for d in left if d["class"] == w["class"]]
            if not same_class:
                return f"{case.input}: no detection of class {w['class']} where one was expected"
            best = max(same_class, key=lambda d: _iou(d["box"], w["box"]))
            overlap = _iou(best["box"], w["box"])
            if overlap < MATCH_IOU:
                return f"{case.input}: box IoU {overlap:.2f} < {MATCH_IOU} for class {w['class']} (item {item})"
            if not np.isclose(best["score"], w["score"], rtol=case.rtol, atol=case.atol):
                return (f"{case.input}: score {best['score']:.4f} != expected {w['score']:.4f} for class "
                        f"{w['class']} (atol {case.atol:g}, rtol {case.rtol:g})")
            left.remove(best)
    return ""

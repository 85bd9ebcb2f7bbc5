"""What detection and segmentation heads declare in the manifest: typed, validated, pure.

A detector's outputs come in a few common layouts (``DETECTION_LAYOUTS``):

- ``ssd_anchors``: an anchor-based SSD head (BlazeFace and MediaPipe's
  detectors): a box tensor ``[1, A, 4 + 2K]`` of offsets against ``A``
  generated anchors (``K`` keypoints) and a score tensor ``[1, A, C]``;
- ``yolo``: one tensor ``[1, 4 + C, N]`` or ``[1, N, 4 + C]`` of centre-size
  boxes and class scores (``[.., 5 + C]`` with ``objectness = true``);
- ``decoded``: boxes, classes, scores and a count, already decoded and
  suppressed (TFLite's detection post-process op).

Everything here is checked when a manifest is parsed, so ``bundle pack`` and
every install refuse a head that cannot match the model's outputs (anchors
that do not add up to the box tensor, a class count that does not fit, an NMS
threshold out of range) with one line naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from edge_runtime.errors import ManifestError

__all__ = [
    "BOX_FORMATS",
    "DETECTION_LAYOUTS",
    "NMS_KINDS",
    "SEGMENTATION_MODES",
    "Anchors",
    "Detection",
    "Segmentation",
    "check_detection",
    "check_segmentation",
    "ssd_anchor_count",
]

DETECTION_LAYOUTS = ("ssd_anchors", "yolo", "decoded")
#: Box coordinate orders: centre-size (x first or y first) and corners (x first or y first).
BOX_FORMATS = ("", "cxcywh", "cycxhw", "xyxy", "yxyx")
COORDINATES = ("", "pixels", "normalized")
SCORE_ACTIVATIONS = ("none", "sigmoid", "softmax")
NMS_KINDS = ("hard", "weighted", "none")
SEGMENTATION_MODES = ("argmax", "threshold")
SEGMENTATION_LAYOUTS = ("", "NCHW", "NHWC", "HW")
MAX_CLASSES = 100_000
MAX_ANCHOR_LAYERS = 16


class TensorSpec(Protocol):
    """What is checked of an output: its name and shape (None = dynamic)."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int | None, ...]: ...


@dataclass(frozen=True)
class Anchors:
    """SSD anchor generation, as MediaPipe's ``SsdAnchorsCalculator`` options.

    ``input_size`` is (height, width) the anchors were designed for; empty
    means the model input's own size. Offsets place each anchor centre inside
    its feature-map cell (0.5 = the middle).
    """

    strides: tuple[int, ...] = (8, 16, 16, 16)
    min_scale: float = 0.1484375
    max_scale: float = 0.75
    offset_x: float = 0.5
    offset_y: float = 0.5
    aspect_ratios: tuple[float, ...] = (1.0,)
    interpolated_scale_aspect_ratio: float = 1.0
    fixed_anchor_size: bool = True
    reduce_boxes_in_lowest_layer: bool = False
    input_size: tuple[int, ...] = ()


@dataclass(frozen=True)
class Detection:
    """A detection head: where its tensors are, how they decode, and how boxes are filtered.

    Output names left empty are found by shape (see :func:`check_detection`).
    ``box_format``/``coordinates`` left empty take the layout's usual value:
    ``cxcywh`` everywhere but ``decoded`` (``yxyx``); anchor units for SSD,
    input pixels for YOLO, normalised for decoded. ``num_classes`` 0 means
    "from the output shape". ``box_scale`` divides the SSD offsets (x, y, w, h;
    empty = the anchors' input size). ``nms`` is ``hard`` (greedy, class-aware
    unless ``class_agnostic``), ``weighted`` (MediaPipe's blending: each kept
    box is the score-weighted mean of the boxes it suppressed) or ``none``.
    ``label_offset`` is added to a class index before its label is looked up.
    """

    layout: str = "yolo"
    boxes: str = ""
    scores: str = ""
    classes: str = ""
    count: str = ""
    num_classes: int = 0
    keypoints: int = 0
    objectness: bool = False
    box_format: str = ""
    coordinates: str = ""
    box_scale: tuple[float, ...] = ()
    score_activation: str = "none"
    score_clip: float = 0.0
    score_threshold: float = 0.5
    nms: str = "hard"
    iou_threshold: float = 0.45
    max_detections: int = 100
    class_agnostic: bool = False
    label_offset: int = 0
    anchors: Anchors = field(default_factory=Anchors)

    @property
    def resolved_box_format(self) -> str:
        return self.box_format or ("yxyx" if self.layout == "decoded" else "cxcywh")

    @property
    def resolved_coordinates(self) -> str:
        return self.coordinates or ("pixels" if self.layout == "yolo" else "normalized")


@dataclass(frozen=True)
class Segmentation:
    """A segmentation head: per-pixel class scores or one foreground map.

    ``mode = "argmax"`` takes the best class per pixel of a ``C``-channel map;
    ``"threshold"`` marks pixels whose (``activation``-ed) value reaches
    ``threshold`` on a one-channel map. ``layout`` names the output's axes
    (empty: guessed, the channel axis being the smaller of dims 1 and 3).
    """

    output: str = ""
    mode: str = "argmax"
    layout: str = ""
    activation: str = "none"
    threshold: float = 0.5


def _dims(shape: Sequence[int | None]) -> str:
    """A shape as manifests write it: -1 for a dynamic dimension."""
    return str([-1 if d is None else d for d in shape])


def _calc_scale(min_scale: float, max_scale: float, index: int, count: int) -> float:
    if count == 1:
        return (min_scale + max_scale) / 2
    return min_scale + (max_scale - min_scale) * index / (count - 1)


def ssd_anchor_count(anchors: Anchors, input_hw: tuple[int, int]) -> int:
    """How many anchors :class:`Anchors` generates for an input of (height, width)."""
    height, width = anchors.input_size or input_hw
    total, layer = 0, 0
    strides = anchors.strides
    while layer < len(strides):
        per_cell, last = 0, layer
        while last < len(strides) and strides[last] == strides[layer]:
            if last == 0 and anchors.reduce_boxes_in_lowest_layer:
                per_cell += 3
            else:
                per_cell += len(anchors.aspect_ratios) + (anchors.interpolated_scale_aspect_ratio > 0)
            last += 1
        stride = strides[layer]
        total += math.ceil(height / stride) * math.ceil(width / stride) * per_cell
        layer = last
    return total


def ssd_anchor_scale(anchors: Anchors, index: int) -> float:
    """The scale of anchor layer ``index`` (MediaPipe's linear interpolation)."""
    return _calc_scale(anchors.min_scale, anchors.max_scale, index, len(anchors.strides))


def _bad(key: str, what: str) -> ManifestError:
    return ManifestError(f"postprocess.detection.{key} {what}")


def _check_ranges(det: Detection) -> None:
    if det.layout not in DETECTION_LAYOUTS:
        raise _bad("layout", "must be one of " + ", ".join(map(repr, DETECTION_LAYOUTS)))
    choices = (("box_format", det.box_format, BOX_FORMATS), ("coordinates", det.coordinates, COORDINATES),
               ("score_activation", det.score_activation, SCORE_ACTIVATIONS), ("nms", det.nms, NMS_KINDS))
    for key, value, allowed in choices:
        if value not in allowed:
            raise _bad(key, "must be one of " + ", ".join(repr(c) for c in allowed if c))
    if not 0.0 <= det.score_threshold <= 1.0:
        raise _bad("score_threshold", f"must be between 0 and 1, got {det.score_threshold:g}")
    if not 0.0 < det.iou_threshold <= 1.0:
        raise _bad("iou_threshold", f"must be in (0, 1], got {det.iou_threshold:g}")
    if not 1 <= det.max_detections <= 10_000:
        raise _bad("max_detections", f"must be between 1 and 10000, got {det.max_detections}")
    if not 0 <= det.num_classes <= MAX_CLASSES:
        raise _bad("num_classes", f"must be between 0 and {MAX_CLASSES}, got {det.num_classes}")
    if not 0 <= det.keypoints <= 1000:
        raise _bad("keypoints", f"must be between 0 and 1000, got {det.keypoints}")
    if not 0 <= det.label_offset <= MAX_CLASSES:
        raise _bad("label_offset", f"must be between 0 and {MAX_CLASSES}, got {det.label_offset}")
    if det.score_clip < 0 or not math.isfinite(det.score_clip):
        raise _bad("score_clip", "must be a finite number >= 0")
    if det.box_scale and (len(det.box_scale) != 4 or not all(s > 0 and math.isfinite(s) for s in det.box_scale)):
        raise _bad("box_scale", "must be 4 positive numbers (x, y, w, h)")
    if det.layout == "yolo" and det.keypoints:
        raise _bad("keypoints", "are read only from ssd_anchors heads")
    if det.layout == "ssd_anchors":
        _check_anchors(det.anchors)


def _check_anchors(a: Anchors) -> None:
    if not 1 <= len(a.strides) <= MAX_ANCHOR_LAYERS or not all(1 <= s <= 4096 for s in a.strides):
        raise _bad("anchors.strides", f"must be 1 to {MAX_ANCHOR_LAYERS} strides of 1..4096")
    if not 0 < a.min_scale <= a.max_scale <= 100:
        raise _bad("anchors.min_scale", "must be > 0 and <= max_scale (<= 100)")
    if not 1 <= len(a.aspect_ratios) <= 16 or not all(0 < r <= 100 for r in a.aspect_ratios):
        raise _bad("anchors.aspect_ratios", "must be 1 to 16 positive ratios")
    if not (0 <= a.offset_x <= 1 and 0 <= a.offset_y <= 1):
        raise _bad("anchors.offset_x", "and offset_y must be between 0 and 1")
    if not 0 <= a.interpolated_scale_aspect_ratio <= 100:
        raise _bad("anchors.interpolated_scale_aspect_ratio", "must be between 0 and 100")
    if a.input_size and (len(a.input_size) != 2 or not all(1 <= d <= 16384 for d in a.input_size)):
        raise _bad("anchors.input_size", "must be [height, width], each 1..16384")


def _pick(outputs: Sequence[TensorSpec], name: str, key: str) -> TensorSpec | None:
    if not name:
        return None
    for spec in outputs:
        if spec.name == name:
            return spec
    raise _bad(key, f"{name!r} is not an output of the model ({', '.join(s.name for s in outputs)})")


def _last_dim(spec: TensorSpec) -> int | None:
    return spec.shape[-1] if spec.shape else None


def check_detection(det: Detection, outputs: Sequence[TensorSpec], input_hw: tuple[int, int] | None,
                    labels: int = 0) -> None:
    """Refuse a detection head that cannot decode these outputs.

    ``outputs`` are the model's outputs (static dims are checked, dynamic
    ones pass); ``input_hw`` the model input's (height, width) when known;
    ``labels`` the number of labels (0: none), which must cover the classes.

    Raises:
        ManifestError: a value out of range, an unknown output, anchors that do not add up to the box
            tensor, or a class/keypoint count that does not match the output shape.
    """
    _check_ranges(det)
    if not outputs:
        return
    if det.layout == "ssd_anchors":
        _check_ssd(det, outputs, input_hw)
    elif det.layout == "yolo":
        head = _pick(outputs, det.boxes, "boxes") or outputs[0]
        classes = yolo_classes(det, head.shape)
        if labels and classes and det.label_offset + classes > labels:
            raise _bad("num_classes", f"is {classes} but the labels file has {labels} lines")
    else:
        for key in ("boxes", "scores", "classes", "count"):
            _pick(outputs, getattr(det, key), key)
        if len(outputs) < 4 and not (det.boxes and det.scores and det.classes and det.count):
            raise _bad("layout", f"'decoded' needs boxes, classes, scores and count outputs; the model has "
                                 f"{len(outputs)}")


def ssd_outputs(det: Detection, outputs: Sequence[TensorSpec]) -> tuple[TensorSpec, TensorSpec]:
    """(boxes, scores) of an SSD head: named, else the output with the longer last dim is the boxes.

    Raises:
        ManifestError: an unknown name, or not exactly two outputs to choose from.
    """
    boxes, scores = _pick(outputs, det.boxes, "boxes"), _pick(outputs, det.scores, "scores")
    if boxes and scores:
        return boxes, scores
    rest = [s for s in outputs if s is not boxes and s is not scores]
    if boxes is None and scores is None:
        if len(rest) != 2:
            raise _bad("boxes", f"and scores must be named: the model has {len(outputs)} outputs")
        a, b = rest
        long_a, long_b = _last_dim(a) or 0, _last_dim(b) or 0
        return (a, b) if long_a >= long_b else (b, a)
    if len(rest) != 1:
        raise _bad("scores" if scores is None else "boxes", "must be named: more than two outputs")
    return (boxes, rest[0]) if boxes else (rest[0], scores)  # type: ignore[return-value]


def _check_ssd(det: Detection, outputs: Sequence[TensorSpec], input_hw: tuple[int, int] | None) -> None:
    boxes, scores = ssd_outputs(det, outputs)
    hw = tuple(det.anchors.input_size) or input_hw
    if len(boxes.shape) != 3 or len(scores.shape) not in (2, 3):
        raise _bad("boxes", f"{boxes.name!r} must be [1, anchors, 4 + 2 x keypoints] and scores [1, anchors(, "
                            f"classes)]; got {_dims(boxes.shape)} and {_dims(scores.shape)}")
    count = boxes.shape[1]
    if hw is not None and count is not None:
        want = ssd_anchor_count(det.anchors, (int(hw[0]), int(hw[1])))
        if want != count:
            raise _bad("anchors", f"generate {want} anchors for a {hw[0]}x{hw[1]} input, "
                                  f"but output {boxes.name!r} has {count}")
    if scores.shape[1] is not None and count is not None and scores.shape[1] != count:
        raise _bad("scores", f"{scores.name!r} has {scores.shape[1]} rows, boxes have {count}")
    values = boxes.shape[2]
    if values is not None and values < 4 + 2 * det.keypoints:
        raise _bad("keypoints", f"{det.keypoints} need {4 + 2 * det.keypoints} values per box, "
                                f"{boxes.name!r} has {values}")
    classes = scores.shape[2] if len(scores.shape) == 3 else 1
    if det.num_classes and classes is not None and classes != det.num_classes:
        raise _bad("num_classes", f"is {det.num_classes} but {scores.name!r} scores {classes} classes")


def yolo_classes(det: Detection, shape: tuple[int | None, ...]) -> int:
    """The class count of a YOLO head of ``shape`` (0 when a dynamic dim hides it).

    The values axis is the one equal to 4 (+1 with objectness) + ``num_classes``;
    without ``num_classes``, the shorter of the two.

    Raises:
        ManifestError: not 3-D, or no axis can hold the declared classes.
    """
    if len(shape) != 3:
        raise _bad("boxes", f"a yolo head must be [1, 4+C, N] or [1, N, 4+C], got {_dims(shape)}")
    extra = 4 + int(det.objectness)
    a, b = shape[1], shape[2]
    if det.num_classes:
        if extra + det.num_classes in (a, b):
            return det.num_classes
        raise _bad("num_classes", f"is {det.num_classes}, so a box has {extra + det.num_classes} values, "
                                  f"but the head is {_dims(shape)}")
    if a is None or b is None:
        return 0
    classes = min(a, b) - extra
    if classes < 1:
        raise _bad("layout", f"a yolo head of {_dims(shape)} has no room for class scores")
    return classes


def check_segmentation(seg: Segmentation, outputs: Sequence[TensorSpec]) -> None:
    """Refuse a segmentation head that does not fit the outputs.

    Raises:
        ManifestError: an unknown mode/layout/output, a threshold out of range, or a map of the wrong rank.
    """
    where = "postprocess.segmentation"
    if seg.mode not in SEGMENTATION_MODES:
        raise ManifestError(f"{where}.mode must be one of " + ", ".join(map(repr, SEGMENTATION_MODES)))
    if seg.layout not in SEGMENTATION_LAYOUTS:
        raise ManifestError(f"{where}.layout must be one of 'NCHW', 'NHWC', 'HW'")
    if seg.activation not in ("none", "sigmoid"):
        raise ManifestError(f"{where}.activation must be 'none' or 'sigmoid'")
    if not 0.0 <= seg.threshold <= 1.0 and seg.activation == "sigmoid":
        raise ManifestError(f"{where}.threshold must be between 0 and 1 after a sigmoid, got {seg.threshold:g}")
    if not math.isfinite(seg.threshold):
        raise ManifestError(f"{where}.threshold must be a finite number")
    if not outputs:
        return
    spec = next((s for s in outputs if s.name == seg.output), None) if seg.output else outputs[0]
    if spec is None:
        raise ManifestError(f"{where}.output {seg.output!r} is not an output of the model")
    if len(spec.shape) not in (3, 4):
        raise ManifestError(f"{where}: output {spec.name!r} must be [1, H, W] or 4-D, got {_dims(spec.shape)}")
    if seg.mode == "threshold" and len(spec.shape) == 4:
        channels = segmentation_channels(seg, spec.shape)
        if channels not in (None, 1):
            raise ManifestError(f"{where}: mode 'threshold' needs a one-channel map; {spec.name!r} has {channels}")


def segmentation_channels(seg: Segmentation, shape: tuple[int | None, ...]) -> int | None:
    """The channel count of a 4-D segmentation output (NCHW or NHWC, declared or guessed)."""
    layout = seg.layout or _guess_layout(shape)
    return shape[1] if layout == "NCHW" else shape[3]


def segmentation_layout(seg: Segmentation, shape: tuple[int | None, ...]) -> str:
    """``HW`` for a 3-D map, else the declared or guessed 4-D layout."""
    if len(shape) == 3:
        return "HW"
    return seg.layout if seg.layout in ("NCHW", "NHWC") else _guess_layout(shape)


def _guess_layout(shape: tuple[int | None, ...]) -> str:
    c_first, c_last = shape[1], shape[3]
    if c_first is None:
        return "NHWC"
    if c_last is None:
        return "NCHW"
    return "NCHW" if c_first <= c_last else "NHWC"

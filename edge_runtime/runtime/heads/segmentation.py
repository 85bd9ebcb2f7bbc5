"""Segmentation heads -> a class mask of the original image, its class areas, and PNG bytes on request."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_runtime.bundle.postprocess_spec import Segmentation, check_segmentation, segmentation_layout
from edge_runtime.errors import InferenceError
from edge_runtime.runtime.backends.base import TensorInfo
from edge_runtime.runtime.preprocess import Placement

__all__ = ["SegmentationHead", "encode_mask_png"]

_MAX_CLASS = 65535  # class indices fit a 16-bit PNG


def encode_mask_png(mask: NDArray[Any]) -> bytes:
    """PNG bytes of a 2-D mask (uint8 as is; larger class indices as 16-bit).

    Raises:
        InferenceError: OpenCV could not encode it.
    """
    import cv2

    data = mask.astype(np.uint8 if mask.max(initial=0) < 256 else np.uint16, copy=False)
    ok, png = cv2.imencode(".png", data)
    if not ok:
        raise InferenceError("could not encode the mask as PNG")
    return bytes(png.tobytes())


class SegmentationHead:
    """Turns one model's segmentation output into masks. Thread-safe (no state after construction).

    Raises (from the constructor):
        ManifestError: the head does not fit the model's outputs.
    """

    def __init__(self, spec: Segmentation, outputs: Sequence[TensorInfo], input_hw: tuple[int, int],
                 labels: Sequence[str] = ()) -> None:
        check_segmentation(spec, outputs)
        self.spec = spec
        self.output = spec.output or outputs[0].name
        self.input_hw = input_hw
        self.labels = list(labels)

    def masks(self, outputs: Mapping[str, NDArray[Any]], placements: Sequence[Placement | None]
              ) -> list[NDArray[Any]]:
        """One class-index mask (uint8/int64, HxW of the source image) per batch item.

        ``threshold`` mode gives 0 (background) and 1 (foreground).

        Raises:
            InferenceError: the output is missing or not a 3-D/4-D map.
        """
        value = outputs.get(self.output)
        if value is None or value.ndim not in (3, 4):
            raise InferenceError(f"segmentation output {self.output!r} is missing or not a [1, H, W](, C) map")
        layout = segmentation_layout(self.spec, tuple(value.shape))
        return [self._mask(value[i], layout, placements[i] if i < len(placements) else None)
                for i in range(value.shape[0])]

    def __call__(self, outputs: Mapping[str, NDArray[Any]], placements: Sequence[Placement | None],
                 with_png: bool = False) -> list[dict[str, Any]]:
        """One ``{"segmentation": {...}}`` per batch item: size, class areas and, with ``with_png``, the mask.

        The PNG (base64, key ``mask_png``) holds class indices; in ``threshold``
        mode foreground is 255 so the picture can be looked at.
        """
        results = []
        for mask in self.masks(outputs, placements):
            counts = np.bincount(mask.reshape(-1).astype(np.int64))
            total = int(mask.size)
            classes = []
            for cls in np.flatnonzero(counts)[np.argsort(-counts[np.flatnonzero(counts)], kind="stable")]:
                entry: dict[str, Any] = {"class": int(cls), "pixels": int(counts[cls]),
                                         "fraction": round(float(counts[cls]) / total, 6)}
                if cls < len(self.labels):
                    entry["label"] = self.labels[cls]
                classes.append(entry)
            body: dict[str, Any] = {"size": [int(mask.shape[1]), int(mask.shape[0])], "classes": classes}
            if with_png:
                picture = mask * 255 if self.spec.mode == "threshold" else mask
                body["mask_png"] = base64.b64encode(encode_mask_png(picture)).decode("ascii")
            results.append({"segmentation": body})
        return results

    def _mask(self, item: NDArray[Any], layout: str, placement: Placement | None) -> NDArray[Any]:
        spec = self.spec
        if layout == "HW":
            plane = item
        elif layout == "NCHW":
            plane = item if spec.mode == "argmax" else item[0]
        else:
            plane = np.moveaxis(item, -1, 0) if spec.mode == "argmax" else item[..., 0]
        if spec.mode == "argmax" and plane.ndim == 3:
            mask = np.argmax(plane, axis=0).astype(np.int64)
        elif spec.mode == "argmax":  # an already-arg-maxed class map: a broken one must not size bincount
            mask = np.rint(np.clip(np.nan_to_num(plane.astype(np.float64)), 0, _MAX_CLASS)).astype(np.int64)
        else:
            values = plane.astype(np.float32, copy=False)
            if spec.activation == "sigmoid":
                values = 0.5 * (1.0 + np.tanh(0.5 * values))
            mask = (values >= spec.threshold).astype(np.uint8)
        mask = np.clip(mask, 0, None)
        return self._to_source(mask, placement)

    def _to_source(self, mask: NDArray[Any], placement: Placement | None) -> NDArray[Any]:
        """Crop the letterbox padding off (in output cells) and resize to the source, nearest neighbour."""
        import cv2

        out_h, out_w = mask.shape
        in_h, in_w = self.input_hw
        if placement is None:
            target = (in_w, in_h)
            x0, y0, x1, y1 = 0.0, 0.0, float(out_w), float(out_h)
        else:
            target = placement.source
            fx, fy = out_w / in_w, out_h / in_h  # output cells per input pixel (an output stride)
            x0, y0 = placement.pad_x * fx, placement.pad_y * fy
            x1 = x0 + placement.source[0] * placement.scale_x * fx
            y1 = y0 + placement.source[1] * placement.scale_y * fy
        top, left = max(0, round(y0)), max(0, round(x0))
        crop = mask[top:max(top + 1, round(y1)), left:max(left + 1, round(x1))]
        if crop.shape[1] == target[0] and crop.shape[0] == target[1]:
            return crop
        dtype = np.uint8 if crop.max(initial=0) < 256 else np.uint16  # OpenCV resizes no int64
        return cv2.resize(crop.astype(dtype), target, interpolation=cv2.INTER_NEAREST)

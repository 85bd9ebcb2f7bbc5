"""The cheap features drift monitoring watches, taken from one prediction.

The same extractor runs at ``bundle pack --reference`` (to build the
reference) and on the device for every monitored inference, so both sides
measure exactly the same thing. Inputs are read from the model's own input
tensor (after preprocessing), on a strided grid of at most about 24 x 24 points
per channel, so the cost does not grow with the image:

- ``input.mean.c<i>``: per-channel mean;
- ``image.brightness``: the mean over every channel;
- ``image.contrast``: the standard deviation over every channel;
- ``image.blur``: mean absolute horizontal gradient over the contrast (falls when
  the image blurs, rises with noise; unchanged by darkening alone);
- tensors that are not images get ``input.mean`` and ``input.std`` only.

Outputs, by the bundle's postprocess type:

- classification: ``output.class`` (top-1, categorical), ``output.top_score``,
  ``output.entropy`` (normalised to [0, 1]);
- detection: ``output.detections`` (boxes per frame), ``output.detection_score``
  (the best box's score, 0 with none);
- segmentation: ``output.foreground`` (share of pixels not of class 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_runtime.bundle.manifest import Postprocess

__all__ = ["CATEGORICAL", "FeatureExtractor"]

CATEGORICAL = frozenset({"output.class"})
"""Features whose values are class indices, not magnitudes."""
_GRID = 24


class FeatureExtractor:
    """Feature values of one model's predictions, in the fixed order of :attr:`names`. Stateless."""

    def __init__(self, input_shape: tuple[int | None, ...], layout: str, postprocess: Postprocess,
                 image_hw: tuple[int, int] | None) -> None:
        """``layout`` is the image input's "NCHW"/"NHWC"; ``image_hw`` the preprocessed image's (height, width),
        None when the input is not an image."""
        image = image_hw is not None
        self.postprocess = postprocess
        self._image = image and len(input_shape) == 4 and layout in ("NCHW", "NHWC")
        names: list[str] = []
        self._slice: tuple[Any, ...] = ()
        if self._image:
            self._chw = layout == "NCHW"
            c_dim, h_dim, w_dim = (1, 2, 3) if self._chw else (3, 1, 2)
            self._channels = input_shape[c_dim] or 1
            assert image_hw is not None
            h, w = image_hw
            steps = [slice(0, 1), slice(None), slice(None), slice(None)]
            steps[h_dim] = slice(None, None, max(1, h // _GRID))
            steps[w_dim] = slice(None, None, max(1, w // _GRID))
            self._slice = tuple(steps)
            lead: list[slice] = [slice(None)] * 4
            trail: list[slice] = [slice(None)] * 4
            lead[w_dim], trail[w_dim] = slice(1, None), slice(None, -1)
            self._lead, self._trail = tuple(lead), tuple(trail)
            names += [f"input.mean.c{i}" for i in range(self._channels)]
            names += ["image.brightness", "image.contrast", "image.blur"]
        else:
            names += ["input.mean", "input.std"]
        kind = postprocess.type
        if kind == "classification":
            names += ["output.class", "output.top_score", "output.entropy"]
        elif kind == "detection":
            names += ["output.detections", "output.detection_score"]
        elif kind == "segmentation":
            names += ["output.foreground"]
        self.names: tuple[str, ...] = tuple(names)

    def __call__(self, tensor: NDArray[Any], outputs: Mapping[str, NDArray[Any]],
                 result: Mapping[str, Any]) -> list[float]:
        """Feature values for one item: its input tensor, dequantised outputs and result dict."""
        values = self._inputs(tensor)
        kind = self.postprocess.type
        if kind == "classification":
            top = result["top"][0]
            values += [float(top["index"]), float(top["score"]), self._entropy(outputs)]
        elif kind == "detection":
            dets = result["detections"]
            values += [float(len(dets)), max((float(d["score"]) for d in dets), default=0.0)]
        elif kind == "segmentation":
            classes = result["segmentation"]["classes"]
            values.append(1.0 - sum(float(c["fraction"]) for c in classes if c["class"] == 0))
        return values

    def as_dict(self, tensor: NDArray[Any], outputs: Mapping[str, NDArray[Any]],
                result: Mapping[str, Any]) -> dict[str, float]:
        """The same values keyed by feature name (building a reference)."""
        return dict(zip(self.names, self(tensor, outputs, result), strict=True))

    def _inputs(self, tensor: NDArray[Any]) -> list[float]:
        # Sums and one dot product rather than mean/std/diff calls: each numpy call costs microseconds
        # on a small array, and this runs for every inference.
        if not self._image:
            flat = tensor.reshape(-1)
            sub = flat[:: max(1, flat.size // 1024)].astype(np.float64)
            mean = float(sub.sum()) / max(sub.size, 1)
            return [mean, math.sqrt(max(float(np.dot(sub, sub)) / max(sub.size, 1) - mean * mean, 0.0))]
        x = np.ascontiguousarray(tensor[self._slice], dtype=np.float32)
        c = self._channels
        sums = (x.reshape(c, -1).sum(axis=1) if self._chw else x.reshape(-1, c).sum(axis=0)).tolist()
        flat = x.reshape(-1)
        n = flat.size
        mean = sum(sums) / n
        contrast = math.sqrt(max(float(np.dot(flat, flat)) / n - mean * mean, 0.0))
        steps = x[self._lead] - x[self._trail]
        gradient = float(np.abs(steps).sum()) / max(steps.size, 1)
        return [v * c / n for v in sums] + [mean, contrast, gradient / (contrast + 1e-6)]

    def _entropy(self, outputs: Mapping[str, NDArray[Any]]) -> float:
        raw = outputs.get(self.postprocess.output) if self.postprocess.output else next(iter(outputs.values()))
        if raw is None:
            return 0.0
        row = raw.reshape(raw.shape[0] if raw.ndim else 1, -1)[0].astype(np.float64)
        k = row.size
        if k < 2:
            return 0.0
        if k <= 32 and self.postprocess.activation == "none":  # plain Python beats numpy's call overhead here
            values = row.tolist()
            total = sum(values)
            if min(values) >= 0 and total > 0:
                return float(-sum(v / total * math.log(v / total) for v in values if v > 0) / math.log(k))
        total = float(row.sum())
        if self.postprocess.activation == "none" and float(row.min()) >= 0 and total > 0:
            p = row / total  # already probabilities (or scores): normalise
        elif self.postprocess.activation == "sigmoid":
            s = 0.5 * (1.0 + np.tanh(0.5 * row))
            p = s / max(float(s.sum()), 1e-12)
        else:
            e = np.exp(row - row.max())
            p = e / e.sum()
        nz = p[p > 0]
        return float(-(nz * np.log(nz)).sum() / math.log(k))

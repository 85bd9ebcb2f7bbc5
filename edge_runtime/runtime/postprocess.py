"""Model outputs -> JSON-ready results, as the manifest declares.

``raw`` returns every output (dequantised) as nested lists with shape and
dtype; ``classification`` takes one output, applies the activation and
returns the top-k classes per batch item, named from the labels file;
``detection`` and ``segmentation`` hand over to :mod:`edge_runtime.runtime.heads`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_runtime.bundle.manifest import Postprocess
from edge_runtime.errors import InferenceError, ManifestError
from edge_runtime.runtime.backends.base import TensorInfo
from edge_runtime.runtime.heads.detection import DetectionHead
from edge_runtime.runtime.heads.segmentation import SegmentationHead
from edge_runtime.runtime.preprocess import Placement

__all__ = ["Postprocessor", "parse_labels"]

_MAX_LABELS = 100_000


def parse_labels(data: bytes) -> list[str]:
    """One label per line (UTF-8, trailing blank lines ignored).

    Raises:
        ManifestError: not UTF-8 or more than 100,000 labels.
    """
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ManifestError("labels file is not UTF-8") from e
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) > _MAX_LABELS:
        raise ManifestError(f"labels file has more than {_MAX_LABELS} lines")
    return [line.strip() for line in lines]


class Postprocessor:
    """Builds results from dequantised outputs. Thread-safe (no state)."""

    def __init__(self, spec: Postprocess, outputs: Sequence[TensorInfo], labels: Sequence[str] = (),
                 input_hw: tuple[int, int] | None = None) -> None:
        """``input_hw`` is the model input's (height, width) that boxes and masks are measured in.

        Raises:
            ManifestError: no outputs, an unknown output, or a head that does not fit the outputs
                (or no input size for a detection/segmentation head).
        """
        output_names = [t.name for t in outputs]
        if not output_names:
            raise ManifestError("the model has no outputs")
        if spec.output and spec.output not in output_names:
            raise ManifestError(f"postprocess.output {spec.output!r} is not a model output")
        self.spec = spec
        self.output = spec.output or output_names[0]
        self.labels = list(labels)
        self.detection: DetectionHead | None = None
        self.segmentation: SegmentationHead | None = None
        if spec.type in ("detection", "segmentation") and input_hw is None:
            raise ManifestError(f"postprocess.type {spec.type!r} needs a fixed input size: set preprocess.size")
        if spec.detection is not None and input_hw is not None:
            self.detection = DetectionHead(spec.detection, outputs, input_hw, labels)
        if spec.segmentation is not None and input_hw is not None:
            self.segmentation = SegmentationHead(spec.segmentation, outputs, input_hw, labels)

    def __call__(self, outputs: Mapping[str, NDArray[Any]], placements: Sequence[Placement | None] = (),
                 *, with_mask: bool = False) -> list[dict[str, Any]]:
        """One result dict per batch item.

        ``placements`` map each item back to its source image (detection and
        segmentation; missing = model-input pixels); ``with_mask`` adds a
        segmentation's PNG mask.

        Raises:
            InferenceError: the selected output is missing or has no batch dim.
        """
        if self.detection is not None:
            return self.detection(outputs, placements)
        if self.segmentation is not None:
            return self.segmentation(outputs, placements, with_png=with_mask)
        if self.spec.type == "classification":
            return self._classify(outputs)
        return _raw(outputs)

    def _classify(self, outputs: Mapping[str, NDArray[Any]]) -> list[dict[str, Any]]:
        scores = outputs.get(self.output)
        if scores is None or scores.ndim == 0:
            raise InferenceError(f"output {self.output!r} is missing or scalar")
        flat: NDArray[Any] = scores.reshape(scores.shape[0], -1).astype(np.float32, copy=False)
        if self.spec.activation == "softmax":
            shifted = np.exp(flat - flat.max(axis=1, keepdims=True))
            flat = shifted / shifted.sum(axis=1, keepdims=True)
        elif self.spec.activation == "sigmoid":
            # tanh form: no overflow warning for large negative logits.
            flat = 0.5 * (1.0 + np.tanh(0.5 * flat))
        k = min(self.spec.top_k, flat.shape[1])
        results = []
        for row in flat:
            # argpartition then sort only the k winners: O(n + k log k).
            top = np.argpartition(-row, k - 1)[:k]
            top = top[np.argsort(-row[top], kind="stable")]
            results.append({"top": [self._entry(int(i), float(row[i])) for i in top]})
        return results

    def _entry(self, index: int, score: float) -> dict[str, Any]:
        entry: dict[str, Any] = {"index": index, "score": round(score, 6)}
        if index < len(self.labels):
            entry["label"] = self.labels[index]
        return entry


def _raw(outputs: Mapping[str, NDArray[Any]]) -> list[dict[str, Any]]:
    batch = min((a.shape[0] for a in outputs.values() if a.ndim), default=1)
    return [
        {
            "outputs": {
                name: {"shape": list(a.shape[1:]), "dtype": str(a.dtype), "data": a[i].tolist()}
                if a.ndim
                else {"shape": [], "dtype": str(a.dtype), "data": a.tolist()}
                for name, a in outputs.items()
            }
        }
        for i in range(batch)
    ]

"""The backend interface: one runtime, one loaded model, raw tensors in and out.

A backend never pre/post-processes: ``infer`` takes and returns exactly the
tensors the runtime sees, so its output can be compared bit for bit with the
bare runtime. Quantisation to/from the model's int8/uint8 tensors is done by
:func:`quantize` / :func:`dequantize` with the scale and zero point the
backend reports in :class:`TensorInfo`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Backend", "BackendOptions", "TensorInfo", "dequantize", "quantize"]


@dataclass(frozen=True)
class TensorInfo:
    """A model input/output as the runtime reports it.

    ``shape`` has None for dynamic dimensions. ``dtype`` is a numpy dtype name.
    ``quantization`` is (scale, zero_point) for per-tensor quantised tensors.
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    quantization: tuple[float, int] | None = None


@dataclass(frozen=True)
class BackendOptions:
    """How to load a model.

    ``providers``: ONNX execution providers in order of preference; missing
    ones are skipped with a logged reason. ``threads``: intra-op threads (0 =
    runtime default). ``cache_dir``: where compiled engines live (TensorRT),
    keyed by ``model_sha256`` so an engine is built once per model.
    """

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 0
    cache_dir: Path | None = None
    model_sha256: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)


class Backend(ABC):
    """A model loaded in one runtime. Subclasses live one per file in this package.

    Thread safety: ``infer`` may be called from several threads; a backend
    whose runtime is not thread-safe serialises calls itself.
    """

    format: str = ""
    inputs: tuple[TensorInfo, ...] = ()
    outputs: tuple[TensorInfo, ...] = ()
    #: Human-readable runtime, version and device, e.g. "onnxruntime 1.32 CPU".
    description: str = ""

    @abstractmethod
    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on raw input tensors keyed by input name.

        Returns every output keyed by name, as the runtime produced it.

        Raises:
            InputError: a feed is missing, or its dtype/shape does not fit.
            InferenceError: the runtime failed.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, default no-op
        """Release the runtime's resources. Safe to call twice."""


def quantize(x: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Float -> the tensor's integer dtype with its scale/zero point (round, clip)."""
    if info.quantization is None or np.dtype(info.dtype).kind not in "iu":
        return x.astype(info.dtype, copy=False)
    scale, zero = info.quantization
    limits = np.iinfo(np.dtype(info.dtype))
    q = np.rint(np.asarray(x, dtype=np.float32) / np.float32(scale)) + zero
    out: np.ndarray = np.clip(q, limits.min, limits.max).astype(info.dtype)
    return out


def dequantize(q: np.ndarray, info: TensorInfo) -> np.ndarray:
    """The tensor's integers -> float32 with its scale/zero point; floats pass."""
    if info.quantization is None or q.dtype.kind not in "iu":
        return q
    scale, zero = info.quantization
    out: np.ndarray = (q.astype(np.float32) - np.float32(zero)) * np.float32(scale)
    return out

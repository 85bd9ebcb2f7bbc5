"""Inference backends: one module per model format, imported only when used.

``create_backend("tflite", path, options)`` imports ``tflite_backend`` and
nothing else, so a TFLite-only device never pays for importing onnxruntime
(about 45 MB RSS) and a device without onnxruntime can still run TFLite.

This module also holds :class:`FeedValidator`, the input check every backend
runs before handing tensors to its runtime.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from ..errors import BackendUnavailableError, InputError, ModelLoadError
from .base import Backend, BackendOptions, TensorInfo, dequantize, quantize

__all__ = [
    "FORMATS",
    "Backend",
    "BackendOptions",
    "FeedValidator",
    "TensorInfo",
    "create_backend",
    "dequantize",
    "quantize",
]


@dataclass(frozen=True)
class _Entry:
    module: str
    cls: str
    install: str


_REGISTRY: dict[str, _Entry] = {
    "onnx": _Entry(
        "edge_runtime.backends.onnx_backend",
        "OnnxBackend",
        "pip install onnxruntime (onnxruntime-gpu on CUDA/Jetson devices)",
    ),
    "tflite": _Entry(
        "edge_runtime.backends.tflite_backend",
        "TFLiteBackend",
        "pip install ai-edge-litert, or tflite-runtime with numpy<2",
    ),
}

#: Model formats a backend exists for (the manifest's ``format`` values).
FORMATS: tuple[str, ...] = tuple(sorted(_REGISTRY))


def create_backend(fmt: str, model_path: Path, options: BackendOptions) -> Backend:
    """Load ``model_path`` in the runtime for ``fmt`` ("onnx" or "tflite").

    Raises:
        ModelLoadError: ``fmt`` is unknown, or the runtime refused the model.
        BackendUnavailableError: the runtime for ``fmt`` is not installed.
    """
    entry = _REGISTRY.get(fmt)
    if entry is None:
        raise ModelLoadError(f"unknown model format {fmt!r} (known: {', '.join(FORMATS)})")
    try:
        module = importlib.import_module(entry.module)
    except ImportError as e:
        raise BackendUnavailableError(
            f"runtime for {fmt!r} models is not installed ({e}): {entry.install}"
        ) from e
    factory: Callable[[Path, BackendOptions], Backend] = getattr(module, entry.cls)
    return factory(model_path, options)


class FeedValidator:
    """Checks a feed dict against a model's inputs before the runtime sees it.

    Built once at load time so a call costs a few dict lookups and tuple
    compares (the hot path must add microseconds, not more). Checks: every
    input present and no unknown name, dtype exactly the input's dtype (the
    caller casts or quantises), rank and every static dimension.
    """

    __slots__ = ("_expected", "_names", "_specs")

    def __init__(self, inputs: Sequence[TensorInfo]) -> None:
        # (name, dtype, fully static shape or None, rank, ((axis, dim), ...))
        self._specs = tuple(
            (
                t.name,
                np.dtype(t.dtype),
                tuple(t.shape) if None not in t.shape else None,
                len(t.shape),
                tuple((axis, d) for axis, d in enumerate(t.shape) if d is not None),
            )
            for t in inputs
        )
        self._names = frozenset(t.name for t in inputs)
        self._expected = {t.name: t.shape for t in inputs}

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Raise InputError naming the first feed that does not fit; else return."""
        for name, dtype, static, rank, dims in self._specs:
            try:
                arr = feeds[name]
            except KeyError:
                raise InputError(
                    f"missing input {name!r} (model inputs: {', '.join(sorted(self._names))})"
                ) from None
            if not isinstance(arr, np.ndarray):
                raise InputError(f"input {name!r}: expected a numpy array, got {type(arr).__name__}")
            if arr.dtype != dtype:
                raise InputError(
                    f"input {name!r}: dtype {arr.dtype}, expected {dtype} "
                    "(cast or quantize() before infer)"
                )
            shape = arr.shape
            if static is not None:
                if shape != static:
                    self._shape_error(name, shape)
            elif len(shape) != rank:
                self._shape_error(name, shape)
            else:
                for axis, dim in dims:
                    if shape[axis] != dim:
                        self._shape_error(name, shape)
        if len(feeds) != len(self._specs):
            unknown = sorted(set(feeds) - self._names)
            raise InputError(
                f"unknown input {', '.join(map(repr, unknown))} "
                f"(model inputs: {', '.join(sorted(self._names))})"
            )

    def _shape_error(self, name: str, shape: tuple[int, ...]) -> NoReturn:
        expected = tuple("?" if d is None else d for d in self._expected[name])
        raise InputError(f"input {name!r}: shape {tuple(shape)}, expected {expected} (? = any size)")


def _check_model_file(path: Path) -> None:
    """Raise ModelLoadError for a missing, unreadable or empty model file.

    Runtimes report these cases obscurely ("mmap of size 0", "No graph was
    found in the protobuf"), so backends check first for a clear message.
    """
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ModelLoadError(f"{path.name}: cannot read model file: {e.strerror or e}") from e
    if size == 0:
        raise ModelLoadError(f"{path.name}: model file is empty")

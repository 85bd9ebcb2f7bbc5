"""Inference backends: one module per model format, imported only when used.

``create_backend("tflite", path, options)`` imports ``tflite_backend`` and
nothing else, so a TFLite-only device never pays for importing onnxruntime
(about 45 MB RSS) and a device without onnxruntime can still run TFLite.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import BackendUnavailableError, ModelLoadError
from edge_runtime.runtime.backends.base import Backend, BackendOptions, TensorInfo, dequantize, quantize

__all__ = [
    "FORMATS",
    "Backend",
    "BackendOptions",
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
        "edge_runtime.runtime.backends.onnx_backend",
        "OnnxBackend",
        "pip install onnxruntime (onnxruntime-gpu on CUDA/Jetson devices)",
    ),
    "tflite": _Entry(
        "edge_runtime.runtime.backends.tflite_backend",
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

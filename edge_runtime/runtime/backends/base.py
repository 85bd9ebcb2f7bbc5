"""The backend interface: one runtime, one loaded model, raw tensors in and out.

A backend never pre/post-processes: ``infer`` takes and returns exactly the
tensors the runtime sees, so its output can be compared bit for bit with the
bare runtime. :meth:`Backend.infer` is a template: it checks the feeds against
the model's inputs (raising InputError) and then calls the backend's private
``_run`` hook, so every runtime gets the same check and the same errors.

Quantisation to/from the model's int8/uint8 tensors is done by :func:`quantize` / :func:`dequantize`
with the scale and zero point the backend reports in :class:`TensorInfo`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, final

import numpy as np
from numpy.typing import NDArray

from edge_runtime.errors import InputError, ModelLoadError

__all__ = ["Backend", "BackendOptions", "TensorInfo", "dequantize", "fit_tensor", "quantize"]


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
    runtime default). ``spin_wait``: let idle pool threads busy-wait between
    runs (faster with several threads, costs CPU the device's own application
    may need). ``cache_dir``: where compiled engines live (TensorRT), keyed by
    ``model_sha256`` so an engine is built once per model.
    """

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 0
    spin_wait: bool = False
    cache_dir: Path | None = None
    model_sha256: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)


# One input as the feed check sees it: (name, dtype, fully static shape or None, rank, ((axis, dim), ...)).
_FeedSpec = tuple[str, np.dtype[Any], tuple[int | None, ...] | None, int, tuple[tuple[int, int], ...]]


class Backend(ABC):
    """A model loaded in one runtime. Subclasses live one per file in this package.

    A subclass sets ``inputs``, ``outputs`` and ``description`` when it loads
    the model and implements :meth:`_run`. Setting ``inputs`` also builds the
    feed check once, so a call costs a few dict lookups and tuple compares.

    Thread safety: ``infer`` may be called from several threads; a backend
    whose runtime is not thread-safe serialises calls itself.
    """

    format: str = ""
    outputs: tuple[TensorInfo, ...] = ()
    #: Human-readable runtime, version and device, e.g. "onnxruntime 1.32 CPU".
    description: str = ""
    _inputs: tuple[TensorInfo, ...] = ()
    _feed_specs: tuple[_FeedSpec, ...] = ()
    _input_names: frozenset[str] = frozenset()

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        """The model's inputs as the runtime reports them."""
        return self._inputs

    @inputs.setter
    def inputs(self, inputs: tuple[TensorInfo, ...]) -> None:
        self._inputs = inputs
        self._feed_specs = tuple(
            (
                t.name,
                np.dtype(t.dtype),
                tuple(t.shape) if None not in t.shape else None,
                len(t.shape),
                tuple((axis, d) for axis, d in enumerate(t.shape) if d is not None),
            )
            for t in inputs
        )
        self._input_names = frozenset(t.name for t in inputs)

    @final
    def infer(self, feeds: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        """Run the model on raw input tensors keyed by input name.

        Checks the feeds first: every input present and no unknown name, dtype
        exactly the input's dtype (the caller casts or quantises), rank and
        every static dimension. Returns every output keyed by name, as the
        runtime produced it.

        Raises:
            InputError: a feed is missing or unknown, or its dtype/shape does not fit.
            InferenceError: the runtime failed, or the backend is closed.
        """
        for name, dtype, static, rank, dims in self._feed_specs:
            try:
                arr = feeds[name]
            except KeyError:
                raise InputError(
                    f"missing input {name!r} (model inputs: {', '.join(sorted(self._input_names))})"
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
        if len(feeds) != len(self._feed_specs):
            unknown = sorted(set(feeds) - self._input_names)
            raise InputError(
                f"unknown input {', '.join(map(repr, unknown))} "
                f"(model inputs: {', '.join(sorted(self._input_names))})"
            )
        return self._run(feeds)

    @abstractmethod
    def _run(self, feeds: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        """Run the runtime on feeds that :meth:`infer` checked; every output keyed by name.

        Raises:
            InputError: the runtime refused the feeds (e.g. a dynamic shape it cannot take).
            InferenceError: the runtime failed, or the backend is closed.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, default no-op
        """Release the runtime's resources. Safe to call twice."""

    def _shape_error(self, name: str, shape: tuple[int, ...]) -> NoReturn:
        expected = next(tuple("?" if d is None else d for d in t.shape) for t in self._inputs if t.name == name)
        raise InputError(f"input {name!r}: shape {tuple(shape)}, expected {expected} (? = any size)")

    @staticmethod
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


def quantize(x: NDArray[Any], info: TensorInfo) -> NDArray[Any]:
    """Float -> the tensor's integer dtype with its scale/zero point (round, clip)."""
    if info.quantization is None or np.dtype(info.dtype).kind not in "iu":
        return x.astype(info.dtype, copy=False)
    scale, zero = info.quantization
    limits = np.iinfo(np.dtype(info.dtype))
    q = np.rint(np.asarray(x, dtype=np.float32) / np.float32(scale)) + zero
    out: NDArray[Any] = np.clip(q, limits.min, limits.max).astype(info.dtype)
    return out


def fit_tensor(array: NDArray[Any], info: TensorInfo) -> NDArray[Any]:
    """``array`` fitted to an input: batch dim added, floats quantised, safe casts.

    Raises:
        InputError: an unsafe dtype conversion (e.g. float to int without quantisation).
    """
    unbatched = info.shape[1:]
    if array.ndim == len(unbatched) and all(d is None or d == n for d, n in zip(unbatched, array.shape, strict=True)):
        # Only where it then fits: otherwise the shape error names the shape the caller sent.
        array = array[None]
    if array.dtype == np.dtype(info.dtype):
        return array
    if info.quantization is not None and array.dtype.kind == "f":
        return quantize(array, info)
    if np.can_cast(array.dtype, info.dtype, "same_kind"):
        cast: NDArray[Any] = array.astype(info.dtype)
        return cast
    raise InputError(f"input {info.name!r} needs {info.dtype}, got {array.dtype}")


def dequantize(q: NDArray[Any], info: TensorInfo) -> NDArray[Any]:
    """The tensor's integers -> float32 with its scale/zero point; floats pass."""
    if info.quantization is None or q.dtype.kind not in "iu":
        return q
    scale, zero = info.quantization
    out: NDArray[Any] = (q.astype(np.float32) - np.float32(zero)) * np.float32(scale)
    return out

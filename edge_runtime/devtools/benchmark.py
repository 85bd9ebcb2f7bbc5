"""Library call vs bare runtime: the timing core of ``edge-runtime bench`` and tools/bench_runtime.py.

Both callables are timed alternately, call by call, swapping which goes first
on every round, so drift on a shared machine (frequency scaling, a noisy
neighbour) hits both equally instead of biasing whichever ran second.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_runtime.errors import InputError, ModelLoadError
from edge_runtime.runtime.backends.base import TensorInfo

__all__ = ["BenchResult", "Timing", "alternate", "bare_runner", "compare", "interpreter_call", "random_feeds"]

CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class Timing:
    """Median and 95th percentile of one callable, in microseconds."""

    median_us: float
    p95_us: float

    @classmethod
    def of(cls, samples_us: Sequence[float]) -> Timing:
        """Summarise raw samples (microseconds). Raises ValueError on an empty sequence."""
        return cls(float(statistics.median(samples_us)), float(np.percentile(samples_us, 95)))


@dataclass(frozen=True)
class BenchResult:
    """Bare runtime vs library call over ``runs`` alternating rounds."""

    bare: Timing
    library: Timing
    runs: int

    @property
    def ratio(self) -> float:
        """library median / bare median (1.0 = no overhead)."""
        return self.library.median_us / self.bare.median_us if self.bare.median_us > 0 else float("inf")

    @property
    def delta_us(self) -> float:
        """library median - bare median, in microseconds."""
        return self.library.median_us - self.bare.median_us

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: medians/p95 per call, ratio and delta (microseconds, 3 decimals)."""
        return {
            "runs": self.runs,
            "bare_us": {"median": round(self.bare.median_us, 3), "p95": round(self.bare.p95_us, 3)},
            "library_us": {"median": round(self.library.median_us, 3), "p95": round(self.library.p95_us, 3)},
            "ratio": round(self.ratio, 4),
            "delta_us": round(self.delta_us, 3),
        }


def alternate(a: Callable[[], object], b: Callable[[], object], runs: int,
              warmup: int = 20) -> tuple[list[float], list[float]]:
    """Time ``a`` and ``b`` alternately ``runs`` times each; samples in microseconds.

    Both are first called ``warmup`` times (lazy allocation, caches, thread
    pools). Exceptions from either callable propagate.
    """
    for _ in range(warmup):
        a()
        b()
    ta: list[float] = []
    tb: list[float] = []
    for i in range(runs):
        first, second, first_t, second_t = (a, b, ta, tb) if i % 2 == 0 else (b, a, tb, ta)
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        t2 = time.perf_counter()
        first_t.append((t1 - t0) * 1e6)
        second_t.append((t2 - t1) * 1e6)
    return ta, tb


def compare(bare: Callable[[], object], library: Callable[[], object], runs: int, warmup: int = 20) -> BenchResult:
    """Alternate ``bare`` and ``library`` and summarise both.

    Raises:
        InputError: ``runs`` is below 1.
    """
    if runs < 1:
        raise InputError(f"runs must be at least 1, got {runs}")
    tb, tl = alternate(bare, library, runs, warmup)
    return BenchResult(Timing.of(tb), Timing.of(tl), runs)


def bare_runner(path: Path, fmt: str, threads: int, feeds: Mapping[str, NDArray[Any]],
                providers: Sequence[str] = (CPU,), spin_wait: bool = False) -> Callable[[], object]:
    """The bare runtime on ``path`` as a user would call it without edge-runtime.

    ONNX: ``InferenceSession.run`` with default session options except the
    intra-op thread count (0 = runtime default), ``providers`` and, to compare
    like with like, the same spin-wait choice as the library (``backend.spin_wait``). TFLite:
    ``set_tensor + invoke + get_tensor`` on the interpreter edge-runtime would
    pick (LiteRT, else tflite-runtime).

    Raises:
        ModelLoadError: unknown format. BackendUnavailableError: runtime missing.
    """
    if fmt == "onnx":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = max(threads, 0)
        so.inter_op_num_threads = 1
        if not spin_wait:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(path), so, providers=list(providers))
        except Exception as e:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"{path.name}: bare onnxruntime refused the model: {e}") from e
        plain = dict(feeds)
        return lambda: session.run(None, plain)
    if fmt == "tflite":
        from edge_runtime.runtime.backends.tflite_backend import load_interpreter_class

        interpreter_class, _ = load_interpreter_class()
        interp = interpreter_class(model_path=str(path), num_threads=threads if threads > 0 else None)
        interp.allocate_tensors()
        return interpreter_call(interp, feeds)
    raise ModelLoadError(f"no bare runtime for format {fmt!r}")


def interpreter_call(interp: Any, feeds: Mapping[str, NDArray[Any]]) -> Callable[[], object]:
    """The bare TFLite call: set_tensor for every input, invoke, get_tensor for every output."""
    ins = [(d["index"], feeds[d["name"]]) for d in interp.get_input_details()]
    outs = [d["index"] for d in interp.get_output_details()]

    def call() -> list[NDArray[Any]]:
        for index, value in ins:
            interp.set_tensor(index, value)
        interp.invoke()
        return [interp.get_tensor(i) for i in outs]

    return call


def random_feeds(inputs: Sequence[TensorInfo], shapes: Mapping[str, Sequence[int | None]] | None = None,
                 seed: int = 0) -> dict[str, NDArray[Any]]:
    """Seeded random tensors for every input.

    ``shapes`` fills dynamic dimensions per input name (None keeps the
    model's dim); a remaining dynamic batch dim (axis 0) becomes 1.

    Raises:
        InputError: a non-batch dimension is still dynamic, or a given shape
            contradicts a static dimension of the model.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, NDArray[Any]] = {}
    for info in inputs:
        hint = tuple((shapes or {}).get(info.name, ()))
        if hint and len(hint) != len(info.shape):
            raise InputError(f"input {info.name!r} is {len(info.shape)}-D, the given shape has {len(hint)} dims")
        dims: list[int] = []
        for axis, dim in enumerate(info.shape):
            want = hint[axis] if hint else None
            if dim is not None and want is not None and want != dim:
                raise InputError(f"input {info.name!r}: axis {axis} is {dim} in the model, {want} was given")
            chosen = dim if dim is not None else want if want is not None else 1 if axis == 0 else None
            if chosen is None:
                shown = ", ".join("?" if d is None else str(d) for d in info.shape)
                raise InputError(f"input {info.name!r} has dynamic dims ({shown}): give --shape, --input or a "
                                 "spec with preprocess.size")
            dims.append(chosen)
        feeds[info.name] = _random(rng, np.dtype(info.dtype), tuple(dims))
    return feeds


def _random(rng: np.random.Generator, dtype: np.dtype[Any], shape: tuple[int, ...]) -> NDArray[Any]:
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    # Small non-negative ints are valid for every integer input (indices, token ids, pixels).
    high = min(int(np.iinfo(dtype).max), 255) + 1
    return rng.integers(0, high, shape).astype(dtype)

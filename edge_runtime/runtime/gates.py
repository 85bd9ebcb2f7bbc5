"""Activation gates run on the device: golden cases and a latency budget.

A candidate model must reproduce the publisher's golden outputs within the
declared tolerances (for detectors and segmenters: the boxes and masks its head
decodes from them, :mod:`edge_runtime.runtime.golden_heads`) and meet ``gates.latency_ms_p95`` before it may serve.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_runtime._util.fsutil import CappedReadError, read_capped
from edge_runtime.bundle.manifest import GoldenCase
from edge_runtime.errors import EdgeRuntimeError, GateError, InputError
from edge_runtime.runtime.golden_heads import compare_heads
from edge_runtime.runtime.loaded_model import LoadedModel
from edge_runtime.runtime.preprocess import decode_image
from edge_runtime.runtime.tensor_limits import is_npy, load_npz, parse_npy

__all__ = ["GateReport", "LatencyStats", "check_gates", "golden_feeds", "measure_latency", "run_golden", "sample_feeds"]

_MAX_GOLDEN_BYTES = 256 << 20


@dataclass(frozen=True)
class LatencyStats:
    """Latency percentiles in milliseconds over ``runs`` timed calls."""

    runs: int
    p50: float
    p95: float
    p99: float
    max: float

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> LatencyStats:
        a = np.asarray(samples_ms, np.float64)
        p50, p95, p99 = np.percentile(a, [50, 95, 99])
        return cls(len(samples_ms), float(p50), float(p95), float(p99), float(np.max(a)))


@dataclass(frozen=True)
class GateReport:
    """What the gates measured; ``failures`` holds one line per failed golden case."""

    golden_total: int
    golden_passed: int
    failures: tuple[str, ...]
    latency: LatencyStats | None


def _load_array_file(path: Path) -> NDArray[Any] | dict[str, NDArray[Any]]:
    try:
        data = read_capped(path, _MAX_GOLDEN_BYTES)
    except CappedReadError as e:
        raise InputError(f"golden file {path.name} is too large") from e
    except OSError as e:
        raise InputError(f"golden file {path.name} is unreadable: {e.strerror or e}") from e
    # Parsed strictly, every size checked before numpy allocates (a signed bundle can still be hostile).
    if is_npy(data):
        return parse_npy(data, _MAX_GOLDEN_BYTES, f"golden file {path.name}")
    return load_npz(data, _MAX_GOLDEN_BYTES, f"golden file {path.name}")


def golden_feeds(model: LoadedModel, case: GoldenCase) -> dict[str, NDArray[Any]]:
    """The model input of one golden case (an .npy/.npz tensor, or an image run through preprocess)."""
    path = model.directory / case.input
    if path.suffix in (".npy", ".npz"):
        loaded = _load_array_file(path)
        if isinstance(loaded, dict):
            return {k: model.to_tensor(v, k) for k, v in loaded.items()}
        return {model.preprocess_input.name: model.to_tensor(loaded)}
    with open(path, "rb") as fh:
        limits = model.limits
        image = decode_image(fh.read(), limits.max_image_bytes, limits.max_image_pixels, limits.max_decode_bytes)
    return {model.preprocess_input.name: model.image_to_tensor(image)}


def _compare(model: LoadedModel, case: GoldenCase, outputs: dict[str, NDArray[Any]]) -> str:
    expected = _load_array_file(model.directory / case.expected)
    if isinstance(expected, np.ndarray):
        expected = {model.backend.outputs[0].name: expected}
    post = model.postprocessor
    if post.detection is not None or post.segmentation is not None:
        missing = sorted(set(outputs) - set(expected))
        if missing:
            return f"{case.input}: expected outputs lack {missing[0]!r}, which the head decodes"
        # Decoded on both sides: boxes by IoU and score, masks by agreement (runtime/golden_heads.py).
        return compare_heads(post, case, model.dequantized(expected), model.dequantized(outputs))
    for name, want in expected.items():
        got = outputs.get(name)
        if got is None:
            return f"{case.input}: model has no output {name!r}"
        if got.shape != want.shape:
            return f"{case.input}: output {name!r} shape {list(got.shape)} != expected {list(want.shape)}"
        got64, want64 = got.astype(np.float64), want.astype(np.float64)
        if not np.allclose(got64, want64, rtol=case.rtol, atol=case.atol):
            diff = float(np.max(np.abs(got64 - want64)))
            return f"{case.input}: output {name!r} differs by up to {diff:.3g} (atol {case.atol:g}, rtol {case.rtol:g})"
    return ""


def run_golden(model: LoadedModel) -> tuple[int, list[str]]:
    """Run every golden case; return (passed, failure lines)."""
    failures: list[str] = []
    for case in model.manifest.golden:
        try:
            problem = _compare(model, case, model.infer(golden_feeds(model, case)))
        except EdgeRuntimeError as e:
            problem = f"{case.input}: {e.one_line()}"
        if problem:
            failures.append(problem)
    return len(model.manifest.golden) - len(failures), failures


def measure_latency(call: Callable[[], object], runs: int = 30, warmup: int = 3) -> LatencyStats:
    """Time ``call`` ``runs`` times after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        samples.append((time.perf_counter() - t0) * 1e3)
    return LatencyStats.from_samples(samples)


def check_gates(model: LoadedModel, runs: int = 30) -> GateReport:
    """Run the golden cases and the latency gate of ``model``'s manifest.

    The latency is measured on the first golden input (zeros when there is
    none) with the runtime already warm, so first-run compilation never counts.

    Raises:
        GateError: golden pass rate below ``gates.golden_pass_rate`` or p95
            latency above ``gates.latency_ms_p95``; the message says which and by how much.
    """
    gates = model.manifest.gates
    passed, failures = run_golden(model)
    total = len(model.manifest.golden)
    if total and passed / total < gates.golden_pass_rate:
        raise GateError(
            f"golden cases: {passed}/{total} passed, {gates.golden_pass_rate:.0%} required; "
            f"first failure: {failures[0]}"
        )
    latency = None
    if gates.latency_ms_p95 > 0:
        feeds = sample_feeds(model)
        latency = measure_latency(lambda: model.infer(feeds), runs=runs)
        if latency.p95 > gates.latency_ms_p95:
            raise GateError(
                f"latency p95 {latency.p95:.2f} ms exceeds the {gates.latency_ms_p95:g} ms budget"
            )
    return GateReport(total, passed, tuple(failures), latency)


def sample_feeds(model: LoadedModel) -> dict[str, NDArray[Any]]:
    """A representative input: the first golden case, else a grey image through the
    preprocessing (so dynamic sizes get the declared size), else zeros."""
    if model.manifest.golden:
        return golden_feeds(model, model.manifest.golden[0])
    feeds = {t.name: np.zeros([1 if d is None else d for d in t.shape], dtype=t.dtype) for t in model.backend.inputs}
    if model.preprocessor is not None:
        grey = np.full((model.preprocessor.height, model.preprocessor.width, 3), 128, np.uint8)
        feeds[model.preprocess_input.name] = model.image_to_tensor(grey)
    return feeds

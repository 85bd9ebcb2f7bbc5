"""Static int8 quantization of ONNX models, calibrated on real inputs.

The pipeline is onnxruntime's own (``onnxruntime.quantization``, which needs
the optional ``onnx`` package: ``pip install 'edge-runtime[quantize]'``):
opset upgrade to 13 when per-channel weights need it, ``quant_pre_process``
(shape inference + graph optimisation; symbolic shape inference is skipped
because it needs sympy), then ``quantize_static`` in QDQ format with MinMax
calibration. Calibration tensors come from real images run through the same
:class:`~edge_runtime.runtime.preprocess.Preprocessor` a bundle declares: ranges
calibrated on random noise wreck accuracy.

After writing the model, :func:`quantize_onnx` loads it in the same backend
the daemon uses and compares it with the fp32 model on real inputs (top-1
agreement of the first output, max absolute difference of every output).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_runtime._util.fsutil import CappedReadError, atomic_write, read_capped
from edge_runtime.config.model import Limits
from edge_runtime.errors import BackendUnavailableError, EdgeRuntimeError, InputError, ModelError, ModelLoadError
from edge_runtime.runtime.backends import create_backend
from edge_runtime.runtime.backends.base import Backend, BackendOptions, TensorInfo
from edge_runtime.runtime.preprocess import Preprocessor, decode_image, is_npy, load_npy

__all__ = [
    "CALIBRATION_SUFFIXES",
    "INSTALL_HINT",
    "QuantizeReport",
    "Sample",
    "find_inputs",
    "load_samples",
    "quantize_onnx",
    "require_quantization_tools",
]

INSTALL_HINT = "pip install 'edge-runtime[quantize]'"
#: Files a calibration directory is scanned for (explicitly named files are sniffed, whatever their suffix).
CALIBRATION_SUFFIXES = (".jpg", ".jpeg", ".png", ".npy")
#: Per-channel QDQ weights need DequantizeLinear's ``axis`` attribute, added in opset 13.
PER_CHANNEL_MIN_OPSET = 13
_CPU = BackendOptions(providers=("CPUExecutionProvider",))


@dataclass(frozen=True)
class Sample:
    """One real input: where it came from, the model-input tensor, and the fp32 model's outputs."""

    path: Path
    tensor: NDArray[Any]
    reference: dict[str, NDArray[Any]]


@dataclass(frozen=True)
class QuantizeReport:
    """What :func:`quantize_onnx` wrote and how the int8 model compares with the fp32 one.

    ``agreed``/``evaluated``: samples whose top-1 class (argmax over the last
    axis of the first output) is the same in both models. ``held_out`` is True
    when the comparison ran on evaluation inputs separate from the calibration ones.
    """

    model: Path
    output: Path
    per_channel: bool
    activation_type: str
    opset: int
    calibrated: int
    evaluated: int
    agreed: int
    held_out: bool
    max_abs_diff: float
    fp32_bytes: int
    int8_bytes: int
    qdq_nodes: int

    @property
    def agreement(self) -> float:
        """Fraction of evaluated samples with the same top-1 (0..1)."""
        return self.agreed / self.evaluated if self.evaluated else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "model": str(self.model), "output": str(self.output), "format": "qdq",
            "per_channel": self.per_channel, "activations": self.activation_type, "opset": self.opset,
            "calibration_images": self.calibrated, "evaluated": self.evaluated, "held_out": self.held_out,
            "top1_agreed": self.agreed, "top1_agreement": round(self.agreement, 4),
            "max_abs_diff": self.max_abs_diff, "fp32_bytes": self.fp32_bytes, "int8_bytes": self.int8_bytes,
            "qdq_nodes": self.qdq_nodes,
        }


def require_quantization_tools() -> tuple[Any, Any]:
    """Import ``onnx`` and ``onnxruntime.quantization`` (an optional extra).

    Raises:
        BackendUnavailableError: either is missing, naming the pip command.
    """
    try:
        import onnx
        import onnxruntime.quantization as ortq
    except ImportError as e:
        raise BackendUnavailableError(f"quantize needs the onnx package ({e}): {INSTALL_HINT}") from e
    return onnx, ortq


def find_inputs(paths: Sequence[Path], max_files: int) -> list[Path]:
    """Expand directories (their :data:`CALIBRATION_SUFFIXES` files, sorted, not recursive);
    named files are kept as given. At most ``max_files`` paths, in order.

    Raises:
        InputError: a path does not exist, or nothing was found.
    """
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in CALIBRATION_SUFFIXES)
        elif path.exists():
            found.append(path)
        else:
            raise InputError(f"{path}: no such file or directory")
    if not found:
        where = ", ".join(str(p) for p in paths)
        raise InputError(f"no calibration images in {where} (looked for {', '.join(CALIBRATION_SUFFIXES)})")
    return found[:max_files]


def load_samples(files: Sequence[Path], backend: Backend, input_name: str, preprocessor: Preprocessor | None,
                 limits: Limits) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """Turn files into model-input tensors and run the fp32 ``backend`` on each.

    Images (JPEG/PNG) go through ``preprocessor``; ``.npy`` files are model-input
    tensors (batch dim optional). Running the model proves each tensor fits
    it before calibration sees it. Returns the samples and, for every file
    that could not be used, its path and the reason.

    Raises:
        InputError: no file could be used (the message gives the first reason).
    """
    info = next(t for t in backend.inputs if t.name == input_name)
    samples: list[Sample] = []
    skipped: list[tuple[Path, str]] = []
    for path in files:
        try:
            tensor = _tensor(_read(path, limits.max_image_bytes), info, preprocessor, limits)
            reference = backend.infer({input_name: tensor})
        except OSError as e:
            skipped.append((path, f"cannot read: {e.strerror or e}"))
        except EdgeRuntimeError as e:
            skipped.append((path, e.one_line()))
        else:
            samples.append(Sample(path, tensor, reference))
    if not samples:
        first = f"{skipped[0][0]}: {skipped[0][1]}" if skipped else "no files"
        raise InputError(f"no calibration image could be read ({len(skipped)} tried; {first})")
    return samples, skipped


def quantize_onnx(model: Path, output: Path, calibration: Sequence[Sample], *, input_name: str,
                  evaluation: Sequence[Sample] = (), per_channel: bool = False,
                  activation_type: str = "uint8") -> QuantizeReport:
    """Quantize ``model`` to int8 QDQ, calibrated on ``calibration``; write ``output`` atomically.

    ``activation_type`` is "uint8" (asymmetric, what onnxruntime recommends for
    x86 and works on ARM) or "int8". Weights are always int8. The result is
    compared with fp32 on ``evaluation``, or on the calibration samples when
    none are given.

    Raises:
        BackendUnavailableError: onnx / onnxruntime.quantization missing.
        ModelLoadError: ``model`` is not a loadable ONNX model, or its opset cannot be upgraded.
        ModelError: onnxruntime's quantizer failed.
        InputError: no calibration samples, or ``output`` is ``model``.
    """
    onnx, ortq = require_quantization_tools()
    if not calibration:
        raise InputError("no calibration samples")
    if output.resolve() == model.resolve():
        raise InputError(f"{output}: the output must not overwrite the input model")
    qtypes = {"uint8": ortq.QuantType.QUInt8, "int8": ortq.QuantType.QInt8}
    if activation_type not in qtypes:
        raise InputError(f"activation type must be uint8 or int8, got {activation_type!r}")
    with tempfile.TemporaryDirectory(prefix="edge-runtime-quantize-") as tmp:
        work = Path(tmp)
        source = _upgraded(onnx, model, work, PER_CHANNEL_MIN_OPSET if per_channel else 0)
        prepared, quantized = work / "prepared.onnx", work / "int8.onnx"
        feeds = [{input_name: s.tensor} for s in calibration]
        try:
            with _stdout_to_stderr():
                ortq.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
                ortq.quantize_static(
                    str(prepared), str(quantized), _Reader(feeds), quant_format=ortq.QuantFormat.QDQ,
                    per_channel=per_channel, activation_type=qtypes[activation_type],
                    weight_type=ortq.QuantType.QInt8, calibrate_method=ortq.CalibrationMethod.MinMax,
                )
        except EdgeRuntimeError:
            raise
        except Exception as e:  # the quantizer raises whatever its dependencies raise
            raise ModelError(f"{model.name}: onnxruntime quantization failed: {_one_line(e)}") from e
        data = quantized.read_bytes()
    atomic_write(output, data, 0o644)
    quant_model = onnx.load_from_string(data)
    qdq = sum(1 for n in quant_model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    held_out = bool(evaluation)
    agreed, diff = _compare(output, evaluation or calibration, input_name)
    return QuantizeReport(
        model=model, output=output, per_channel=per_channel, activation_type=activation_type,
        opset=_default_opset(quant_model),
        calibrated=len(calibration), evaluated=len(evaluation or calibration), agreed=agreed, held_out=held_out,
        max_abs_diff=diff, fp32_bytes=model.stat().st_size, int8_bytes=len(data), qdq_nodes=qdq,
    )


class _Reader:
    """A ``CalibrationDataReader``: onnxruntime checks for ``get_next`` by duck typing
    (its ABC has a ``__subclasshook__``), so this module need not import it at load time."""

    def __init__(self, feeds: list[dict[str, NDArray[Any]]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, NDArray[Any]] | None:
        return next(self._feeds, None)


def _read(path: Path, max_bytes: int) -> bytes:
    try:
        return read_capped(path, max_bytes, follow_symlinks=True)
    except CappedReadError as e:
        raise InputError(f"input exceeds the {e.limit}-byte cap") from None


def _tensor(data: bytes, info: TensorInfo, preprocessor: Preprocessor | None, limits: Limits) -> NDArray[Any]:
    if is_npy(data):
        array = load_npy(data, limits.max_image_bytes)
        if array.ndim == len(info.shape) - 1:
            array = array[None]
        if array.dtype.kind != "f" and np.dtype(info.dtype).kind == "f":
            raise InputError(f"tensor is {array.dtype}, the model input is {info.dtype}")
        return array.astype(info.dtype, copy=False)
    if preprocessor is None:
        raise InputError("an image needs declared preprocessing (--spec or preprocess flags); or give .npy tensors")
    image = decode_image(data, limits.max_image_bytes, limits.max_image_pixels, limits.max_decode_bytes)
    tensor, _ = preprocessor(image)
    return tensor


def _default_opset(model: Any) -> int:
    return max((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _upgraded(onnx: Any, model: Path, work: Path, min_opset: int) -> Path:
    """``model``, or a copy converted to ``min_opset`` when its default-domain opset is lower."""
    try:
        proto = onnx.load(str(model))
    except Exception as e:  # protobuf DecodeError and friends
        raise ModelLoadError(f"{model.name}: not a readable ONNX model: {_one_line(e)}") from e
    opset = _default_opset(proto)
    if opset >= min_opset:
        return model
    try:
        proto = onnx.version_converter.convert_version(proto, min_opset)
    except Exception as e:  # the converter lacks adapters for some ops
        raise ModelLoadError(f"{model.name}: cannot convert opset {opset} to {min_opset} for per-channel "
                             f"quantization: {_one_line(e)}") from e
    path = work / "upgraded.onnx"
    onnx.save(proto, str(path))
    return path


def _compare(quantized: Path, samples: Sequence[Sample], input_name: str) -> tuple[int, float]:
    """(top-1 agreements, max |fp32 - int8| over every output) of the written model on ``samples``."""
    backend = create_backend("onnx", quantized, _CPU)
    try:
        agreed, diff = 0, 0.0
        for sample in samples:
            got = backend.infer({input_name: sample.tensor})
            first = next(iter(sample.reference))
            if np.array_equal(np.argmax(sample.reference[first], axis=-1), np.argmax(got[first], axis=-1)):
                agreed += 1
            for name, ref in sample.reference.items():
                delta = np.abs(ref.astype(np.float64) - got[name].astype(np.float64))
                diff = max(diff, float(delta.max()) if delta.size else 0.0)
        return agreed, diff
    finally:
        backend.close()


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    # The quantizer prints progress with print(); stdout is reserved for our report (and --json).
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__

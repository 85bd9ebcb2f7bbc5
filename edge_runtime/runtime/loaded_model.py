"""A model version loaded for serving: backend + declared pre/post-processing.

Loading re-hashes the model file against the signed manifest (bit rot on an
SD card is caught, not served), refuses ONNX external data, and checks the
runtime's view of inputs/outputs against the manifest. After construction a
:class:`LoadedModel` is immutable and safe to share between threads.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from numpy.typing import NDArray

from edge_runtime._util.fsutil import sha256_file
from edge_runtime.bundle.manifest import Manifest, TensorSpec
from edge_runtime.bundle.reference_stats import MAX_REFERENCE_BYTES, ReferenceStats, parse_reference
from edge_runtime.config.model import Limits
from edge_runtime.errors import InputError, IntegrityError, SignatureMismatchError
from edge_runtime.runtime.backends import create_backend
from edge_runtime.runtime.backends.base import Backend, BackendOptions, TensorInfo, dequantize, fit_tensor
from edge_runtime.runtime.monitor_features import FeatureExtractor
from edge_runtime.runtime.oip_types import datatype_of
from edge_runtime.runtime.postprocess import Postprocessor, parse_labels
from edge_runtime.runtime.preprocess import Placement, Preprocessor, decoded_image, is_npy, load_npy

__all__ = ["LoadedModel", "Prediction"]

_MAX_LABELS_BYTES = 8 << 20


@dataclass(frozen=True)
class Prediction:
    """Results (one dict per batch item) and stage timings in milliseconds."""

    results: list[dict[str, Any]]
    timings_ms: dict[str, float]
    tensor: NDArray[Any] | None = None
    """The preprocessed input tensor (monitoring reads its features); None from callers that build their own."""
    outputs: Mapping[str, NDArray[Any]] = field(default_factory=dict)
    """The dequantised raw outputs the results were decoded from."""


class LoadedModel:
    """One installed model version, loaded in its runtime and ready to serve.

    Raises (from the constructor):
        IntegrityError: a file no longer matches its signed sha256.
        UnsafeBundleError: an ONNX model references external data.
        ModelLoadError / BackendUnavailableError: the runtime refused the model.
        SignatureMismatchError: the model's I/O differs from the manifest.
        ManifestError: preprocess/postprocess do not fit the model.
    """

    def __init__(self, manifest: Manifest, directory: Path, *, options: BackendOptions, limits: Limits,
                 verify_files: bool = True) -> None:
        self.manifest = manifest
        self.directory = directory
        self.limits = limits
        model_path = directory / manifest.model
        if verify_files:
            _verify_files(manifest, directory, (manifest.model, manifest.postprocess.labels, manifest.reference))
        sha = manifest.files[manifest.model].sha256
        self.backend: Backend = create_backend(manifest.format, model_path, replace(options, model_sha256=sha))
        try:
            _check_io("input", manifest.inputs, self.backend.inputs)
            _check_io("output", manifest.outputs, self.backend.outputs)
            self._inputs = {t.name: t for t in self.backend.inputs}
            self._outputs = {t.name: t for t in self.backend.outputs}
            self.preprocess_input = self._pick_input()
            self.preprocessor = self._build_preprocessor()
            labels = self._read_labels()
            self.postprocessor = Postprocessor(manifest.postprocess, self.backend.outputs, labels,
                                               self._input_hw())
            self.reference: ReferenceStats | None = self._read_reference()
            pre = self.preprocessor
            self.features = FeatureExtractor(self.preprocess_input.shape, pre.layout if pre else "",
                                             manifest.postprocess, (pre.height, pre.width) if pre else None)
        except BaseException:
            self.backend.close()
            raise

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    def close(self) -> None:
        """Release the runtime. In-flight calls must have finished."""
        self.backend.close()

    # ------------------------------------------------------------------ inference

    def infer(self, feeds: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        """Raw tensors in, raw tensors out (no pre/post-processing, no casting).

        Raises:
            InputError: feeds do not fit the model. InferenceError: runtime failed.
        """
        return self.backend.infer(feeds)

    def predict_bytes(self, data: bytes, *, with_mask: bool = False) -> Prediction:
        """Run on a JPEG/PNG image or a .npy tensor given as bytes.

        Boxes and masks of an image are in its own pixels, those of a tensor in
        the model input's. ``with_mask`` adds a segmentation's PNG mask.

        Raises:
            InputError: bad or oversized input. BusyError: the decode budget stayed full.
            InferenceError: runtime failed.
        """
        t0 = time.perf_counter()
        placement: Placement | None = None
        if is_npy(data):
            feeds = {self.preprocess_input.name: self.to_tensor(load_npy(data, self.limits.max_image_bytes))}
        else:
            limits = self.limits
            # The decode budget is held until the full-size image is dropped, not only while OpenCV runs.
            with decoded_image(data, limits.max_image_bytes, limits.max_image_pixels, limits.max_decode_bytes) as image:
                tensor, placement = self.image_to_input(image)
                feeds = {self.preprocess_input.name: tensor}
                del image
        return self._run(feeds, t0, placement, with_mask)

    def predict_image(self, image: NDArray[Any], *, with_mask: bool = False) -> Prediction:
        """Run on a decoded BGR uint8 image (e.g. a camera frame); results in its pixels."""
        t0 = time.perf_counter()
        tensor, placement = self.image_to_input(image)
        return self._run({self.preprocess_input.name: tensor}, t0, placement, with_mask)

    def predict_tensor(self, tensor: NDArray[Any], input_name: str = "") -> Prediction:
        """Run on a tensor for one input (batch dim added, cast/quantised as needed)."""
        t0 = time.perf_counter()
        name = input_name or self.preprocess_input.name
        return self._run({name: self.to_tensor(tensor, name)}, t0)

    def to_tensor(self, array: NDArray[Any], input_name: str = "") -> NDArray[Any]:
        """Fit ``array`` to an input: add the batch dim, quantise floats, safe casts.

        Raises:
            InputError: unknown input, wrong rank, or an unsafe dtype conversion.
        """
        info = self._inputs.get(input_name or self.preprocess_input.name)
        if info is None:
            raise InputError(f"model has no input named {input_name!r}")
        return fit_tensor(array, info)

    def dequantized(self, outputs: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        """Outputs with quantised integer tensors converted to float32."""
        return {k: dequantize(v, self._outputs[k]) if k in self._outputs else v for k, v in outputs.items()}

    def describe(self) -> dict[str, Any]:
        """Model metadata in Open Inference Protocol shape (name, versions, I/O; datatypes like "FP32")."""

        def tensors(infos: tuple[TensorInfo, ...]) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": datatype_of(t.dtype),
                     "shape": [-1 if d is None else d for d in t.shape]} for t in infos]

        return {
            "name": self.name,
            "versions": [str(self.version)],
            "platform": self.backend.description,
            "inputs": tensors(self.backend.inputs),
            "outputs": tensors(self.backend.outputs),
        }

    # ------------------------------------------------------------------ internals

    def image_to_tensor(self, image: NDArray[Any]) -> NDArray[Any]:
        """Preprocess a BGR image into the model's input tensor (InputError when no preprocess)."""
        return self.image_to_input(image)[0]

    def image_to_input(self, image: NDArray[Any]) -> tuple[NDArray[Any], Placement]:
        """The input tensor of a BGR image and where the image landed in it (InputError when no preprocess)."""
        if self.preprocessor is None:
            raise InputError(f"model {self.name} declares no preprocess; send a .npy tensor instead of an image")
        tensor, placement = self.preprocessor(image)
        return self.to_tensor(tensor), placement

    def _input_hw(self) -> tuple[int, int] | None:
        """(height, width) of the image input boxes are measured in: the preprocessing's, else a static shape."""
        if self.preprocessor is not None:
            return self.preprocessor.height, self.preprocessor.width
        shape = self.preprocess_input.shape
        if len(shape) != 4:
            return None
        h, w = (shape[2], shape[3]) if shape[1] in (1, 3) else (shape[1], shape[2])
        return (h, w) if h is not None and w is not None else None

    def _run(self, feeds: dict[str, NDArray[Any]], t0: float, placement: Placement | None = None,
             with_mask: bool = False) -> Prediction:
        t1 = time.perf_counter()
        outputs = self.backend.infer(feeds)
        t2 = time.perf_counter()
        deq = self.dequantized(outputs)
        results = self.postprocessor(deq, [placement], with_mask=with_mask)
        t3 = time.perf_counter()
        timings = {"preprocess": (t1 - t0) * 1e3, "infer": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3,
                   "total": (t3 - t0) * 1e3}
        return Prediction(results, timings, next(iter(feeds.values())), deq)

    def _pick_input(self) -> TensorInfo:
        pre = self.manifest.preprocess
        wanted = pre.input if pre else ""
        for info in self.backend.inputs:
            if not wanted or info.name == wanted:
                return info
        raise SignatureMismatchError(f"preprocess.input {wanted!r} is not an input of the model")

    def _build_preprocessor(self) -> Preprocessor | None:
        pre = self.manifest.preprocess
        if pre is None:
            return None
        info = self.preprocess_input
        layout = next((s.layout for s in self.manifest.inputs if s.name == info.name), "")
        return Preprocessor(pre, info.shape, layout, info.dtype, info.quantization is not None)

    def _read_reference(self) -> ReferenceStats | None:
        """The drift reference, when the bundle ships one as ``reference.json`` (other kinds are not read)."""
        path = self.manifest.reference
        if not path.endswith(".json"):
            return None
        with open(self.directory / path, "rb") as fh:
            return parse_reference(fh.read(MAX_REFERENCE_BYTES + 1))

    def _read_labels(self) -> list[str]:
        path = self.manifest.postprocess.labels
        if not path:
            return []
        with open(self.directory / path, "rb") as fh:
            return parse_labels(fh.read(_MAX_LABELS_BYTES))


def _verify_files(manifest: Manifest, directory: Path, paths: tuple[str, ...]) -> None:
    for path in paths:
        if not path:
            continue
        entry = manifest.files[path]
        try:
            digest, size = sha256_file(directory / path)
        except OSError as e:
            raise IntegrityError(f"{manifest.name} v{manifest.version}: {path} unreadable: {e.strerror}") from e
        if digest != entry.sha256 or size != entry.size:
            raise IntegrityError(
                f"{manifest.name} v{manifest.version}: {path} does not match its signed sha256 (corrupt on disk)"
            )


def _check_io(kind: str, declared: tuple[TensorSpec, ...], actual: tuple[TensorInfo, ...]) -> None:
    """The manifest's I/O must describe the runtime's: names, dtypes, static dims."""
    if not declared:
        return
    by_name = {t.name: t for t in actual}
    if sorted(by_name) != sorted(s.name for s in declared):
        raise SignatureMismatchError(
            f"manifest {kind}s {[s.name for s in declared]} differ from the model's {list(by_name)}"
        )
    for spec in declared:
        info = by_name[spec.name]
        if spec.dtype != info.dtype:
            raise SignatureMismatchError(f"{kind} {spec.name!r}: manifest says {spec.dtype}, model has {info.dtype}")
        if len(spec.shape) != len(info.shape) or any(
            a is not None and b is not None and a != b for a, b in zip(spec.shape, info.shape, strict=True)
        ):
            raise SignatureMismatchError(
                f"{kind} {spec.name!r}: manifest shape {list(spec.shape)} does not fit model shape {list(info.shape)}"
            )

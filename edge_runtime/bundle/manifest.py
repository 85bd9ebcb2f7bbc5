"""The bundle manifest: typed, validated, pure (no I/O).

The frozen dataclasses a manifest is made of, the naming and path rules they
obey, and ``Manifest.to_json()``, the canonical bytes that ``bundle pack``
signs. Parsing signed bytes back into a :class:`Manifest` lives in
:mod:`edge_runtime.bundle.manifest_parse`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_runtime.bundle.postprocess_spec import Detection, Segmentation
from edge_runtime.errors import ManifestError

__all__ = [
    "DTYPES",
    "FORMATS",
    "INTERPOLATIONS",
    "NAME_PATTERN",
    "FileEntry",
    "Gates",
    "GoldenCase",
    "Manifest",
    "Postprocess",
    "Preprocess",
    "Requires",
    "StagedBundle",
    "TensorSpec",
    "is_sha256_hex",
    "is_valid_name",
    "validate_member_path",
]

SCHEMA_VERSION = 1
FORMATS = ("onnx", "tflite")
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
LAYOUTS = ("NCHW", "NHWC", "")
RESIZE_MODES = ("stretch", "letterbox", "letterbox_pad_first", "letterbox_top_left", "none")
COLOR_ORDERS = ("rgb", "bgr", "gray")
INTERPOLATIONS = ("linear", "area")
POSTPROCESS_TYPES = ("raw", "classification", "detection", "segmentation")
ACTIVATIONS = ("none", "softmax", "sigmoid")

#: Model names (and hardware tags): one safe path component. The cache, the state file
#: and channel documents use the same rule, so every name they hold is installable.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PATH_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_FILES = 256


def is_valid_name(name: object) -> bool:
    """True when ``name`` is a string that :data:`NAME_PATTERN` matches in full (no trailing newline)."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


def is_sha256_hex(value: object) -> bool:
    """True when ``value`` is a sha256 digest as manifests and channels write it: 64 lowercase hex digits."""
    return isinstance(value, str) and _SHA256_RE.fullmatch(value) is not None


def validate_member_path(path: str) -> str:
    """Return ``path`` if it is a safe relative bundle path, else raise.

    Safe means: relative, '/'-separated, at most 4 components, each made of
    letters, digits, '.', '_' and '-', not starting with '.' (so no '..').

    Raises:
        ManifestError: the path is absolute, traverses, or has odd characters.
    """
    if not isinstance(path, str) or not path:
        raise ManifestError(f"file path {path!r} is empty or not a string")
    parts = path.split("/")
    if len(parts) > 4 or not all(_PATH_PART_RE.fullmatch(p) for p in parts):  # match() would take "x\n"
        raise ManifestError(
            f"file path {path!r} is not a safe relative path "
            "(letters, digits, '._-', no leading '.', at most 4 levels)"
        )
    return path


@dataclass(frozen=True)
class FileEntry:
    """One payload file: its sha256 (hex) and exact size in bytes."""

    sha256: str
    size: int


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the manifest declares it.

    ``shape`` entries may be ``None`` (or -1 in JSON) for dynamic dimensions.
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    layout: str = ""


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input tensor.

    The tensor is ``(pixel * scale - mean) / std`` per channel, after decode,
    colour conversion and resize, then laid out and cast to ``dtype``.
    ``size`` is (height, width) and is only needed when the model's spatial
    dimensions are dynamic. Empty ``layout``/``dtype`` mean "as the input tensor".
    ``interpolation`` is OpenCV's resize filter: ``linear`` (bilinear) or
    ``area`` (pixel averaging: no aliasing when a camera frame shrinks many times).
    """

    input: str = ""
    resize: str = "stretch"
    size: tuple[int, int] | None = None
    color: str = "rgb"
    layout: str = ""
    dtype: str = ""
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    letterbox_fill: int = 0
    interpolation: str = "linear"


@dataclass(frozen=True)
class Postprocess:
    """How output tensors become a result.

    ``raw`` returns the outputs as arrays; ``classification`` takes output
    ``output`` (default: first), applies ``activation`` and returns the
    ``top_k`` classes, named from the ``labels`` file when given;
    ``detection`` and ``segmentation`` decode the head that ``detection`` or
    ``segmentation`` declares (:mod:`edge_runtime.bundle.postprocess_spec`).
    """

    type: str = "raw"
    output: str = ""
    activation: str = "none"
    top_k: int = 5
    labels: str = ""
    detection: Detection | None = None
    segmentation: Segmentation | None = None


@dataclass(frozen=True)
class GoldenCase:
    """A known input and the expected raw outputs, compared with tolerances.

    ``input`` is a .npy model-input tensor or an image file (preprocessed);
    ``expected`` is a .npy (first output) or .npz (keyed by output name).
    """

    input: str
    expected: str
    rtol: float = 1e-3
    atol: float = 1e-4


@dataclass(frozen=True)
class Gates:
    """Activation gates: p95 latency budget (0 = none) and golden pass rate."""

    latency_ms_p95: float = 0.0
    golden_pass_rate: float = 1.0


@dataclass(frozen=True)
class Requires:
    """What the device must offer: minimum runtime version and hardware tags."""

    runtime: str = ""
    hardware: tuple[str, ...] = ()


@dataclass(frozen=True)
class Manifest:
    """A validated bundle manifest. Construct it with :func:`edge_runtime.bundle.manifest_parse.parse_manifest`."""

    name: str
    version: int
    format: str
    model: str
    files: Mapping[str, FileEntry]
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    preprocess: Preprocess | None = None
    postprocess: Postprocess = field(default_factory=Postprocess)
    golden: tuple[GoldenCase, ...] = ()
    gates: Gates = field(default_factory=Gates)
    reference: str = ""
    requires: Requires = field(default_factory=Requires)
    created: str = ""
    expires: str = ""
    schema: int = SCHEMA_VERSION

    def to_json(self) -> bytes:
        """Canonical JSON bytes (sorted keys, no spaces): what gets signed."""
        doc = asdict(self)
        doc["files"] = {k: asdict(v) for k, v in sorted(self.files.items())}
        for spec in doc["inputs"] + doc["outputs"]:
            spec["shape"] = [-1 if d is None else d for d in spec["shape"]]
        if doc["preprocess"] is None:
            del doc["preprocess"]
        elif doc["preprocess"]["interpolation"] == "linear":  # the default stays unwritten: older runtimes read it
            del doc["preprocess"]["interpolation"]
        for head in ("detection", "segmentation"):  # absent, so older runtimes still read other manifests
            if doc["postprocess"][head] is None:
                del doc["postprocess"][head]
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def input_spec(self, name: str = "") -> TensorSpec:
        """The named input (first when ``name`` is empty); raises ManifestError."""
        return _find(self.inputs, name, "input")

    def output_spec(self, name: str = "") -> TensorSpec:
        """The named output (first when ``name`` is empty); raises ManifestError."""
        return _find(self.outputs, name, "output")


def _find(specs: tuple[TensorSpec, ...], name: str, kind: str) -> TensorSpec:
    for spec in specs:
        if not name or spec.name == name:
            return spec
    raise ManifestError(f"manifest declares no {kind} named {name!r}")


@dataclass(frozen=True)
class StagedBundle:
    """A bundle whose signatures and hashes were verified, unpacked in staging.

    ``directory`` holds ``manifest.json``, ``manifest.sig`` and every payload
    file the manifest lists, all hash-checked; it lives under the cache's
    ``staging/`` dir until the cache renames it into place.
    """

    manifest: Manifest
    manifest_bytes: bytes
    signature_bytes: bytes
    directory: Path
    key_ids: tuple[str, ...] = ()

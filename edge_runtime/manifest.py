"""The bundle manifest: typed, validated, pure (no I/O).

``parse_manifest(data: bytes)`` turns the exact signed bytes into a frozen
:class:`Manifest`, or raises :class:`ManifestError` naming the bad field.
``Manifest.to_json()`` produces the canonical bytes that ``bundle pack`` signs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ManifestError

__all__ = [
    "DTYPES",
    "FORMATS",
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
    "parse_manifest",
    "validate_member_path",
]

SCHEMA_VERSION = 1
FORMATS = ("onnx", "tflite")
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
LAYOUTS = ("NCHW", "NHWC", "")
RESIZE_MODES = ("stretch", "letterbox", "none")
COLOR_ORDERS = ("rgb", "bgr", "gray")
POSTPROCESS_TYPES = ("raw", "classification")
ACTIVATIONS = ("none", "softmax", "sigmoid")

#: Model names (and hardware tags): one safe path component. The cache, the state file
#: and channel documents use the same rule, so every name they hold is installable.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PATH_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_FILES = 256


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
    if len(parts) > 4 or not all(_PATH_PART_RE.match(p) for p in parts):
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


@dataclass(frozen=True)
class Postprocess:
    """How output tensors become a result.

    ``raw`` returns the outputs as arrays; ``classification`` takes output
    ``output`` (default: first), applies ``activation`` and returns the
    ``top_k`` classes, named from the ``labels`` file when given.
    """

    type: str = "raw"
    output: str = ""
    activation: str = "none"
    top_k: int = 5
    labels: str = ""


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
    """A validated bundle manifest. Construct it with :func:`parse_manifest`."""

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


# --------------------------------------------------------------------------- parsing


class _Fields:
    """Reads typed fields from one JSON object, naming the path in errors."""

    def __init__(self, obj: object, where: str) -> None:
        if not isinstance(obj, dict):
            raise ManifestError(f"{where} must be an object")
        self.obj: dict[str, Any] = obj
        self.where = where
        self.used: set[str] = set()

    def _get(self, key: str, default: Any) -> Any:
        self.used.add(key)
        if key not in self.obj:
            if default is _REQUIRED:
                raise ManifestError(f"{self.where}.{key} is required")
            return default
        return self.obj[key]

    def _bad(self, key: str, what: str) -> ManifestError:
        return ManifestError(f"{self.where}.{key} must be {what}")

    def str_(self, key: str, default: Any = "", choices: tuple[str, ...] = ()) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        if choices and value not in choices:
            raise self._bad(key, "one of " + ", ".join(repr(c) for c in choices))
        return value

    def int_(self, key: str, default: Any = 0, lo: int = 0, hi: int = 2**53) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self._bad(key, f"an integer in [{lo}, {hi}]")
        return value

    def float_(self, key: str, default: Any = 0.0, lo: float = 0.0, hi: float = 1e12) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise self._bad(key, f"a number in [{lo}, {hi}]")
        return float(value)

    def floats(self, key: str, default: tuple[float, ...]) -> tuple[float, ...]:
        value = self._get(key, list(default))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if (
            not isinstance(value, list)
            or not 1 <= len(value) <= 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ):
            raise self._bad(key, "a number or a list of 1 to 4 numbers")
        return tuple(float(v) for v in value)

    def list_(self, key: str) -> list[Any]:
        value = self._get(key, [])
        if not isinstance(value, list):
            raise self._bad(key, "a list")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.obj) - self.used)
        if unknown:
            raise ManifestError(f"{self.where} has unknown key {unknown[0]!r}")


_REQUIRED = object()


def _tensor(obj: object, where: str) -> TensorSpec:
    f = _Fields(obj, where)
    name = f.str_("name", _REQUIRED)
    raw_shape = f.list_("shape")
    if len(raw_shape) > 8 or not all(
        isinstance(d, int) and not isinstance(d, bool) and -1 <= d <= 2**31 for d in raw_shape
    ):
        raise ManifestError(f"{where}.shape must be a list of at most 8 ints (-1 = dynamic)")
    shape = tuple(None if d == -1 else int(d) for d in raw_shape)
    spec = TensorSpec(name, shape, f.str_("dtype", _REQUIRED, DTYPES), f.str_("layout", "", LAYOUTS))
    f.finish()
    return spec


def _preprocess(obj: object) -> Preprocess:
    f = _Fields(obj, "preprocess")
    size_raw = f._get("size", None)
    size: tuple[int, int] | None = None
    if size_raw is not None:
        if (
            not isinstance(size_raw, list)
            or len(size_raw) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 8192 for v in size_raw)
        ):
            raise ManifestError("preprocess.size must be [height, width], each 1..8192")
        size = (size_raw[0], size_raw[1])
    pre = Preprocess(
        input=f.str_("input"),
        resize=f.str_("resize", "stretch", RESIZE_MODES),
        size=size,
        color=f.str_("color", "rgb", COLOR_ORDERS),
        layout=f.str_("layout", "", LAYOUTS),
        dtype=f.str_("dtype", "", (*DTYPES, "")),
        scale=f.float_("scale", 1.0, -1e6, 1e6),
        mean=f.floats("mean", (0.0,)),
        std=f.floats("std", (1.0,)),
        letterbox_fill=f.int_("letterbox_fill", 0, 0, 255),
    )
    f.finish()
    if any(s == 0 for s in pre.std):
        raise ManifestError("preprocess.std must not contain 0")
    return pre


def _postprocess(obj: object) -> Postprocess:
    f = _Fields(obj, "postprocess")
    post = Postprocess(
        type=f.str_("type", "raw", POSTPROCESS_TYPES),
        output=f.str_("output"),
        activation=f.str_("activation", "none", ACTIVATIONS),
        top_k=f.int_("top_k", 5, 1, 1000),
        labels=f.str_("labels"),
    )
    f.finish()
    return post


def parse_manifest(data: bytes) -> Manifest:
    """Parse and validate manifest bytes.

    Raises:
        ManifestError: not UTF-8 JSON, a field is missing, mistyped, unknown,
            or the manifest is inconsistent (model/labels/golden not listed).
    """
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ManifestError(f"manifest is not valid UTF-8 JSON: {e}") from e
    f = _Fields(doc, "manifest")
    schema = f.int_("schema", SCHEMA_VERSION, 1, 1000)
    if schema != SCHEMA_VERSION:
        raise ManifestError(f"manifest.schema {schema} is not supported (expected {SCHEMA_VERSION})")
    name = f.str_("name", _REQUIRED)
    if not is_valid_name(name):
        raise ManifestError(f"manifest.name {name!r} must match {NAME_PATTERN.pattern}")

    files_raw = f._get("files", _REQUIRED)
    if not isinstance(files_raw, dict) or not 1 <= len(files_raw) <= _MAX_FILES:
        raise ManifestError(f"manifest.files must be an object with 1 to {_MAX_FILES} entries")
    files: dict[str, FileEntry] = {}
    for path, entry_raw in files_raw.items():
        validate_member_path(path)
        if path in ("manifest.json", "manifest.sig"):
            raise ManifestError(f"manifest.files must not list {path!r}")
        ef = _Fields(entry_raw, f"manifest.files[{path!r}]")
        sha = ef.str_("sha256", _REQUIRED)
        if not is_sha256_hex(sha):
            raise ManifestError(f"manifest.files[{path!r}].sha256 must be 64 lowercase hex digits")
        files[path] = FileEntry(sha, ef.int_("size", _REQUIRED, 0, 2**48))
        ef.finish()

    pre_raw = f._get("preprocess", None)
    gates_f = _Fields(f._get("gates", {}), "gates")
    gates = Gates(
        latency_ms_p95=gates_f.float_("latency_ms_p95", 0.0, 0.0, 1e7),
        golden_pass_rate=gates_f.float_("golden_pass_rate", 1.0, 0.0, 1.0),
    )
    gates_f.finish()
    req_f = _Fields(f._get("requires", {}), "requires")
    hardware = req_f.list_("hardware")
    if not all(is_valid_name(h) for h in hardware):
        raise ManifestError("requires.hardware must be a list of tag strings")
    requires = Requires(runtime=req_f.str_("runtime"), hardware=tuple(hardware))
    req_f.finish()

    golden = []
    for i, case_raw in enumerate(f.list_("golden")):
        gf = _Fields(case_raw, f"golden[{i}]")
        golden.append(
            GoldenCase(
                input=gf.str_("input", _REQUIRED),
                expected=gf.str_("expected", _REQUIRED),
                rtol=gf.float_("rtol", 1e-3, 0.0, 1e6),
                atol=gf.float_("atol", 1e-4, 0.0, 1e6),
            )
        )
        gf.finish()

    manifest = Manifest(
        name=name,
        version=f.int_("version", _REQUIRED, 1, 2**53),
        format=f.str_("format", _REQUIRED, FORMATS),
        model=f.str_("model", _REQUIRED),
        files=files,
        inputs=tuple(_tensor(t, f"inputs[{i}]") for i, t in enumerate(f.list_("inputs"))),
        outputs=tuple(_tensor(t, f"outputs[{i}]") for i, t in enumerate(f.list_("outputs"))),
        preprocess=None if pre_raw is None else _preprocess(pre_raw),
        postprocess=_postprocess(f._get("postprocess", {})),
        golden=tuple(golden),
        gates=gates,
        reference=f.str_("reference"),
        requires=requires,
        created=f.str_("created"),
        expires=f.str_("expires"),
        schema=schema,
    )
    f.finish()
    _check_references(manifest)
    return manifest


def _check_references(m: Manifest) -> None:
    """Every file the manifest points at must be one it lists."""
    refs = [("model", m.model), ("postprocess.labels", m.postprocess.labels), ("reference", m.reference)]
    for i, case in enumerate(m.golden):
        refs += [(f"golden[{i}].input", case.input), (f"golden[{i}].expected", case.expected)]
    for key, path in refs:
        if path and path not in m.files:
            raise ManifestError(f"manifest.{key} {path!r} is not listed in manifest.files")
    for specs, kind in ((m.inputs, "inputs"), (m.outputs, "outputs")):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ManifestError(f"manifest.{kind} has duplicate names")
    if m.preprocess and m.preprocess.input and m.inputs:
        m.input_spec(m.preprocess.input)
    if m.postprocess.output and m.outputs:
        m.output_spec(m.postprocess.output)



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

"""Parsing manifest bytes into a :class:`~edge_runtime.bundle.manifest.Manifest`.

``parse_manifest(data: bytes)`` turns the exact signed bytes into a frozen
:class:`Manifest`, or raises :class:`ManifestError` naming the bad field
(unknown keys included, so a typo never silently means a default).
"""

from __future__ import annotations

from typing import Any

from edge_runtime._util.strict_text import load_json
from edge_runtime.bundle.manifest import (
    ACTIVATIONS,
    COLOR_ORDERS,
    DTYPES,
    FORMATS,
    INTERPOLATIONS,
    LAYOUTS,
    MAX_FILES,
    NAME_PATTERN,
    POSTPROCESS_TYPES,
    RESIZE_MODES,
    SCHEMA_VERSION,
    FileEntry,
    Gates,
    GoldenCase,
    Manifest,
    Postprocess,
    Preprocess,
    Requires,
    TensorSpec,
    is_sha256_hex,
    is_valid_name,
    validate_member_path,
)
from edge_runtime.bundle.postprocess_spec import Detection, Segmentation, check_detection, check_segmentation
from edge_runtime.config.typed_toml import build
from edge_runtime.errors import ConfigError, ManifestError

__all__ = ["parse_manifest"]


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
        interpolation=f.str_("interpolation", "linear", INTERPOLATIONS),
    )
    f.finish()
    if any(s == 0 for s in pre.std):
        raise ManifestError("preprocess.std must not contain 0")
    return pre


def _head(f: _Fields, key: str, cls: type[Any]) -> Any:
    raw = f._get(key, None)
    if raw is None:
        return None
    try:
        # The same strict builder as pack specs: unknown keys and mistyped values are named.
        return build(cls, raw, f"postprocess.{key}")
    except ConfigError as e:
        raise ManifestError(e.one_line()) from e


def _postprocess(obj: object) -> Postprocess:
    f = _Fields(obj, "postprocess")
    post = Postprocess(
        type=f.str_("type", "raw", POSTPROCESS_TYPES),
        output=f.str_("output"),
        activation=f.str_("activation", "none", ACTIVATIONS),
        top_k=f.int_("top_k", 5, 1, 1000),
        labels=f.str_("labels"),
        detection=_head(f, "detection", Detection),
        segmentation=_head(f, "segmentation", Segmentation),
    )
    f.finish()
    check_heads(post)
    return post


def check_heads(post: Postprocess) -> None:
    """``type = "detection"`` needs a ``detection`` table and nothing else may carry one (same for segmentation).

    Raises:
        ManifestError: a head missing for its type, or declared for another type.
    """
    for head in ("detection", "segmentation"):
        declared = getattr(post, head) is not None
        if post.type == head and not declared:
            raise ManifestError(f"postprocess.type {head!r} needs a [postprocess.{head}] table")
        if declared and post.type != head:
            raise ManifestError(f"postprocess.{head} is declared but postprocess.type is {post.type!r}")


def parse_manifest(data: bytes) -> Manifest:
    """Parse and validate manifest bytes.

    Raises:
        ManifestError: not strict UTF-8 JSON (a repeated key, NaN), a field is
            missing, mistyped, unknown, or the manifest is inconsistent
            (model/labels/golden not listed).
    """
    doc = load_json(data, "manifest", error=ManifestError)
    f = _Fields(doc, "manifest")
    schema = f.int_("schema", SCHEMA_VERSION, 1, 1000)
    if schema != SCHEMA_VERSION:
        raise ManifestError(f"manifest.schema {schema} is not supported (expected {SCHEMA_VERSION})")
    name = f.str_("name", _REQUIRED)
    if not is_valid_name(name):
        raise ManifestError(f"manifest.name {name!r} must match {NAME_PATTERN.pattern}")

    files_raw = f._get("files", _REQUIRED)
    if not isinstance(files_raw, dict) or not 1 <= len(files_raw) <= MAX_FILES:
        raise ManifestError(f"manifest.files must be an object with 1 to {MAX_FILES} entries")
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
    if m.postprocess.detection is not None:
        check_detection(m.postprocess.detection, m.outputs, declared_input_hw(m))
    if m.postprocess.segmentation is not None:
        check_segmentation(m.postprocess.segmentation, m.outputs)


def declared_input_hw(m: Manifest) -> tuple[int, int] | None:
    """The (height, width) the preprocessing feeds the model, when the manifest fixes it."""
    pre = m.preprocess
    if pre is not None and pre.size is not None:
        return pre.size
    if not m.inputs:
        return None
    spec = m.input_spec(pre.input if pre else "")
    if len(spec.shape) != 4:
        return None
    layout = (pre.layout if pre else "") or spec.layout or ("NCHW" if spec.shape[1] in (1, 3) else "NHWC")
    h, w = (spec.shape[2], spec.shape[3]) if layout == "NCHW" else (spec.shape[1], spec.shape[2])
    return (h, w) if h is not None and w is not None else None

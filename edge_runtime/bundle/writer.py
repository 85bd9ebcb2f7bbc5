"""Pack and sign a model bundle (``edge-runtime bundle pack``).

The layout is fixed so that devices never have to guess::

    manifest.json                 canonical JSON (Manifest.to_json), signed
    manifest.sig                  signing.sign_document over those exact bytes
    model.onnx | model.tflite     the model
    golden/<i>.input.<ext>        golden case i: .npy tensor or an image
    golden/<i>.expected.<ext>     .npy (first output) or .npz (by output name)
    reference.<ext>               optional drift reference
    <extra files>                 e.g. labels.txt, at the paths the caller picks

Files are hashed in one streaming pass, then streamed again into a USTAR tar
(uid/gid 0, mode 0644, fixed mtime, regular files only) written to a temp file
beside ``out`` and renamed into place. The second pass is hashed too, so a
source file that changes mid-pack is caught instead of producing a bundle
that every device would refuse. Memory stays bounded by the copy buffer
whatever the model size. Same inputs (and ``created``) give the same bytes:
Ed25519 signatures are deterministic.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime._util.fsutil import fsync_dir, sha256_file
from edge_runtime.bundle.manifest import (
    FileEntry,
    Gates,
    GoldenCase,
    Manifest,
    Postprocess,
    Preprocess,
    Requires,
    TensorSpec,
    validate_member_path,
)
from edge_runtime.bundle.manifest_parse import parse_manifest
from edge_runtime.bundle.onnx_external import check_no_external_data
from edge_runtime.bundle.reader import MANIFEST_MEMBER, SIGNATURE_MEMBER
from edge_runtime.bundle.requirements import format_timestamp, parse_runtime_requirement, parse_timestamp
from edge_runtime.bundle.signing import key_id, sign_document
from edge_runtime.errors import BundleError, ManifestError, SignatureError

__all__ = [
    "DEFAULT_GOLDEN_CASES",
    "GOLDEN_EXPECTED_SUFFIXES",
    "GOLDEN_INPUT_SUFFIXES",
    "BundleSpec",
    "GoldenSource",
    "golden_inputs",
    "pack_bundle",
]

GOLDEN_INPUT_SUFFIXES = (".npy", ".png", ".jpg", ".jpeg", ".bmp", ".webp")
GOLDEN_EXPECTED_SUFFIXES = (".npy", ".npz")
#: Golden cases ``bundle pack --golden-dir`` packs by default: one case is a weak gate (issue 9 §2).
DEFAULT_GOLDEN_CASES = 8
_MTIME = 0  # fixed, so identical inputs give byte-identical bundles
_USTAR_NAME, _USTAR_PREFIX = 100, 155


@dataclass(frozen=True)
class GoldenSource:
    """A golden case on the publisher's disk: input (.npy or image), expected
    outputs (.npy or .npz) and the tolerances the device compares with."""

    input: Path
    expected: Path
    rtol: float = 1e-3
    atol: float = 1e-4


@dataclass(frozen=True)
class BundleSpec:
    """Everything ``bundle pack`` needs, with source files as local paths.

    ``extra_files`` maps a bundle path (e.g. ``"labels.txt"``, which
    ``postprocess.labels`` may then name) to its source file. ``created``
    defaults to the current UTC time; ``expires`` is optional. Both are
    ISO-8601 with an offset, e.g. ``2026-01-31T00:00:00Z``.
    """

    name: str
    version: int
    format: str
    model: Path
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    preprocess: Preprocess | None = None
    postprocess: Postprocess = field(default_factory=Postprocess)
    extra_files: Mapping[str, Path] = field(default_factory=dict)
    golden: tuple[GoldenSource, ...] = ()
    gates: Gates = field(default_factory=Gates)
    requires: Requires = field(default_factory=Requires)
    reference: Path | None = None
    created: str | None = None
    expires: str = ""


def golden_inputs(directory: Path, count: int = DEFAULT_GOLDEN_CASES) -> list[Path]:
    """``count`` golden inputs picked evenly from ``directory`` (its images and .npy files, by name).

    All of them when there are fewer. Hidden files and other suffixes are skipped.

    Raises:
        BundleError: the directory is unreadable or holds no usable input; ``count`` < 1.
    """
    if count < 1:
        raise BundleError(f"the number of golden cases must be at least 1, got {count}")
    try:
        found = sorted(p for p in directory.iterdir()
                       if not p.name.startswith(".") and p.suffix.lower() in GOLDEN_INPUT_SUFFIXES and p.is_file())
    except OSError as e:
        raise BundleError(f"cannot read golden dir {directory}: {e.strerror or e}") from e
    if not found:
        raise BundleError(f"golden dir {directory} has no input ({', '.join(GOLDEN_INPUT_SUFFIXES)})")
    if len(found) <= count:
        return found
    return [found[i * len(found) // count] for i in range(count)]


def pack_bundle(out: Path, spec: BundleSpec, keys: Sequence[Ed25519PrivateKey]) -> Manifest:
    """Write a signed bundle for ``spec`` to ``out`` (replacing it atomically).

    Each distinct key adds one signature. Returns the manifest as a device
    will parse it.

    Raises:
        SignatureError: no signing key was given.
        ManifestError: the spec does not make a valid manifest (bad name,
            format, suffix, timestamp, runtime requirement, duplicate or
            unsafe bundle path, labels not among the files, ...), or the
            ONNX model is not a well-formed ONNX file.
        UnsafeBundleError: the ONNX model uses external data.
        BundleError: a source file is missing, not a regular file, changed
            while packing, or ``out`` cannot be written.
    """
    signers = list({key_id(k.public_key()): k for k in keys}.values())
    if not signers:
        raise SignatureError("at least one signing key is required to pack a bundle")
    plan = _plan(spec)
    sources = {path: _regular_file(src) for path, src in plan.layout.items()}
    if spec.format == "onnx":
        check_no_external_data(sources[plan.model], name=str(spec.model))
    files = {path: FileEntry(*_hash(src)) for path, src in sources.items()}
    manifest = _manifest(spec, plan, files)
    manifest_bytes = manifest.to_json()
    parsed = parse_manifest(manifest_bytes)
    if parsed != manifest:
        raise ManifestError("manifest does not survive a JSON round trip; check the spec's field types")
    signature = sign_document(manifest_bytes, signers)
    _write_tar(out, manifest_bytes, signature, sources, files)
    return parsed


@dataclass(frozen=True)
class _Plan:
    """Where each source file goes in the bundle, and the manifest fields that name them."""

    model: str
    golden: tuple[GoldenCase, ...]
    reference: str
    layout: dict[str, Path]


def _plan(spec: BundleSpec) -> _Plan:
    """Bundle path -> source path, with every path checked and unique."""
    if spec.format not in ("onnx", "tflite"):
        raise ManifestError(f"format {spec.format!r} must be 'onnx' or 'tflite'")
    model = f"model.{spec.format}"
    entries: list[tuple[str, Path]] = [(model, spec.model)]
    golden = []
    for i, case in enumerate(spec.golden):
        in_suffix = _suffix(case.input, GOLDEN_INPUT_SUFFIXES, f"golden[{i}].input")
        out_suffix = _suffix(case.expected, GOLDEN_EXPECTED_SUFFIXES, f"golden[{i}].expected")
        case_in, case_out = f"golden/{i}.input{in_suffix}", f"golden/{i}.expected{out_suffix}"
        entries += [(case_in, case.input), (case_out, case.expected)]
        golden.append(GoldenCase(case_in, case_out, rtol=case.rtol, atol=case.atol))
    reference = ""
    if spec.reference is not None:
        reference = f"reference{spec.reference.suffix.lower()}"
        entries.append((reference, spec.reference))
    entries.extend(spec.extra_files.items())
    layout: dict[str, Path] = {}
    for path, src in entries:
        validate_member_path(path)
        if path in layout or path in (MANIFEST_MEMBER, SIGNATURE_MEMBER):
            raise ManifestError(f"bundle path {path!r} is used twice or is reserved")
        if not _fits_ustar(path):
            raise ManifestError(f"bundle path {path!r} is too long for a USTAR header")
        layout[path] = src
    return _Plan(model, tuple(golden), reference, layout)


def _suffix(path: Path, allowed: tuple[str, ...], key: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise ManifestError(f"{key} {path} must be one of: {', '.join(allowed)}")
    return suffix


def _fits_ustar(path: str) -> bool:
    raw = path.encode()
    if len(raw) <= _USTAR_NAME:
        return True
    # USTAR splits a long name at a '/' into prefix (155) + name (100).
    return any(
        len(raw[:i]) <= _USTAR_PREFIX and len(raw[i + 1 :]) <= _USTAR_NAME
        for i in range(len(raw))
        if raw[i : i + 1] == b"/"
    )


def _regular_file(src: Path) -> Path:
    try:
        # The publisher may point at a symlink (e.g. into a model cache); what
        # gets packed, hashed and re-read is the one file it resolves to.
        real = src.resolve(strict=True)
        mode = real.stat().st_mode
    except OSError as e:
        raise BundleError(f"cannot read {src}: {e.strerror or e}") from e
    if not stat.S_ISREG(mode):
        raise BundleError(f"{src} is not a regular file")
    return real


def _hash(src: Path) -> tuple[str, int]:
    try:
        return sha256_file(src)
    except OSError as e:
        raise BundleError(f"cannot read {src}: {e.strerror or e}") from e


def _manifest(spec: BundleSpec, plan: _Plan, files: dict[str, FileEntry]) -> Manifest:
    created = spec.created if spec.created is not None else format_timestamp(datetime.now(timezone.utc))
    parse_timestamp(created, "created")
    if spec.expires:
        parse_timestamp(spec.expires, "expires")
    if spec.requires.runtime:
        parse_runtime_requirement(spec.requires.runtime)
    return Manifest(
        name=spec.name,
        version=spec.version,
        format=spec.format,
        model=plan.model,
        files=dict(sorted(files.items())),
        inputs=spec.inputs,
        outputs=spec.outputs,
        preprocess=spec.preprocess,
        postprocess=spec.postprocess,
        golden=plan.golden,
        gates=spec.gates,
        reference=plan.reference,
        requires=spec.requires,
        created=created,
        expires=spec.expires,
    )


class _HashingReader:
    """File wrapper that hashes what tarfile copies out of it."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.digest = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self.digest.update(data)
        return data


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = tarfile.REGTYPE
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = _MTIME
    return info


def _write_tar(
    out: Path,
    manifest_bytes: bytes,
    signature: bytes,
    sources: Mapping[str, Path],
    files: Mapping[str, FileEntry],
) -> None:
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as e:
        raise BundleError(f"cannot write bundle {out}: {e.strerror or e}") from e
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                tar.addfile(_tarinfo(MANIFEST_MEMBER, len(manifest_bytes)), io.BytesIO(manifest_bytes))
                tar.addfile(_tarinfo(SIGNATURE_MEMBER, len(signature)), io.BytesIO(signature))
                for path, entry in files.items():
                    _add_payload(tar, path, sources[path], entry)
            raw.flush()
            os.fsync(raw.fileno())
        tmp.chmod(0o644)  # a bundle is public content, not a secret
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, (OSError, tarfile.TarError)):
            raise BundleError(f"cannot write bundle {out}: {getattr(e, 'strerror', None) or e}") from e
        raise


def _add_payload(tar: tarfile.TarFile, path: str, src: Path, entry: FileEntry) -> None:
    changed = BundleError(f"{src} changed while packing; pack again")
    try:
        with open(src, "rb") as fh:
            reader = _HashingReader(fh)
            tar.addfile(_tarinfo(path, entry.size), reader)
    except OSError as e:
        # tarfile raises OSError("unexpected end of data") when the file shrank.
        raise changed from e
    if reader.digest.hexdigest() != entry.sha256:
        raise changed

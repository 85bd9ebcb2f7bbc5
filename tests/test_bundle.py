"""Bundles end to end: pack with real keys and a real model, read them back, and
refuse every hostile or broken variant with one clear line and nothing on disk."""

from __future__ import annotations

import dataclasses
import gzip
import io
import random
import stat
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_helpers import (
    Member,
    encode,
    flip_byte,
    head,
    manifest_doc,
    member_offsets,
    payload_members,
    write_tar,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from onnx import TensorProto, helper

from edge_runtime._util.fsutil import sha256_file
from edge_runtime.bundle import requirements as requirements_check
from edge_runtime.bundle.manifest import Gates, Manifest, Postprocess, Preprocess, Requires, StagedBundle, TensorSpec
from edge_runtime.bundle.manifest_parse import parse_manifest
from edge_runtime.bundle.reader import inspect_bundle, read_bundle
from edge_runtime.bundle.requirements import check_requirements, device_tags
from edge_runtime.bundle.signing import key_id, load_private_key, load_trusted_keys
from edge_runtime.bundle.tar_stream import TarReader
from edge_runtime.bundle.writer import BundleSpec, GoldenSource, pack_bundle
from edge_runtime.config.model import Limits
from edge_runtime.errors import (
    BundleError,
    IncompatibleError,
    IntegrityError,
    ManifestError,
    RollbackError,
    SignatureError,
    SizeLimitError,
    UnsafeBundleError,
)

LABELS = b"0\n180\n"


@dataclass
class Kit:
    """Keys, a real payload and a staging root, plus ways to build and read bundles."""

    tmp: Path
    payload: dict[str, bytes]
    keys: dict[str, Ed25519PrivateKey]
    trusted: dict[str, Ed25519PublicKey]
    staging: Path
    accepted: list[Manifest] = field(default_factory=list)

    def doc(self, **overrides: Any) -> dict[str, Any]:
        return manifest_doc(self.payload, **overrides)

    def head(self, doc: dict[str, Any] | None = None, *signers: str) -> list[Member]:
        return head(encode(doc or self.doc()), [self.keys[s] for s in signers or ("a",)])

    def tar(self, members: list[Member], name: str = "bundle.tar") -> Path:
        return write_tar(self.tmp / name, members)

    def good(self, name: str = "bundle.tar") -> Path:
        return self.tar(self.head() + payload_members(self.payload), name)

    def read(self, path: Path, *, threshold: int = 1, limits: Limits | None = None) -> StagedBundle:
        return read_bundle(
            path,
            trusted=self.trusted,
            threshold=threshold,
            limits=limits or Limits(),
            staging_root=self.staging,
            accept=self.accepted.append,
        )


@pytest.fixture()
def kit(tmp_path: Path, keys: dict[str, Path], zoo: Callable[[str], Path]) -> Kit:
    staging = tmp_path / "staging"
    staging.mkdir()
    return Kit(
        tmp=tmp_path,
        payload={"model.onnx": zoo("ppocr_cls").read_bytes(), "labels.txt": LABELS},
        keys={name: load_private_key(keys[name]) for name in ("a", "b", "evil")},
        trusted=load_trusted_keys(keys["trust_dir"]),
        staging=staging,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# --------------------------------------------------------------------------- pack + read


def make_spec(tmp: Path, model: Path, **overrides: Any) -> BundleSpec:
    src = tmp / "src"
    src.mkdir(exist_ok=True)
    (src / "labels.txt").write_bytes(LABELS)
    np.save(src / "in.npy", np.zeros((1, 3, 48, 192), np.float32))
    np.save(src / "out.npy", np.array([[0.5, 0.5]], np.float32))
    np.savez(src / "ref.npz", mean=np.zeros(2))
    fields: dict[str, Any] = {
        "name": "ppocr-cls",
        "version": 3,
        "format": "onnx",
        "model": model,
        "inputs": (TensorSpec("x", (None, 3, 48, 192), "float32", "NCHW"),),
        "outputs": (TensorSpec("save_infer_model/scale_0.tmp_1", (None, 2), "float32"),),
        "preprocess": Preprocess(size=(48, 192), scale=1 / 255, mean=(0.5,), std=(0.5,)),
        "postprocess": Postprocess(type="classification", labels="labels.txt", top_k=2),
        "extra_files": {"labels.txt": src / "labels.txt"},
        "golden": (GoldenSource(src / "in.npy", src / "out.npy", rtol=1e-2, atol=1e-3),),
        "gates": Gates(latency_ms_p95=50.0),
        "requires": Requires(runtime=">=0.1.0", hardware=("x86_64",)),
        "reference": src / "ref.npz",
        "created": "2025-01-01T00:00:00Z",
        "expires": "2030-01-01T00:00:00Z",
    }
    fields.update(overrides)
    return BundleSpec(**fields)


def test_pack_then_read_round_trips(kit: Kit, zoo: Callable[[str], Path]) -> None:
    out = kit.tmp / "out" / "ppocr.bundle"
    out.parent.mkdir()
    manifest = pack_bundle(out, make_spec(kit.tmp, zoo("ppocr_cls")), [kit.keys["a"], kit.keys["b"]])

    assert manifest.model == "model.onnx"
    assert manifest.golden[0].input == "golden/0.input.npy"
    assert manifest.golden[0].expected == "golden/0.expected.npy"
    assert (manifest.golden[0].rtol, manifest.golden[0].atol) == (1e-2, 1e-3)
    assert manifest.reference == "reference.npz"
    assert manifest.files["model.onnx"].sha256 == sha256_file(zoo("ppocr_cls"))[0]

    staged = kit.read(out, threshold=2)
    assert staged.manifest == manifest
    assert kit.accepted == [manifest]
    assert staged.key_ids == tuple(sorted(key_id(kit.keys[k].public_key()) for k in ("a", "b")))
    assert staged.directory.parent == kit.staging
    assert staged.manifest_bytes == manifest.to_json() == (staged.directory / "manifest.json").read_bytes()
    assert staged.signature_bytes == (staged.directory / "manifest.sig").read_bytes()
    on_disk = sorted(str(p.relative_to(staged.directory)) for p in staged.directory.rglob("*") if p.is_file())
    assert on_disk == sorted([*manifest.files, "manifest.json", "manifest.sig"])
    for path, entry in manifest.files.items():
        assert sha256_file(staged.directory / path) == (entry.sha256, entry.size)
        assert mode(staged.directory / path) == 0o600
    assert mode(staged.directory / "manifest.json") == 0o600
    assert mode(staged.directory) == 0o700
    assert mode(staged.directory / "golden") == 0o700


def test_packed_tar_layout(kit: Kit, zoo: Callable[[str], Path]) -> None:
    out = kit.tmp / "b.tar"
    manifest = pack_bundle(out, make_spec(kit.tmp, zoo("ppocr_cls")), [kit.keys["a"]])
    with tarfile.open(out) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:2]] == ["manifest.json", "manifest.sig"]
    assert sorted(m.name for m in members[2:]) == sorted(manifest.files)
    for m in members:
        assert (m.type, m.mode, m.uid, m.gid, m.mtime) == (tarfile.REGTYPE, 0o644, 0, 0, 0)
    assert out.read_bytes()[257:265] == b"ustar\x0000"
    assert mode(out) == 0o644
    assert [p.name for p in kit.tmp.iterdir() if p.name.endswith(".tmp")] == []


def test_pack_is_reproducible(kit: Kit, zoo: Callable[[str], Path]) -> None:
    spec = make_spec(kit.tmp, zoo("ppocr_cls"))
    pack_bundle(kit.tmp / "one.tar", spec, [kit.keys["a"]])
    pack_bundle(kit.tmp / "two.tar", spec, [kit.keys["a"], kit.keys["a"]])  # same key counts once
    assert (kit.tmp / "one.tar").read_bytes() == (kit.tmp / "two.tar").read_bytes()


def test_pack_tflite_and_default_created(kit: Kit, zoo: Callable[[str], Path]) -> None:
    spec = BundleSpec(name="faces", version=1, format="tflite", model=zoo("face_detection"))
    manifest = pack_bundle(kit.tmp / "f.tar", spec, [kit.keys["b"]])
    assert manifest.model == "model.tflite"
    created = requirements_check.parse_timestamp(manifest.created, "created")
    assert abs(created - datetime.now(timezone.utc)) < timedelta(minutes=5)
    assert kit.read(kit.tmp / "f.tar").manifest == manifest


def external_data_model(path: Path, location: str = "../x") -> Path:
    w = helper.make_tensor("w", TensorProto.FLOAT, [2], [0.0, 0.0])
    del w.float_data[:]
    w.data_location = TensorProto.EXTERNAL
    entry = w.external_data.add()
    entry.key, entry.value = "location", location
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    g = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [], [out], [w])
    path.write_bytes(helper.make_model(g).SerializeToString())
    return path


PACK_REFUSALS: list[tuple[str, Callable[[Path, Path], dict[str, Any]], type[Exception], str]] = [
    ("no-model", lambda t, m: {"model": t / "missing.onnx"}, BundleError, r"cannot read .*missing\.onnx"),
    ("model-is-dir", lambda t, m: {"model": t}, BundleError, r"is not a regular file"),
    ("format", lambda t, m: {"format": "pt"}, ManifestError, r"format 'pt' must be 'onnx' or 'tflite'"),
    ("external-data", lambda t, m: {"model": external_data_model(t / "ext.onnx")}, UnsafeBundleError,
     r"ext\.onnx references external data file '\.\./x'"),
    ("not-onnx", lambda t, m: {"model": t / "src" / "labels.txt"}, ManifestError, r"not a valid ONNX model"),
    ("golden-suffix", lambda t, m: {"golden": (GoldenSource(t / "src" / "in.npy", t / "src" / "labels.txt"),)},
     ManifestError, r"golden\[0\]\.expected .* must be one of: \.npy, \.npz"),
    ("expires", lambda t, m: {"expires": "tomorrow"}, ManifestError, r"expires 'tomorrow' is not an ISO-8601"),
    ("naive-created", lambda t, m: {"created": "2025-01-01T00:00:00"}, ManifestError, r"has no UTC offset"),
    ("runtime", lambda t, m: {"requires": Requires(runtime="~=1.0")}, ManifestError, r"requires\.runtime '~=1\.0'"),
    ("labels-unlisted", lambda t, m: {"extra_files": {}}, ManifestError,
     r"postprocess\.labels 'labels\.txt' is not listed"),
    ("unsafe-extra", lambda t, m: {"extra_files": {"../x": t / "src" / "labels.txt"}}, ManifestError,
     r"'\.\./x' is not a safe relative path"),
    ("reserved-extra", lambda t, m: {"extra_files": {"manifest.sig": t / "src" / "labels.txt"}}, ManifestError,
     r"'manifest\.sig' is used twice or is reserved"),
    ("twice", lambda t, m: {"extra_files": {"model.onnx": t / "src" / "labels.txt"}}, ManifestError,
     r"'model\.onnx' is used twice"),
    ("bad-name", lambda t, m: {"name": "no spaces"}, ManifestError, r"manifest\.name 'no spaces'"),
]


@pytest.mark.parametrize(
    ("change", "exc", "pattern"), [c[1:] for c in PACK_REFUSALS], ids=[c[0] for c in PACK_REFUSALS]
)
def test_pack_refuses(
    kit: Kit,
    zoo: Callable[[str], Path],
    change: Callable[[Path, Path], dict[str, Any]],
    exc: type[Exception],
    pattern: str,
) -> None:
    model = zoo("ppocr_cls")
    spec = make_spec(kit.tmp, model)
    outdir = kit.tmp / "out"
    outdir.mkdir()
    with pytest.raises(exc, match=pattern) as err:
        pack_bundle(outdir / "b.tar", dataclasses.replace(spec, **change(kit.tmp, model)), [kit.keys["a"]])
    assert "\n" not in str(err.value)
    assert list(outdir.iterdir()) == []
    pack_bundle(outdir / "ok.tar", spec, [kit.keys["a"]])  # the change alone causes the refusal


def test_pack_needs_a_key(kit: Kit, zoo: Callable[[str], Path]) -> None:
    with pytest.raises(SignatureError, match="at least one signing key"):
        pack_bundle(kit.tmp / "b.tar", make_spec(kit.tmp, zoo("ppocr_cls")), [])
    assert not (kit.tmp / "b.tar").exists()


def test_pack_detects_a_source_changing_between_passes(
    kit: Kit, zoo: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("edge_runtime.bundle.writer.sha256_file", lambda p: ("0" * 64, sha256_file(p)[1]))
    with pytest.raises(BundleError, match="changed while packing"):
        pack_bundle(kit.tmp / "b.tar", make_spec(kit.tmp, zoo("ppocr_cls")), [kit.keys["a"]])
    assert not (kit.tmp / "b.tar").exists()
    assert [p for p in kit.tmp.iterdir() if p.name.startswith(".b.tar")] == []


# --------------------------------------------------------------------------- read: accepted variants


def test_reads_crafted_good_bundle_and_two_signers(kit: Kit) -> None:
    staged = kit.read(kit.tar(kit.head(None, "a", "b") + payload_members(kit.payload)), threshold=2)
    assert staged.manifest == parse_manifest(encode(kit.doc()))
    assert (staged.directory / "labels.txt").read_bytes() == LABELS


def test_reads_gnu_and_pax_archives(kit: Kit) -> None:
    members = kit.head() + payload_members(kit.payload)
    write_tar(kit.tmp / "gnu.tar", members, fmt=tarfile.GNU_FORMAT)
    assert (kit.tmp / "gnu.tar").read_bytes()[257:265] == b"ustar  \x00"
    kit.read(kit.tmp / "gnu.tar")
    # A pax 'path' overrides the USTAR name; 'mtime'/'uname' are harmless.
    members[-1] = Member("decoy", LABELS, pax={"path": "labels.txt", "mtime": "1.5", "uname": "x"})
    staged = kit.read(kit.tar(members, "pax.tar"))
    assert (staged.directory / "labels.txt").read_bytes() == LABELS
    assert not (staged.directory / "decoy").exists()


# --------------------------------------------------------------------------- read: refusals


def flip_in(member: str, where: Callable[[int], int]) -> Callable[[Kit], Path]:
    def build(k: Kit) -> Path:
        path = k.good()
        _, data_at, size = member_offsets(path)[member]
        return flip_byte(path, data_at + where(size))

    return build


def flipped_signature(k: Kit) -> Path:
    """Change one base64 character of the signature to another valid one."""
    path = k.good()
    _, data_at, _ = member_offsets(path)["manifest.sig"]
    raw = bytearray(path.read_bytes())
    at = raw.index(b'"sig": "', data_at) + len(b'"sig": "') + 20
    raw[at] = ord("A") if raw[at] != ord("A") else ord("B")
    path.write_bytes(bytes(raw))
    return path


def truncate_at(offset: Callable[[dict[str, tuple[int, int, int]], int], int]) -> Callable[[Kit], Path]:
    def build(k: Kit) -> Path:
        path = k.good()
        data = path.read_bytes()
        path.write_bytes(data[: offset(member_offsets(path), len(data))])
        return path

    return build


def end_of_data(offsets: dict[str, tuple[int, int, int]]) -> int:
    _, data_at, size = offsets["labels.txt"]
    return data_at + -(-size // 512) * 512


def with_members(change: Callable[[Kit, list[Member]], list[Member]]) -> Callable[[Kit], Path]:
    return lambda k: k.tar(change(k, k.head() + payload_members(k.payload)))


def appended(*extra: Member) -> Callable[[Kit], Path]:
    """The good bundle plus ``extra`` after the payload (already staged by then)."""
    return with_members(lambda k, ms: [*ms, *extra])


def swapped(name: str, new: Member) -> Callable[[Kit], Path]:
    return with_members(lambda k, ms: [new if m.name == name else m for m in ms])


def special(name: str, kind: bytes) -> Member:
    return Member(name, type=kind, linkname="/etc/passwd")


def raw_file(make: Callable[[Kit], bytes]) -> Callable[[Kit], Path]:
    def build(k: Kit) -> Path:
        path = k.tmp / "bundle.tar"
        path.write_bytes(make(k))
        return path

    return build


def zip_of(k: Kit) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("manifest.json", encode(k.doc()))
    return buf.getvalue()


def with_model(model: Callable[[Kit], bytes]) -> Callable[[Kit], Path]:
    """A validly signed and hashed bundle around another model file."""

    def build(k: Kit) -> Path:
        payload = {"model.onnx": model(k), "labels.txt": LABELS}
        return k.tar(k.head(manifest_doc(payload)) + payload_members(payload))

    return build


def colliding_paths(k: Kit) -> Path:
    payload = {**k.payload, "golden": b"x", "golden/a.npy": b"y"}
    return k.tar(k.head(manifest_doc(payload)) + payload_members(payload))


def over_declared_total(k: Kit) -> Path:
    doc = k.doc()
    doc["files"]["labels.txt"]["size"] = 3_000_000
    return k.tar(k.head(doc) + payload_members(k.payload))


SMALL = Limits(max_bundle_bytes=2_000_000)

# (id, build, read kwargs, error type, message pattern)
REFUSALS: list[tuple[str, Callable[[Kit], Path], dict[str, Any], type[Exception], str]] = [
    # Content tampering: each layer names what it caught.
    ("flip-model", flip_in("model.onnx", lambda n: n // 2), {}, IntegrityError,
     r"member 'model\.onnx' does not match its sha256"),
    ("flip-manifest", flip_in("manifest.json", lambda n: n // 2), {}, SignatureError,
     r"signature by key [0-9a-f]{16} does not match the signed content"),
    ("flip-signature", flipped_signature, {}, SignatureError, r"does not match the signed content"),
    # Trust.
    ("untrusted", lambda k: k.tar(k.head(None, "evil") + payload_members(k.payload)), {}, SignatureError,
     r"^0 valid trusted signature\(s\), 1 required; untrusted key\(s\): [0-9a-f]{16}$"),
    ("threshold-one-key", lambda k: k.good(), {"threshold": 2}, SignatureError,
     r"^1 valid trusted signature\(s\), 2 required$"),
    ("threshold-same-key-twice", lambda k: k.tar(k.head(None, "a", "a") + payload_members(k.payload)),
     {"threshold": 2}, SignatureError, r"^1 valid trusted signature\(s\), 2 required$"),
    ("threshold-zero", lambda k: k.tar(k.head(None, "evil") + payload_members(k.payload)), {"threshold": 0},
     SignatureError, r"threshold must be at least 1"),
    # Member safety (the defect comes after real payload was staged).
    ("dotdot", appended(Member("../x", b"x")), {}, UnsafeBundleError, r"member '\.\./x' has an unsafe path"),
    ("absolute", appended(Member("/etc/x", b"x")), {}, UnsafeBundleError, r"member '/etc/x' has an unsafe path"),
    ("symlink", swapped("model.onnx", special("model.onnx", tarfile.SYMTYPE)), {}, UnsafeBundleError,
     r"member 'model\.onnx' is a symbolic link; only regular files are allowed"),
    ("hardlink", swapped("model.onnx", special("model.onnx", tarfile.LNKTYPE)), {}, UnsafeBundleError,
     r"member 'model\.onnx' is a hard link"),
    ("chardev", swapped("model.onnx", special("model.onnx", tarfile.CHRTYPE)), {}, UnsafeBundleError,
     r"member 'model\.onnx' is a character device"),
    ("blockdev", appended(special("sda", tarfile.BLKTYPE)), {}, UnsafeBundleError, r"member 'sda' is a block device"),
    ("fifo", appended(special("pipe", tarfile.FIFOTYPE)), {}, UnsafeBundleError, r"member 'pipe' is a FIFO"),
    ("directory", appended(special("golden", tarfile.DIRTYPE)), {}, UnsafeBundleError,
     r"member 'golden/' is a directory"),
    ("duplicate", with_members(lambda k, ms: [*ms, ms[2]]), {}, UnsafeBundleError,
     r"member 'model\.onnx' appears twice"),
    ("duplicate-manifest", with_members(lambda k, ms: [*ms, ms[0]]), {}, UnsafeBundleError,
     r"member 'manifest\.json' appears twice"),
    ("unlisted", appended(Member("run.sh", b"#!/bin/sh")), {}, UnsafeBundleError,
     r"member 'run\.sh' is not listed in the manifest"),
    ("collision", colliding_paths, {}, UnsafeBundleError, r"member 'golden/a\.npy' collides"),
    # Sizes.
    ("larger-than-declared", swapped("labels.txt", Member("labels.txt", LABELS + b"extra")), {}, SizeLimitError,
     r"member 'labels\.txt' is 11 bytes, larger than the 6 bytes declared"),
    ("smaller-than-declared", swapped("labels.txt", Member("labels.txt", LABELS[:3])), {}, IntegrityError,
     r"member 'labels\.txt' is 3 bytes, manifest declares 6"),
    ("missing", with_members(lambda k, ms: ms[:-1]), {}, IntegrityError,
     r"bundle is missing 'labels\.txt', which the manifest lists"),
    ("total-over-cap", over_declared_total, {"limits": SMALL}, SizeLimitError,
     r"manifest declares \d+ bytes of payload, over the 2000000-byte cap"),
    ("file-over-cap", lambda k: k.good(), {"limits": Limits(max_bundle_bytes=4096)}, SizeLimitError,
     r"bundle .*bundle\.tar is \d+ bytes, over the 4096-byte cap"),
    ("manifest-over-cap", lambda k: k.good(), {"limits": Limits(max_manifest_bytes=256)}, SizeLimitError,
     r"manifest\.json is \d+ bytes, over the 256-byte cap"),
    ("signature-over-cap", lambda k: k.good(), {"limits": Limits(max_signature_bytes=128)}, SizeLimitError,
     r"manifest\.sig is \d+ bytes, over the 128-byte cap"),
    # Structure.
    ("signature-first", with_members(lambda k, ms: [ms[1], ms[0], *ms[2:]]), {}, ManifestError,
     r"first member must be manifest\.json, found 'manifest\.sig'"),
    ("model-first", with_members(lambda k, ms: [ms[2], *ms[:2], *ms[3:]]), {}, ManifestError,
     r"first member must be manifest\.json, found 'model\.onnx'"),
    ("no-signature", with_members(lambda k, ms: [ms[0], *ms[2:]]), {}, ManifestError,
     r"second member must be manifest\.sig, found 'model\.onnx'"),
    ("manifest-symlink", swapped("manifest.json", special("manifest.json", tarfile.SYMTYPE)), {},
     UnsafeBundleError, r"manifest\.json is a symbolic link, not a regular file"),
    ("empty-archive", lambda k: k.tar([]), {}, ManifestError, r"bundle has no manifest\.json"),
    ("truncated-in-header", truncate_at(lambda o, n: o["manifest.sig"][0] + 100), {}, BundleError,
     r"truncated: archive ends inside the header at byte"),
    ("truncated-in-manifest", truncate_at(lambda o, n: o["manifest.json"][1] + 10), {}, BundleError,
     r"truncated: member 'manifest\.json' needs"),
    ("truncated-in-payload", truncate_at(lambda o, n: o["model.onnx"][1] + 4096), {}, BundleError,
     r"truncated: member 'model\.onnx' needs \d+ bytes"),
    ("truncated-no-end-marker", truncate_at(lambda o, n: end_of_data(o)), {}, BundleError,
     r"truncated: archive ends inside the header at byte"),
    ("truncated-half-end-marker", truncate_at(lambda o, n: end_of_data(o) + 512), {}, BundleError,
     r"truncated: archive ends inside the end-of-archive marker"),
    ("corrupt-later-header", flip_in("labels.txt", lambda n: -512 + 3), {},
     BundleError, r"corrupt tar: bad header checksum or magic at byte \d+"),
    ("random-bytes", raw_file(lambda k: random.Random(1).randbytes(8192)), {}, BundleError, r"not a tar archive"),
    ("gzip", raw_file(lambda k: gzip.compress(k.good("inner.tar").read_bytes())), {}, BundleError,
     r"not a tar archive"),
    ("zip", raw_file(zip_of), {}, BundleError, r"not a tar archive"),
    ("tiny", raw_file(lambda k: b"manifest.json"), {}, BundleError, r"not a tar archive \(13 bytes"),
    ("empty-file", raw_file(lambda k: b""), {}, BundleError, r"is an empty file, not a bundle"),
    # pax / GNU extensions.
    ("huge-pax-before-manifest", with_members(lambda k, ms: [
        Member("manifest.json", ms[0].data, pax={"comment": "x" * 70_000}), *ms[1:]]),
     {}, SizeLimitError, r"pax header at byte 0 is \d+ bytes, over the 65536-byte cap"),
    ("pax-sparse", swapped("labels.txt", Member("labels.txt", LABELS, pax={"GNU.sparse.size": "6"})), {},
     UnsafeBundleError, r"pax keyword 'GNU\.sparse\.size' in the header at byte \d+ is not supported"),
    ("gnu-longname", lambda k: write_tar(k.tmp / "bundle.tar", [*k.head(), *payload_members(k.payload),
                                                                 Member("a" * 120, b"x")], fmt=tarfile.GNU_FORMAT),
     {}, UnsafeBundleError, r"unsupported tar type 'L'"),
    # The manifest itself (validly signed, so parse_manifest is the layer that refuses).
    ("manifest-unknown-key", lambda k: k.tar(k.head(k.doc(evil=1)) + payload_members(k.payload)), {},
     ManifestError, r"manifest has unknown key 'evil'"),
    ("manifest-missing-field", lambda k: k.tar(k.head({x: v for x, v in k.doc().items() if x != "version"})
                                               + payload_members(k.payload)), {},
     ManifestError, r"manifest\.version is required"),
    ("manifest-not-json", lambda k: k.tar(head(b"{not json", [k.keys["a"]]) + payload_members(k.payload)), {},
     ManifestError, r"manifest is not valid JSON"),
    # The model (validly signed and hashed): defence in depth after staging.
    ("onnx-external-data", with_model(lambda k: external_data_model(k.tmp / "x.onnx").read_bytes()), {},
     UnsafeBundleError,
     r"^model\.onnx references external data file '\.\./x'; external data is not allowed "
     r"\(path traversal risk, CVE-2022-25882\)$"),
    ("onnx-garbage", with_model(lambda k: b"\xff" * 64), {}, ManifestError,
     r"model\.onnx: not a valid ONNX model"),
]


@pytest.mark.parametrize(
    ("build", "read_kwargs", "exc", "pattern"), [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS]
)
def test_read_refuses_and_writes_nothing(
    kit: Kit, build: Callable[[Kit], Path], read_kwargs: dict[str, Any], exc: type[Exception], pattern: str
) -> None:
    path = build(kit)
    with pytest.raises(exc, match=pattern) as err:
        kit.read(path, **read_kwargs)
    assert type(err.value) is exc
    assert "\n" not in str(err.value)
    assert list(kit.staging.iterdir()) == []


def test_baseline_of_the_refusal_table_is_accepted(kit: Kit) -> None:
    """Guard for the table: the baseline it mutates is itself accepted."""
    kit.read(kit.good())
    assert len(list(kit.staging.iterdir())) == 1


def test_signature_is_checked_before_anything_else(kit: Kit) -> None:
    # A manifest that would fail parsing and an unsafe member: the untrusted
    # signature is what gets reported, and accept() never sees the manifest.
    members = [*head(b"{not json", [kit.keys["evil"]]), Member("../x", b"x")]
    with pytest.raises(SignatureError):
        kit.read(kit.tar(members))
    assert kit.accepted == []


def test_accept_hook_runs_before_any_payload_is_written(kit: Kit) -> None:
    def refuse(manifest: Manifest) -> None:
        kit.accepted.append(manifest)
        raise RollbackError(f"{manifest.name} v{manifest.version} is not above the installed v3")

    with pytest.raises(RollbackError, match=r"ppocr-cls v3 is not above the installed v3"):
        read_bundle(kit.good(), trusted=kit.trusted, threshold=1, limits=Limits(),
                    staging_root=kit.staging, accept=refuse)
    assert [m.version for m in kit.accepted] == [3]
    assert list(kit.staging.iterdir()) == []


def test_staging_root_that_is_a_symlink_is_refused(kit: Kit) -> None:
    target = kit.tmp / "elsewhere"
    target.mkdir()
    link = kit.tmp / "link"
    link.symlink_to(target)
    with pytest.raises(BundleError, match="cannot create a staging dir"):
        read_bundle(kit.good(), trusted=kit.trusted, threshold=1, limits=Limits(), staging_root=link)
    assert list(target.iterdir()) == []


def test_inspect_reads_only_the_head(kit: Kit) -> None:
    path = kit.tar(kit.head(None, "a", "evil") + payload_members(kit.payload))
    info = inspect_bundle(path, Limits())
    assert info.manifest_bytes == encode(kit.doc())
    assert info.signer_key_ids == tuple(key_id(kit.keys[k].public_key()) for k in ("a", "evil"))
    assert info.manifest().name == "ppocr-cls"
    assert info.size == path.stat().st_size
    # The payload is never looked at: a corrupt member after the head is fine.
    truncated = kit.tmp / "cut.tar"
    truncated.write_bytes(path.read_bytes()[: member_offsets(path)["model.onnx"][1] + 10])
    assert inspect_bundle(truncated, Limits()).manifest_bytes == info.manifest_bytes
    with pytest.raises(SignatureError, match="not a signature document"):
        inspect_bundle(kit.tar([Member("manifest.json", b"{}"), Member("manifest.sig", b"[]")]), Limits())


# --------------------------------------------------------------------------- tar_stream details


class CountingReader(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.consumed = 0

    def read(self, n: int | None = -1) -> bytes:
        data = super().read(n)
        self.consumed += len(data)
        return data


def test_oversized_pax_header_is_refused_without_reading_it(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "t.tar", [Member("manifest.json", b"{}", pax={"comment": "x" * 200_000})])
    data = path.read_bytes()
    fh = CountingReader(data)
    with pytest.raises(SizeLimitError, match="over the 65536-byte cap"):
        TarReader(fh, len(data)).next()
    assert fh.consumed <= 512


def with_size_field(data: bytes, field_bytes: bytes) -> bytes:
    """Rewrite the first header's size field and fix its checksum."""
    header = bytearray(data[:512])
    header[124:136] = field_bytes
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header) + data[512:]


def test_base256_sizes(tmp_path: Path) -> None:
    data = write_tar(tmp_path / "t.tar", [Member("labels.txt", LABELS)]).read_bytes()
    good = with_size_field(data, b"\x80" + len(LABELS).to_bytes(11, "big"))
    reader = TarReader(io.BytesIO(good), len(good))
    member = reader.next()
    assert member is not None and (member.name, member.size) == ("labels.txt", 6)
    assert reader.read_all() == LABELS
    assert reader.next() is None
    negative = with_size_field(data, b"\xff" * 12)
    with pytest.raises(BundleError, match="negative or invalid size"):
        TarReader(io.BytesIO(negative), len(negative)).next()


def test_long_names_use_the_ustar_prefix(tmp_path: Path) -> None:
    name = "d" * 60 + "/" + "f" * 90
    data = write_tar(tmp_path / "t.tar", [Member(name, b"x")]).read_bytes()
    assert data[345:405] == b"d" * 60  # tarfile put the directory in the prefix field
    member = TarReader(io.BytesIO(data), len(data)).next()
    assert member is not None and member.name == name


# --------------------------------------------------------------------------- requirements


NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


def req_manifest(**changes: Any) -> Manifest:
    doc = manifest_doc({"model.onnx": b"m"}, postprocess={}, **changes)
    return parse_manifest(encode(doc))


@pytest.mark.parametrize(
    ("changes", "runtime", "error"),
    [
        ({"requires": {"runtime": ">=0.1.0"}}, "0.1.0", ""),
        ({"requires": {"runtime": ">=0.1"}}, "0.1.0", ""),
        ({"requires": {"runtime": "0.2.0"}}, "0.10.0", ""),  # integer, not string, comparison
        ({"requires": {"runtime": ">=0.2.0"}}, "0.10.0.dev1", ""),
        ({"requires": {"runtime": ">=0.10.0"}}, "0.9.9", r"requires runtime >=0\.10\.0, this device runs 0\.9\.9"),
        ({"requires": {"runtime": "==0.1.0"}}, "0.1.0", ""),
        ({"requires": {"runtime": "==0.1"}}, "0.1.0", ""),  # missing parts count as 0
        ({"requires": {"runtime": ">=0.1.0"}}, "0.1", ""),
        ({"requires": {"runtime": "==0.1.0"}}, "0.1.1", r"requires runtime ==0\.1\.0"),
        ({"requires": {"hardware": ["x86_64"]}}, "0.1.0", ""),
        ({"requires": {"hardware": ["x86_64", "cuda"]}}, "0.1.0", r"requires hardware cuda; this device has x86_64"),
        ({"expires": "2026-06-01T12:00:01Z"}, "0.1.0", ""),
        ({"expires": "2026-06-01T12:00:00Z"}, "0.1.0", r"expired at 2026-06-01T12:00:00Z"),
        ({"expires": "2026-06-01T13:00:00+02:00"}, "0.1.0", r"expired at 2026-06-01T11:00:00Z"),
        ({"created": "2027-01-01T00:00:00Z"}, "0.1.0", ""),  # future created: clock may be behind
    ],
)
def test_check_requirements(changes: dict[str, Any], runtime: str, error: str) -> None:
    manifest = req_manifest(**changes)
    if not error:
        check_requirements(manifest, device_tags={"x86_64"}, runtime_version=runtime, now=NOW)
        return
    with pytest.raises(IncompatibleError, match=error):
        check_requirements(manifest, device_tags={"x86_64"}, runtime_version=runtime, now=NOW)


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"requires": {"runtime": ">0.1"}}, r"requires\.runtime '>0\.1' must be"),
        ({"expires": "next week"}, r"manifest\.expires 'next week' is not an ISO-8601 timestamp"),
        ({"expires": "2026-01-01T00:00:00"}, r"manifest\.expires .* has no UTC offset"),
        ({"created": "yesterday"}, r"manifest\.created 'yesterday'"),
    ],
)
def test_malformed_requirements_are_manifest_errors(changes: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ManifestError, match=pattern):
        check_requirements(req_manifest(**changes), device_tags=set(), runtime_version="1.0.0", now=NOW)


@pytest.mark.parametrize(
    ("machine", "tags"),
    [("aarch64", {"aarch64"}), ("arm64", {"aarch64"}), ("AMD64", {"x86_64"}), ("x86_64", {"x86_64"}),
     ("armv7l", {"armv7l"}), ("", set())],
)
def test_device_tags(monkeypatch: pytest.MonkeyPatch, machine: str, tags: set[str]) -> None:
    monkeypatch.setattr("platform.machine", lambda: machine)
    assert device_tags() == tags


def test_library_does_not_import_onnx() -> None:
    """The onnx package is a dev dependency; devices scan models without it."""
    code = (
        "import sys, edge_runtime.bundle.reader, edge_runtime.bundle.writer, edge_runtime.bundle.onnx_external;"
        "print('onnx' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"

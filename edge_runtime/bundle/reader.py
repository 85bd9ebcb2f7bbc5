"""Read a signed model bundle: verify first, then stream the payload into staging.

A bundle is one uncompressed tar: ``manifest.json``, then ``manifest.sig``,
then the payload files the manifest lists. :func:`read_bundle` enforces, in
this order, so that nothing reaches the disk before it is trusted:

1. the file is a regular file, not empty, within ``limits.max_bundle_bytes``;
2. the first two members are exactly ``manifest.json`` and ``manifest.sig``,
   regular files within their caps (only these two are held in memory);
3. ``threshold`` distinct trusted keys signed the exact manifest bytes;
4. the manifest parses and its declared payload fits the cap;
5. the caller's ``accept(manifest)`` hook (anti-rollback floor, device
   requirements) does not raise;
6. each further member is a regular file with a safe, listed, not yet seen
   name and exactly its declared size; it is streamed into a fresh 0700
   staging dir (files 0600, O_EXCL|O_NOFOLLOW) and hashed on the way;
7. every listed file arrived, and an ONNX model has no external data.

Any failure removes the staging dir, so a refused bundle leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime._util.fsutil import CLOEXEC, create_exclusive, fsync_dir, make_private_dir, remove_tree
from edge_runtime._util.strict_text import load_json
from edge_runtime.bundle.manifest import Manifest, StagedBundle, validate_member_path
from edge_runtime.bundle.manifest_parse import parse_manifest
from edge_runtime.bundle.onnx_external import check_no_external_data
from edge_runtime.bundle.signing import verify_threshold
from edge_runtime.bundle.staging_owner import owner_tag
from edge_runtime.bundle.tar_stream import MemberKind, TarMember, TarReader
from edge_runtime.config.model import Limits
from edge_runtime.errors import (
    BundleError,
    IntegrityError,
    ManifestError,
    SignatureError,
    SizeLimitError,
    UnsafeBundleError,
)

__all__ = [
    "MANIFEST_MEMBER",
    "SIGNATURE_MEMBER",
    "BundleInfo",
    "inspect_bundle",
    "read_bundle",
]

MANIFEST_MEMBER = "manifest.json"
SIGNATURE_MEMBER = "manifest.sig"
_STAGING_PREFIX = "bundle-"


@dataclass(frozen=True)
class BundleInfo:
    """The signed head of a bundle, read without trusting it (``bundle inspect``).

    ``signer_key_ids`` are the key ids the signature document lists, in order;
    they are *not* verified. ``size`` is the bundle file size in bytes.
    """

    manifest_bytes: bytes
    signature_bytes: bytes
    signer_key_ids: tuple[str, ...]
    size: int
    member: bytes | None = None
    """The member asked for with ``inspect_bundle(member=...)``, when present and within its cap."""

    def manifest(self) -> Manifest:
        """The parsed manifest; raises ManifestError if it is invalid."""
        return parse_manifest(self.manifest_bytes)


@contextlib.contextmanager
def _open_bundle(path: Path, limits: Limits) -> Iterator[tuple[BinaryIO, int]]:
    """Open ``path`` and check its size from fstat before reading a byte."""
    # O_NONBLOCK: opening a FIFO planted at the path must not hang the daemon.
    flags = os.O_RDONLY | CLOEXEC | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise BundleError(f"cannot open bundle {path}: {e.strerror or e}") from e
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{path} is not a regular file, not a bundle")
        if st.st_size == 0:
            raise BundleError(f"{path} is an empty file, not a bundle")
        if st.st_size > limits.max_bundle_bytes:
            raise SizeLimitError(
                f"bundle {path} is {st.st_size} bytes, over the {limits.max_bundle_bytes}-byte cap"
            )
        yield fh, st.st_size


def _head_member(reader: TarReader, name: str, cap: int, position: str) -> bytes:
    member = reader.next()
    if member is None:
        raise ManifestError(f"bundle has no {name} ({position} member expected)")
    if member.name != name:
        raise ManifestError(f"bundle's {position} member must be {name}, found {member.name!r}")
    if member.kind is not MemberKind.REGULAR:
        raise UnsafeBundleError(f"{name} is a {member.kind.value}, not a regular file")
    if member.size > cap:
        raise SizeLimitError(f"{name} is {member.size} bytes, over the {cap}-byte cap")
    return reader.read_all()


def _read_head(reader: TarReader, limits: Limits) -> tuple[bytes, bytes]:
    manifest_bytes = _head_member(reader, MANIFEST_MEMBER, limits.max_manifest_bytes, "first")
    signature_bytes = _head_member(reader, SIGNATURE_MEMBER, limits.max_signature_bytes, "second")
    return manifest_bytes, signature_bytes


def inspect_bundle(path: Path, limits: Limits, *, member: str = "", member_cap: int = 0) -> BundleInfo:
    """Read only the manifest and signature document of a bundle, trusting nothing.

    With ``member``, that payload file too (a regular file of at most
    ``member_cap`` bytes; otherwise ``BundleInfo.member`` stays None).

    Raises:
        BundleError: unreadable, empty, not a tar, or truncated.
        SizeLimitError: the file, manifest or signature is over its cap.
        ManifestError: the first two members are not manifest.json, manifest.sig.
        SignatureError: the signature document is not strict JSON listing signatures.
    """
    extra = None
    with _open_bundle(path, limits) as (fh, size):
        reader = TarReader(fh, size)
        manifest_bytes, signature_bytes = _read_head(reader, limits)
        while member and (found := reader.next()) is not None:
            if found.name == member:
                if found.kind is MemberKind.REGULAR and found.size <= member_cap:
                    extra = reader.read_all()
                break
    doc = load_json(signature_bytes, "manifest.sig", error=SignatureError)
    try:
        key_ids = tuple(str(entry["keyid"]) for entry in doc["signatures"])
    except (KeyError, TypeError) as e:
        raise SignatureError("manifest.sig is not a signature document") from e
    return BundleInfo(manifest_bytes, signature_bytes, key_ids, size, extra)


def read_bundle(
    path: Path,
    *,
    trusted: Mapping[str, Ed25519PublicKey],
    threshold: int,
    limits: Limits,
    staging_root: Path,
    accept: Callable[[Manifest], None] | None = None,
) -> StagedBundle:
    """Verify the bundle at ``path`` and unpack it into a new dir under ``staging_root``.

    See the module docstring for the order of checks. ``accept`` is called with
    the verified manifest before anything is written; whatever it raises
    propagates unchanged. The returned ``directory`` is owned by the caller
    (rename it into the cache, or remove it).

    Raises:
        SignatureError: fewer than ``threshold`` valid trusted signatures, or
            an invalid one (also raised for ``threshold`` < 1).
        ManifestError: manifest missing, out of place, or invalid.
        UnsafeBundleError: a member is a link/device/dir/FIFO, has an unsafe
            path, is duplicated or unlisted; the ONNX model uses external data.
        SizeLimitError: the file, manifest, signature, a member or the total
            payload is over its cap or larger than declared.
        IntegrityError: a member's size or sha256 differs from the manifest,
            or a listed file is missing.
        BundleError: unreadable, empty, not a tar archive, truncated, or the
            staging dir cannot be written.
    """
    if threshold < 1:
        raise SignatureError(f"signature threshold must be at least 1, got {threshold}")
    with _open_bundle(path, limits) as (fh, size):
        reader = TarReader(fh, size)
        manifest_bytes, signature_bytes = _read_head(reader, limits)
        key_ids = verify_threshold(manifest_bytes, signature_bytes, trusted, threshold)
        manifest = parse_manifest(manifest_bytes)
        declared = sum(entry.size for entry in manifest.files.values())
        if declared > limits.max_bundle_bytes:
            raise SizeLimitError(
                f"manifest declares {declared} bytes of payload, over the "
                f"{limits.max_bundle_bytes}-byte cap"
            )
        if accept is not None:
            accept(manifest)
        directory = _new_staging_dir(staging_root)
        try:
            _Stager(directory, manifest, limits).extract(reader)
            for name, data in ((MANIFEST_MEMBER, manifest_bytes), (SIGNATURE_MEMBER, signature_bytes)):
                with create_exclusive(directory / name) as out:
                    out.write(data)
            if manifest.format == "onnx":
                check_no_external_data(directory / manifest.model, name=manifest.model)
            fsync_dir(directory)
            fsync_dir(staging_root)
        except BaseException as e:
            # A failed cleanup must not hide why the bundle was refused; the
            # cache empties staging/ at start anyway.
            with contextlib.suppress(OSError):
                remove_tree(directory)
            if isinstance(e, OSError):
                raise BundleError(f"cannot write staging dir {directory}: {e.strerror or e}") from e
            raise
    return StagedBundle(manifest, manifest_bytes, signature_bytes, directory, tuple(key_ids))


def _new_staging_dir(staging_root: Path) -> Path:
    try:
        make_private_dir(staging_root)
        # mkdtemp: a unique name created with O_EXCL semantics and mode 0700.
        # The owner in the name: a sweep by another process keeps it while we live.
        return Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}.{owner_tag()}.", dir=staging_root))
    except OSError as e:
        raise BundleError(f"cannot create a staging dir under {staging_root}: {e.strerror or e}") from e


class _Stager:
    """Checks each payload member against the manifest and writes it to staging."""

    def __init__(self, directory: Path, manifest: Manifest, limits: Limits) -> None:
        self.directory = directory
        self.manifest = manifest
        self.limits = limits
        self.seen = {MANIFEST_MEMBER, SIGNATURE_MEMBER}
        self.dirs: list[Path] = []
        self.total = 0

    def extract(self, reader: TarReader) -> None:
        while (member := reader.next()) is not None:
            self._check(member)
            self.seen.add(member.name)
            self.total += member.size
            if self.total > self.limits.max_bundle_bytes:
                raise SizeLimitError(
                    f"payload exceeds the {self.limits.max_bundle_bytes}-byte cap at member {member.name!r}"
                )
            self._write(member, reader)
        missing = sorted(set(self.manifest.files) - self.seen)
        if missing:
            raise IntegrityError(f"bundle is missing {missing[0]!r}, which the manifest lists")
        for path in self.dirs:
            fsync_dir(path)

    def _check(self, member: TarMember) -> None:
        name = member.name
        if member.kind is not MemberKind.REGULAR:
            raise UnsafeBundleError(
                f"member {name!r} is a {member.kind.value}; only regular files are allowed"
            )
        if name in self.seen:
            raise UnsafeBundleError(f"member {name!r} appears twice in the bundle")
        try:
            validate_member_path(name)
        except ManifestError as e:
            raise UnsafeBundleError(
                f"member {name!r} has an unsafe path (absolute, '..', or odd characters)"
            ) from e
        entry = self.manifest.files.get(name)
        if entry is None:
            raise UnsafeBundleError(f"member {name!r} is not listed in the manifest")
        if member.size > entry.size:
            raise SizeLimitError(
                f"member {name!r} is {member.size} bytes, larger than the {entry.size} bytes declared"
            )
        if member.size != entry.size:
            raise IntegrityError(f"member {name!r} is {member.size} bytes, manifest declares {entry.size}")

    def _write(self, member: TarMember, reader: TarReader) -> None:
        name = member.name
        digest = hashlib.sha256()
        try:
            target = self._parent_dirs(name) / name.rsplit("/", 1)[-1]
            with create_exclusive(target) as out:
                for chunk in reader.chunks():
                    digest.update(chunk)
                    out.write(chunk)
        except (FileExistsError, NotADirectoryError) as e:
            raise UnsafeBundleError(f"member {name!r} collides with another file or directory") from e
        except OSError as e:
            raise BundleError(f"cannot write {name!r} to staging: {e.strerror or e}") from e
        if digest.hexdigest() != self.manifest.files[name].sha256:
            raise IntegrityError(f"member {name!r} does not match its sha256 in the manifest")

    def _parent_dirs(self, name: str) -> Path:
        parent = self.directory
        for part in name.split("/")[:-1]:
            parent = parent / part
            if parent not in self.dirs:
                # mkdir refuses anything already there (file or planted link).
                parent.mkdir(mode=0o700)
                self.dirs.append(parent)
        return parent

"""Craft bundles for tests, good and hostile, with the stdlib tarfile *writer*.

Only the reader must avoid tarfile; writing odd archives with it is how each
test plants exactly one defect.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.bundle.signing import sign_document


@dataclass
class Member:
    """One tar member to write: a regular file unless ``type`` says otherwise.

    ``pax`` adds pax keywords (forces PAX format for the whole archive).
    """

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    pax: dict[str, str] = field(default_factory=dict)


def write_tar(path: Path, members: Sequence[Member], *, fmt: int = tarfile.USTAR_FORMAT) -> Path:
    """Write ``members`` in order; any pax keywords switch to PAX format."""
    if any(m.pax for m in members):
        fmt = tarfile.PAX_FORMAT
    with tarfile.open(path, "w", format=fmt) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = m.type
            info.linkname = m.linkname
            info.pax_headers = dict(m.pax)
            if m.type == tarfile.REGTYPE:
                info.size = len(m.data)
                tar.addfile(info, io.BytesIO(m.data))
            else:
                tar.addfile(info)
    return path


def manifest_doc(payload: Mapping[str, bytes], **overrides: Any) -> dict[str, Any]:
    """A valid manifest document listing ``payload`` (model.onnx, labels.txt)."""
    doc: dict[str, Any] = {
        "schema": 1,
        "name": "ppocr-cls",
        "version": 3,
        "format": "onnx",
        "model": "model.onnx",
        "files": {
            path: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for path, data in payload.items()
        },
        "postprocess": {"type": "classification", "labels": "labels.txt", "top_k": 2},
        "created": "2025-01-01T00:00:00Z",
    }
    doc.update(overrides)
    return doc


def encode(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def head(manifest_bytes: bytes, signers: Sequence[Ed25519PrivateKey]) -> list[Member]:
    """manifest.json and manifest.sig members, signed by ``signers``."""
    return [
        Member("manifest.json", manifest_bytes),
        Member("manifest.sig", sign_document(manifest_bytes, list(signers))),
    ]


def payload_members(payload: Mapping[str, bytes]) -> list[Member]:
    return [Member(name, data) for name, data in payload.items()]


def member_offsets(path: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (header offset, data offset, size), as the tarfile reader sees it."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data, m.size) for m in tar.getmembers()}


def flip_byte(path: Path, offset: int) -> Path:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    return path

"""The publisher keys a TUF repository delivers: ``trust/publisher-keys.json``, a target like any bundle.

The bundle manifests' own signatures stay a second, independent check beside TUF.
The keys that verify them are delivered, and rotated, through the repository, so
no key on a device is ever replaced by hand::

    {"format": "edge-runtime-publisher-keys/1", "threshold": 1,
     "keys": ["-----BEGIN PUBLIC KEY-----\\n...\\n-----END PUBLIC KEY-----\\n"]}

A device keeps the newest document it verified in ``<state>/trust/publisher-keys.json``;
while it has one, it replaces the trust dir's ``*.pub`` files and ``[trust] threshold``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime._util.strict_text import load_json
from edge_runtime.bundle.signing import key_id
from edge_runtime.errors import ManifestError

__all__ = ["FORMAT", "MAX_BYTES", "TARGET_PATH", "PublisherKeys", "build_publisher_keys", "parse_publisher_keys"]

FORMAT = "edge-runtime-publisher-keys/1"
TARGET_PATH = "trust/publisher-keys.json"
MAX_BYTES = 64 << 10
_MAX_KEYS = 64


@dataclass(frozen=True)
class PublisherKeys:
    """Key id -> key, and how many of them must sign a manifest."""

    keys: dict[str, Ed25519PublicKey]
    threshold: int


def parse_publisher_keys(data: bytes) -> PublisherKeys:
    """Strictly parse a publisher-keys document.

    Raises:
        ManifestError: over the cap, not strict JSON, another format, no keys or more than 64,
            a key that is not an Ed25519 PEM public key, or a threshold outside 1..keys.
    """
    doc = load_json(data, "publisher keys", error=ManifestError, max_bytes=MAX_BYTES, max_depth=4)
    if not isinstance(doc, dict) or set(doc) != {"format", "threshold", "keys"} or doc["format"] != FORMAT:
        raise ManifestError(f"publisher keys: must be {{format: {FORMAT!r}, threshold, keys}}")
    pems, threshold = doc["keys"], doc["threshold"]
    if not isinstance(pems, list) or not 1 <= len(pems) <= _MAX_KEYS or not all(isinstance(p, str) for p in pems):
        raise ManifestError(f"publisher keys: keys must be 1 to {_MAX_KEYS} PEM strings")
    keys: dict[str, Ed25519PublicKey] = {}
    for i, pem in enumerate(pems):
        try:
            key = serialization.load_pem_public_key(pem.encode())
        except (ValueError, TypeError) as e:
            raise ManifestError(f"publisher keys: keys[{i}] is not a PEM public key") from e
        if not isinstance(key, Ed25519PublicKey):
            raise ManifestError(f"publisher keys: keys[{i}] is not an Ed25519 key")
        keys[key_id(key)] = key
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= len(keys):
        raise ManifestError(f"publisher keys: threshold must be 1 to {len(keys)} (the distinct keys)")
    return PublisherKeys(keys, threshold)


def build_publisher_keys(keys: list[Ed25519PublicKey], threshold: int) -> bytes:
    """The document for ``keys`` (publisher side). Raises ManifestError: it would not parse."""
    pems = [k.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
            for k in keys]
    data = json.dumps({"format": FORMAT, "threshold": threshold, "keys": pems}, indent=1).encode()
    parse_publisher_keys(data)
    return data

"""Ed25519 keys, key ids, signature documents and k-of-n verification.

A key id is the sha256 hex of the raw 32-byte public key. A signature document
(``manifest.sig``, and the envelope of channel documents and signed commands)
is JSON: ``{"signatures": [{"keyid": HEX, "sig": BASE64}, ...]}`` where each
signature is Ed25519 over the exact message bytes.

:func:`verify_threshold` is pure: it takes bytes and keys, does no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime._util.fsutil import CappedReadError, create_exclusive, read_capped
from edge_runtime._util.strict_text import load_json
from edge_runtime.errors import ConfigError, SignatureError

__all__ = [
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "load_trusted_keys",
    "sign_document",
    "verify_threshold",
]

_MAX_KEY_FILE = 16 << 10
_MAX_SIGNATURES = 32


def key_id(public_key: Ed25519PublicKey) -> str:
    """sha256 hex of the raw public key bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_keypair(path: Path) -> str:
    """Write a new private key to ``path`` (0600, PEM PKCS8) and ``path.pub`` (PEM).

    Returns the key id. Refuses to overwrite an existing file.

    Raises:
        ConfigError: ``path`` or ``path.pub`` already exists or cannot be written.
    """
    private = Ed25519PrivateKey.generate()
    pub_path = path.with_name(path.name + ".pub")
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        with create_exclusive(path, 0o600) as fh:
            fh.write(private_pem)
        with create_exclusive(pub_path, 0o644) as fh:
            fh.write(public_pem)
    except FileExistsError as e:
        raise ConfigError(f"{e.filename}: already exists; refusing to overwrite a key") from e
    except OSError as e:
        raise ConfigError(f"{e.filename or path}: cannot write key: {e.strerror}") from e
    return key_id(private.public_key())


def _read_key_file(path: Path) -> bytes:
    try:
        return read_capped(path, _MAX_KEY_FILE, follow_symlinks=True)
    except CappedReadError as e:
        raise ConfigError(f"{path}: key file is too large") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read key: {e.strerror or e}") from e


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key (PEM PKCS8, unencrypted).

    Raises:
        ConfigError: missing, unreadable, or not an Ed25519 private key.
    """
    try:
        key = serialization.load_pem_private_key(_read_key_file(path), password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: not an unencrypted PEM private key") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key (PEM SubjectPublicKeyInfo).

    Raises:
        ConfigError: missing, unreadable, or not an Ed25519 public key.
    """
    try:
        key = serialization.load_pem_public_key(_read_key_file(path))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: not a PEM public key") from e
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: not an Ed25519 public key")
    return key


def load_trusted_keys(trust_dir: Path) -> dict[str, Ed25519PublicKey]:
    """Load every ``*.pub`` in ``trust_dir`` (symlinks are not followed).

    Raises:
        ConfigError: the directory is missing, or a key file is invalid.
    """
    if not trust_dir.is_dir():
        raise ConfigError(f"trust dir {trust_dir} does not exist (put publisher *.pub keys there)")
    keys: dict[str, Ed25519PublicKey] = {}
    for entry in sorted(trust_dir.iterdir()):
        if entry.suffix != ".pub" or entry.is_symlink() or not entry.is_file():
            continue
        key = load_public_key(entry)
        keys[key_id(key)] = key
    return keys


def sign_document(message: bytes, private_keys: list[Ed25519PrivateKey]) -> bytes:
    """Return a signature document over ``message`` with one entry per key."""
    entries = [
        {"keyid": key_id(k.public_key()), "sig": base64.b64encode(k.sign(message)).decode()}
        for k in private_keys
    ]
    return json.dumps({"signatures": entries}, sort_keys=True, indent=1).encode()


def verify_threshold(
    message: bytes,
    signature_doc: bytes,
    trusted: Mapping[str, Ed25519PublicKey],
    threshold: int,
) -> list[str]:
    """Check that at least ``threshold`` distinct trusted keys signed ``message``.

    Returns the key ids of the valid trusted signatures. Signatures by unknown
    keys are ignored; an invalid signature by a trusted key is an error.

    Raises:
        SignatureError: malformed document, a bad signature, or too few.
    """
    doc = load_json(signature_doc, "signature document", error=SignatureError)
    entries = doc.get("signatures") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries or len(entries) > _MAX_SIGNATURES:
        raise SignatureError(f"signature document must list 1 to {_MAX_SIGNATURES} signatures")
    valid: set[str] = set()
    untrusted: list[str] = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("keyid"), str):
            raise SignatureError("signature entry must be an object with a string keyid")
        kid = entry["keyid"]
        try:
            sig = base64.b64decode(str(entry.get("sig", "")), validate=True)
        except (binascii.Error, ValueError) as e:
            raise SignatureError(f"signature by key {kid[:16]} is not valid base64") from e
        key = trusted.get(kid)
        if key is None:
            untrusted.append(kid[:16])
            continue
        try:
            key.verify(sig, message)
        except InvalidSignature as e:
            raise SignatureError(f"signature by key {kid[:16]} does not match the signed content") from e
        valid.add(kid)
    if len(valid) < threshold:
        detail = f"; untrusted key(s): {', '.join(untrusted)}" if untrusted else ""
        raise SignatureError(
            f"{len(valid)} valid trusted signature(s), {threshold} required{detail}"
        )
    return sorted(valid)


"""Re-verify a cached version's signed manifest against the keys trusted *now*.

A signature is checked at install, but what sits on disk afterwards can
change: a bit flips in ``manifest.json`` (``top_k``, a preprocessing mean), or
the operator removes a publisher's key from the trust dir. So every load and
activation of a cached version reads ``manifest.json`` and ``manifest.sig``
once, checks the signature threshold with the keys in the trust dir at that
moment (the same rule as :func:`~edge_runtime.bundle.reader.read_bundle`),
and parses the manifest from exactly those bytes: nothing is read twice, so
nothing can change between the check and the parse. The file hashes are
checked after that, by the caller, against the manifest returned here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime._util.fsutil import read_capped
from edge_runtime.bundle.manifest import Manifest
from edge_runtime.bundle.manifest_parse import parse_manifest
from edge_runtime.bundle.publisher_keys import MAX_BYTES, PublisherKeys, parse_publisher_keys
from edge_runtime.bundle.signing import load_trusted_keys, verify_threshold
from edge_runtime.errors import ConfigError, IntegrityError, ManifestError, SignatureError

__all__ = ["Trust", "VerifiedManifest", "read_verified_manifest"]


@dataclass(frozen=True)
class Trust:
    """Where the trusted publisher keys are and how many must have signed.

    The keys are read from ``trust_dir`` at every check, never cached: a key
    removed from the dir stops counting at the next load or activation.
    """

    trust_dir: Path
    threshold: int
    delivered: Path | None = None
    """The publisher-keys document an update repository delivered (``<state>/trust/``): while it
    exists, its keys and threshold replace the trust dir's (:mod:`edge_runtime.bundle.publisher_keys`)."""

    def _delivered(self) -> PublisherKeys | None:
        if self.delivered is None:
            return None
        try:
            data = read_capped(self.delivered, MAX_BYTES)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ConfigError(f"{self.delivered}: unreadable ({e.strerror or e})") from e
        try:
            return parse_publisher_keys(data)
        except ManifestError as e:
            raise ConfigError(f"{self.delivered}: {e.one_line()}") from e

    def current(self) -> PublisherKeys:
        """The publisher keys trusted now and how many must have signed, read once (so both come from
        the same document): the delivered ones, else the trust dir's with ``threshold``.

        Raises ConfigError: the trust dir is missing or holds an invalid key, or the delivered document is bad.
        """
        delivered = self._delivered()
        return delivered if delivered is not None else PublisherKeys(load_trusted_keys(self.trust_dir), self.threshold)

    def keys(self) -> dict[str, Ed25519PublicKey]:
        """The keys of :meth:`current`. Raises ConfigError like it."""
        return self.current().keys

    def required(self) -> int:
        """The threshold of :meth:`current`, without reading the trust dir's keys (a CLI without a trust
        dir still gets it). Raises ConfigError: the delivered document is bad."""
        delivered = self._delivered()
        return delivered.threshold if delivered is not None else self.threshold


@dataclass(frozen=True)
class VerifiedManifest:
    """A cached manifest and the exact bytes it was parsed from.

    ``key_ids`` are the trusted keys whose signatures verified; empty when the
    signature was not checked (a cache opened without a :class:`Trust`).
    """

    manifest: Manifest
    manifest_bytes: bytes
    key_ids: tuple[str, ...]


def read_verified_manifest(directory: Path, name: str, version: int, *, trust: Trust | None,
                           max_manifest_bytes: int, max_signature_bytes: int) -> VerifiedManifest:
    """Read ``directory``'s manifest, check its signature with ``trust``, parse it from those bytes.

    Neither file is read through a symlink, and each is size-capped. With
    ``trust`` None the signature is not checked (only the parse and the
    name/version match): for tools and tests that open a bare cache.

    Raises:
        SignatureError: the signature does not verify with the keys trusted
            now (the message says so and why), or manifest.sig is unreadable.
        ConfigError: the trust dir is missing or holds an invalid key.
        IntegrityError: manifest.json is unreadable, too large, invalid, or
            for another name/version.
    """
    path = directory / "manifest.json"
    try:
        manifest_bytes = read_capped(path, max_manifest_bytes)
    except OSError as e:
        raise IntegrityError(f"{path}: unreadable: {e.strerror or e}") from e
    key_ids: tuple[str, ...] = ()
    if trust is not None:
        key_ids = _check_signature(directory, name, version, manifest_bytes, trust, max_signature_bytes)
    try:
        manifest = parse_manifest(manifest_bytes)
    except ManifestError as e:
        raise IntegrityError(f"{path}: {e}") from e
    if (manifest.name, manifest.version) != (name, version):
        raise IntegrityError(f"{path}: is for {manifest.name} v{manifest.version}, not {name} v{version}")
    return VerifiedManifest(manifest, manifest_bytes, key_ids)


def _check_signature(directory: Path, name: str, version: int, manifest_bytes: bytes, trust: Trust,
                     max_signature_bytes: int) -> tuple[str, ...]:
    what = f"{name} v{version} manifest signature"
    trusted = trust.current()  # before reading the sig: a broken trust dir is a config error, not this version's
    keys, threshold = trusted.keys, trusted.threshold
    if threshold < 1:
        raise SignatureError(f"signature threshold must be at least 1, got {threshold}")
    sig_path = directory / "manifest.sig"
    try:
        signature = read_capped(sig_path, max_signature_bytes)
    except OSError as e:
        raise SignatureError(f"{what}: {sig_path} is unreadable: {e.strerror or e}") from e
    try:
        return tuple(verify_threshold(manifest_bytes, signature, keys, threshold))
    except SignatureError as e:
        raise SignatureError(f"{what} does not verify with the keys trusted now: {e}") from e

"""The publisher's TUF repository: a static directory any HTTP server, object store or CDN serves.

Layout (python-tuf's, consistent snapshots on)::

    DIR/metadata/1.root.json, 2.root.json, ...   every root version (devices walk them)
    DIR/metadata/root.json                        the newest root (the device's bootstrap)
    DIR/metadata/<N>.targets.json, <N>.snapshot.json, timestamp.json
    DIR/targets/models/<sha256>.<name>.bundle     each bundle, named by its content

Roles: root (k-of-n keys, kept offline), targets (the publishers' keys), snapshot and
timestamp (may be online: ``refresh-timestamp`` is what a cron job runs). Keys are the
Ed25519 PEM files ``edge-runtime bundle keygen`` makes; for KMS or HSM keys use a
securesystemslib ``Signer`` (the README says how). Everything is built with
``tuf.api.metadata``; nothing here is a second implementation of TUF.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from edge_runtime._util.fsutil import make_private_dir, sha256_file
from edge_runtime.bundle.publisher_keys import TARGET_PATH as KEYS_TARGET
from edge_runtime.bundle.publisher_keys import build_publisher_keys
from edge_runtime.bundle.reader import inspect_bundle
from edge_runtime.bundle.signing import load_private_key, load_public_key
from edge_runtime.config.model import Limits
from edge_runtime.errors import ConfigError, InputError, ManifestError

__all__ = ["ROLES", "Expiry", "Repository", "signer_from_file"]

ROLES = ("root", "targets", "snapshot", "timestamp")


@dataclass(frozen=True)
class Expiry:
    """How long each role's metadata stays valid (days)."""

    root: float = 365.0
    targets: float = 90.0
    snapshot: float = 7.0
    timestamp: float = 1.0

    def of(self, role: str) -> dt.datetime:
        days = float(getattr(self, role))
        return (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=days)).replace(microsecond=0)


def signer_from_file(path: Path) -> CryptoSigner:
    """A TUF signer for an Ed25519 PEM private key file (``bundle keygen``'s).

    Raises:
        ConfigError: unreadable or not an Ed25519 private key.
    """
    private = load_private_key(path)
    return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))


class Repository:
    """A TUF repository directory: read it, change roles, sign, write."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.meta = directory / "metadata"
        self.targets_dir = directory / "targets"

    # ------------------------------------------------------------------ reading

    def _load(self, role: str) -> Metadata[Any]:
        path = self.meta / ("timestamp.json" if role == "timestamp" else f"{self._version(role)}.{role}.json")
        try:
            md: Metadata[Any] = Metadata.from_bytes(path.read_bytes())
        except FileNotFoundError as e:
            raise InputError(f"{self.dir} has no {path.name}: run `repo init` (or `repo publish`)") from e
        except (OSError, ValueError, DeserializationError) as e:
            raise InputError(f"{path}: not a readable TUF {role} metadata file ({e})") from e
        if md.signed.type != role:
            raise InputError(f"{path}: holds {md.signed.type} metadata, not {role}")
        return md

    def _version(self, role: str) -> int:
        versions = [int(p.name.split(".", 1)[0]) for p in self.meta.glob(f"*.{role}.json")
                    if p.name.split(".", 1)[0].isdigit()]
        if not versions:
            raise InputError(f"{self.dir} is not a TUF repository (no {role} metadata): run `repo init`")
        return max(versions)

    def root(self) -> Metadata[Root]:
        return self._load("root")

    def targets(self) -> Metadata[Targets]:
        return self._load("targets")

    # ------------------------------------------------------------------ writing

    def _write(self, md: Metadata[Any], name: str) -> None:
        data = md.to_bytes(JSONSerializer(compact=False))
        tmp = self.meta / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.meta / name)

    @staticmethod
    def _sign(md: Metadata[Any], signers: Sequence[CryptoSigner]) -> None:
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)

    def init(self, roles: Mapping[str, Sequence[CryptoSigner]], root_threshold: int, expiry: Expiry) -> None:
        """A new repository: root v1 with each role's keys, empty targets, snapshot and timestamp.

        Raises:
            InputError: the directory already holds a repository; a threshold above the root keys.
        """
        if (self.meta / "1.root.json").exists():
            raise InputError(f"{self.dir} already holds a TUF repository")
        if not 1 <= root_threshold <= len(roles["root"]):
            raise InputError(f"--root-threshold must be 1 to {len(roles['root'])} (the root keys given)")
        make_private_dir(self.dir)
        self.meta.mkdir(exist_ok=True)
        self.targets_dir.mkdir(exist_ok=True)
        root = Root(expires=expiry.of("root"), consistent_snapshot=True)
        for role in ROLES:
            for signer in roles[role]:
                root.add_key(signer.public_key, role)
        root.roles["root"].threshold = root_threshold
        root_md = Metadata(root)
        self._sign(root_md, roles["root"])
        self._write(root_md, "1.root.json")
        self._write(root_md, "root.json")
        targets = Metadata(Targets(expires=expiry.of("targets")))
        self._sign(targets, roles["targets"])
        self._write(targets, "1.targets.json")
        self.snapshot_and_timestamp(roles["snapshot"], roles["timestamp"], expiry)

    def add(self, bundles: Sequence[Path], signers: Sequence[CryptoSigner], expiry: Expiry) -> list[str]:
        """Add bundles as targets ``models/<name>.bundle`` (replacing that model's previous one) in a new
        targets version; run :meth:`snapshot_and_timestamp` after. Returns the target paths.

        Raises:
            ManifestError: a file is not a bundle. InputError: two bundles of one model.
        """
        targets = self.targets()
        added = []
        for bundle in bundles:
            manifest = json.loads(inspect_bundle(bundle, Limits()).manifest_bytes)
            name, version = manifest.get("name"), manifest.get("version")
            if not isinstance(name, str) or not isinstance(version, int):
                raise ManifestError(f"{bundle}: the manifest has no name and version")
            path = f"models/{name}.bundle"
            if path in added:
                raise InputError(f"two bundles of model {name!r} given: a target holds one version")
            data_sha, size = sha256_file(bundle)
            info = TargetFile(size, {"sha256": data_sha}, path,
                              unrecognized_fields={"custom": {"edge_runtime": {
                                  "model": name, "version": version,
                                  "requires": manifest.get("requires") or {}}}})
            dest = self.targets_dir / "models" / f"{data_sha}.{name}.bundle"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle, dest)
            targets.signed.targets[path] = info
            added.append(path)
        self._bump_targets(targets, signers, expiry)
        return added

    def set_publisher_keys(self, public_keys: Sequence[Path], threshold: int, signers: Sequence[CryptoSigner],
                           expiry: Expiry) -> str:
        """Deliver the keys that sign bundle manifests (target ``trust/publisher-keys.json``) in a new
        targets version; devices adopt them and drop what only revoked keys signed. Returns the target path.

        Raises:
            ConfigError: a key file is not an Ed25519 public key. ManifestError: a bad threshold.
        """
        data = build_publisher_keys([load_public_key(p) for p in public_keys], threshold)
        targets = self.targets()
        digest = hashlib.sha256(data).hexdigest()
        dest = self.targets_dir / "trust" / f"{digest}.publisher-keys.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        targets.signed.targets[KEYS_TARGET] = TargetFile(len(data), {"sha256": digest}, KEYS_TARGET)
        self._bump_targets(targets, signers, expiry)
        return KEYS_TARGET

    def remove(self, model: str, signers: Sequence[CryptoSigner], expiry: Expiry) -> None:
        """Remove ``model``'s target (devices keep what they have). Raises InputError: not there."""
        targets = self.targets()
        if targets.signed.targets.pop(f"models/{model}.bundle", None) is None:
            raise InputError(f"the repository has no target for model {model!r}")
        self._bump_targets(targets, signers, expiry)

    def _bump_targets(self, targets: Metadata[Targets], signers: Sequence[CryptoSigner], expiry: Expiry) -> None:
        targets.signed.version += 1
        targets.signed.expires = expiry.of("targets")
        self._sign(targets, signers)
        self._write(targets, f"{targets.signed.version}.targets.json")

    def snapshot_and_timestamp(self, snapshot_signers: Sequence[CryptoSigner],
                               timestamp_signers: Sequence[CryptoSigner], expiry: Expiry) -> None:
        """A new snapshot of the newest targets, and a new timestamp of it (``repo publish``)."""
        try:
            previous = self._load("snapshot").signed.version
        except InputError:
            previous = 0
        snapshot = Metadata(Snapshot(version=previous + 1, expires=expiry.of("snapshot")))
        snapshot.signed.meta["targets.json"] = MetaFile(version=self._version("targets"))
        self._sign(snapshot, snapshot_signers)
        self._write(snapshot, f"{snapshot.signed.version}.snapshot.json")
        self.timestamp(timestamp_signers, expiry)

    def timestamp(self, signers: Sequence[CryptoSigner], expiry: Expiry) -> int:
        """A new timestamp of the newest snapshot (``repo refresh-timestamp``); returns its version."""
        try:
            previous = self._load("timestamp").signed.version
        except InputError:
            previous = 0
        timestamp = Metadata(Timestamp(version=previous + 1, expires=expiry.of("timestamp"),
                                       snapshot_meta=MetaFile(version=self._version("snapshot"))))
        self._sign(timestamp, signers)
        self._write(timestamp, "timestamp.json")
        return timestamp.signed.version

    def rotate(self, role: str, new: Sequence[CryptoSigner], threshold: int, old_root: Sequence[CryptoSigner],
               new_root: Sequence[CryptoSigner], expiry: Expiry) -> int:
        """A new root version where ``role``'s keys are ``new`` (every old one revoked) with ``threshold``.

        The new root is signed by ``old_root`` (the keys the devices trust now) and ``new_root`` (the
        keys of the new root role: the same ones unless ``role`` is root). Returns the new root version.

        Raises:
            ConfigError: an unknown role, or a threshold above the keys.
        """
        if role not in ROLES:
            raise ConfigError(f"--role must be one of {', '.join(ROLES)}, got {role!r}")
        if not 1 <= threshold <= len(new):
            raise ConfigError(f"--threshold must be 1 to {len(new)} (the new keys given)")
        root = self.root()
        for keyid in list(root.signed.roles[role].keyids):
            root.signed.revoke_key(keyid, role)
        for signer in new:
            root.signed.add_key(signer.public_key, role)
        root.signed.roles[role].threshold = threshold
        root.signed.version += 1
        root.signed.expires = expiry.of("root")
        seen: dict[str, CryptoSigner] = {}
        for signer in [*old_root, *new_root]:
            seen.setdefault(signer.public_key.keyid, signer)
        self._sign(root, list(seen.values()))
        self._write(root, f"{root.signed.version}.root.json")
        self._write(root, "root.json")
        return int(root.signed.version)


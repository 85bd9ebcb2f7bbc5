"""The device's model store: cache + trusted keys + runtime options, from config.

This is the one place that wires the verify -> stage -> gate -> commit path,
used by the CLI (``models install``), the OTA updater and fleet commands.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import __version__
from .backends.base import BackendOptions
from .bundle_reader import read_bundle
from .config import Config
from .disk_room import make_room
from .errors import CacheError, RollbackError
from .fsutil import remove_tree
from .gates import GateReport, check_gates
from .loaded_model import LoadedModel
from .manifest import Manifest, StagedBundle
from .model_cache import Check, Fault, ModelCache
from .requirements_check import check_requirements, device_tags
from .reverify import Trust
from .signing import load_trusted_keys

__all__ = ["InstallResult", "ModelStore"]


@dataclass(frozen=True)
class InstallResult:
    """What ``install`` did: the manifest, whether it is now active, the gate report."""

    manifest: Manifest
    active: bool
    gates: GateReport | None


class ModelStore:
    """Installs, gates and loads models according to a :class:`Config`.

    ``clock`` returns the current UTC time (bundle expiry); tests inject one.
    """

    def __init__(self, config: Config, *, fault: Fault | None = None,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc)) -> None:
        self.config = config
        # The cache re-verifies every manifest it reads with the keys trusted at that moment.
        self.cache = ModelCache(config.state_dir, config.keep_versions, fault,
                                max_manifest_bytes=config.limits.max_manifest_bytes,
                                max_signature_bytes=config.limits.max_signature_bytes,
                                trust=Trust(config.trust_dir, config.trust.threshold))
        self.clock = clock

    # ------------------------------------------------------------------ plumbing

    def backend_options(self) -> BackendOptions:
        """Runtime options: provider preference, threads, engine cache under the state dir."""
        return BackendOptions(
            providers=self.config.backend.providers,
            threads=self.config.backend.threads,
            spin_wait=self.config.backend.spin_wait,
            cache_dir=self.config.state_dir / "engines",
        )

    def trusted_keys(self) -> dict[str, Ed25519PublicKey]:
        """Publisher keys from the trust dir (read on every call: keys can rotate).

        Raises ConfigError: the trust dir is missing or holds an invalid key.
        """
        return load_trusted_keys(self.config.trust_dir)

    def device_tags(self) -> set[str]:
        """Hardware tags a bundle's ``requires.hardware`` is matched against."""
        return device_tags() | set(self.config.hardware_tags)

    def accept(self, manifest: Manifest) -> None:
        """Refuse a verified manifest this device must not install (before unpacking).

        Raises:
            RollbackError: version not above the anti-rollback floor.
            IncompatibleError: runtime/hardware requirement unmet, or expired.
            CacheError: too little disk space, even with old versions removed.
        """
        floor = self.cache.floor(manifest.name)
        if manifest.version <= floor:
            raise RollbackError(
                f"{manifest.name} v{manifest.version} refused: not above the anti-rollback floor v{floor}"
            )
        check_requirements(manifest, device_tags=self.device_tags(), runtime_version=__version__,
                           now=self.clock())
        # Before the staging dir is written: an old version may have to go first (issue 9 §6).
        make_room(self.cache, sum(f.size for f in manifest.files.values()), prefer=manifest.name)

    # ------------------------------------------------------------------ bundles

    def read(self, bundle: Path) -> StagedBundle:
        """Verify ``bundle`` (signatures first, then every rule) and unpack it into staging.

        Raises:
            BundleError (any subclass), ConfigError (trust dir).
        """
        return read_bundle(bundle, trusted=self.trusted_keys(), threshold=self.config.trust.threshold,
                           limits=self.config.limits, staging_root=self.cache.staging_root(),
                           accept=self.accept)

    def load(self, name: str, version: int | None = None, *, directory: Path | None = None,
             manifest: Manifest | None = None) -> LoadedModel:
        """Load a cached version (default: the active one), re-verifying it first.

        Its manifest signature is re-checked with the keys trusted now and the
        manifest is parsed from the bytes checked; then the model and labels
        files are re-hashed against it (:class:`LoadedModel`). A candidate
        given as ``directory`` + ``manifest`` (staging) was verified by the caller.

        Raises:
            CacheError: no such model/version, or nothing active.
            SignatureError, ConfigError: the manifest does not verify with the keys trusted now.
            IntegrityError, ModelError, ManifestError: see :class:`LoadedModel`.
        """
        if directory is None or manifest is None:
            if version is None:
                version = self.cache.active_version(name)
                if version is None:
                    raise CacheError(f"model {name!r} has no active version")
            directory = self.cache.version_dir(name, version)
            manifest = self.cache.manifest(name, version)
        return LoadedModel(manifest, directory, options=self.backend_options(), limits=self.config.limits)

    def gate(self, directory: Path, manifest: Manifest) -> GateReport:
        """Load a candidate from ``directory`` and run its golden and latency gates.

        Raises:
            GateError and everything :meth:`load` raises; the model is released either way.
        """
        model = self.load(manifest.name, directory=directory, manifest=manifest)
        try:
            return check_gates(model)
        finally:
            model.close()

    def install(self, bundle: Path, *, activate: bool = True, gates: bool = True) -> InstallResult:
        """Verify, stage, (optionally) gate, commit and (optionally) activate ``bundle``.

        With ``gates`` the candidate is loaded in its runtime and its golden
        cases and latency budget are checked before anything in the cache
        changes: a model the runtime cannot load never becomes active.

        Raises:
            BundleError, GateError, ModelError, CacheError, ConfigError.
        """
        staged = self.read(bundle)
        reports: list[GateReport] = []
        try:
            self.cache.install(staged, check=self._gate_into(reports) if gates else None, activate=activate)
        finally:
            with contextlib.suppress(OSError):
                remove_tree(staged.directory)  # gone already when the install committed
        return InstallResult(staged.manifest, activate, reports[0] if reports else None)

    def activate(self, name: str, version: int, *, gates: bool = True) -> GateReport | None:
        """Make a cached version active after loading and gating it.

        Raises:
            CacheError: not cached. GateError, ModelError: the version is unfit.
        """
        reports: list[GateReport] = []
        self.cache.activate(name, version, check=self._gate_into(reports) if gates else None)
        return reports[0] if reports else None

    def _gate_into(self, reports: list[GateReport]) -> Check:
        """A cache ``check`` that gates the candidate and keeps its report."""

        def check(directory: Path, manifest: Manifest) -> None:
            reports.append(self.gate(directory, manifest))

        return check

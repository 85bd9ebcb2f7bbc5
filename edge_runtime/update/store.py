"""The device's model store: cache + trusted keys + runtime options, from config.

This is the one place that wires the verify -> stage -> gate -> commit path,
used by the CLI (``models install``), the OTA updater and fleet commands.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime import __version__
from edge_runtime._util.fsutil import read_capped, remove_tree, sha256_file
from edge_runtime.bundle.manifest import Manifest, StagedBundle
from edge_runtime.bundle.reader import read_bundle
from edge_runtime.bundle.requirements import check_requirements, device_tags
from edge_runtime.bundle.reverify import Trust
from edge_runtime.cache.disk_room import make_room
from edge_runtime.cache.state import FailedVersion
from edge_runtime.cache.versions import Check, Fault, ModelCache
from edge_runtime.config.model import Config
from edge_runtime.errors import (
    BackendUnavailableError,
    CacheError,
    GateError,
    IntegrityError,
    ManifestError,
    ModelError,
    RollbackError,
)
from edge_runtime.runtime.backends.base import BackendOptions
from edge_runtime.runtime.gate_child import ChildBudget, gate_in_child
from edge_runtime.runtime.gates import GateReport
from edge_runtime.runtime.loaded_model import LoadedModel

__all__ = ["DELIVERED_KEYS", "InstallResult", "ModelStore"]

DELIVERED_KEYS = "publisher-keys.json"
"""Under ``<state>/trust/``: the publisher keys the update repository delivered (they replace the trust dir's)."""


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
        # Publisher keys: delivered by the update repository (state/trust/), else the trust dir's.
        self.trust = Trust(config.trust_dir, config.trust.threshold, config.state_dir / "trust" / DELIVERED_KEYS)
        self.cache = ModelCache(config.state_dir, config.keep_versions, fault,
                                max_manifest_bytes=config.limits.max_manifest_bytes,
                                max_signature_bytes=config.limits.max_signature_bytes,
                                trust=self.trust)
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
        """Publisher keys trusted now (read on every call: keys rotate): those the update repository
        delivered, else the trust dir's.

        Raises ConfigError: the trust dir is missing or holds an invalid key.
        """
        return self.trust.keys()

    def threshold(self) -> int:
        """Manifest signatures needed now: the delivered publisher-keys document's, else ``[trust] threshold``."""
        return self.trust.required()

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

    def read(self, bundle: Path, *, expect: tuple[str, int] | None = None) -> StagedBundle:
        """Verify ``bundle`` (signatures first, then every rule) and unpack it into staging.

        ``expect`` (name, version) is what the update channel announced: a bundle
        that is another model or version is refused before unpacking (mix-and-match).

        Raises:
            BundleError (any subclass), ConfigError (trust dir).
        """
        def accept(manifest: Manifest) -> None:
            if expect is not None and (manifest.name, manifest.version) != expect:
                raise ManifestError(f"the bundle is {manifest.name} v{manifest.version}, but the update "
                                    f"channel signed it as {expect[0]} v{expect[1]} (mix-and-match refused)")
            self.accept(manifest)

        trusted = self.trust.current()
        return read_bundle(bundle, trusted=trusted.keys, threshold=trusted.threshold,
                           limits=self.config.limits, staging_root=self.cache.staging_root(),
                           accept=accept)

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

    def child_budget(self) -> ChildBudget:
        """The memory and time budget of the gate child (``[gates]``)."""
        gates = self.config.gates
        return ChildBudget(gates.child_memory_mb, gates.child_timeout_seconds)

    def gate(self, directory: Path, manifest: Manifest, *, bundle_sha256: str = "") -> GateReport:
        """Load, warm up and gate the candidate in ``directory`` in a child process.

        Nothing of the candidate runs in this process: a crash, a memory bomb or
        a hang is the child's. A failure the candidate caused (a gate, a signal,
        the memory or time budget, the runtime refusing it) marks that version
        failed in the state (see :meth:`refusal`), with ``bundle_sha256`` when known.

        Raises:
            GateError: a gate failed, or the child died, ran out of memory or time.
            ModelError, IntegrityError, ManifestError: the child reported it.
        """
        try:
            manifest_bytes = read_capped(directory / "manifest.json", self.config.limits.max_manifest_bytes)
        except OSError as e:
            raise IntegrityError(f"{directory / 'manifest.json'}: unreadable: {e.strerror or e}") from e
        manifest_sha256 = hashlib.sha256(manifest_bytes).hexdigest()
        try:
            return gate_in_child(directory, manifest_sha256, options=self.backend_options(),
                                 limits=self.config.limits, budget=self.child_budget())
        except (GateError, ModelError) as e:
            if not isinstance(e, BackendUnavailableError):  # the device lacks a runtime: not the model's fault
                failed = FailedVersion(manifest.version, e.one_line(), bundle_sha256, manifest_sha256, time.time())
                self.cache.state.update(lambda s: s.with_failure(manifest.name, failed))
            raise

    def refusal(self, name: str, version: int, *, manifest_sha256: str = "", bundle_sha256: str = "") -> str:
        """Why ``name`` ``version`` with this content must not be tried again ("" when it may be).

        A version is refused when its gate failed before and the recorded bundle
        or manifest sha256 matches (so a different build of the number is not).
        """
        failed = self.cache.state.load().model(name).failure(version)
        if failed is None or not ((bundle_sha256 and failed.sha256 == bundle_sha256)
                                  or (manifest_sha256 and failed.manifest_sha256 == manifest_sha256)):
            return ""
        return f"{name} v{version} failed its gate before ({failed.reason}); not tried again without --force"

    def install(self, bundle: Path, *, activate: bool = True, gates: bool = True,
                force: bool = False, expect: tuple[str, int] | None = None) -> InstallResult:
        """Verify, stage, (optionally) gate, commit and (optionally) activate ``bundle``.

        With ``gates`` the candidate is loaded, warmed up and gated in a child
        process (:meth:`gate`) before anything in the cache changes, and so
        before the anti-rollback floor rises: a model the runtime cannot load
        or survive never becomes active, and a version whose gate failed
        before is refused unless ``force``.

        Raises:
            BundleError, GateError, ModelError, CacheError, ConfigError.
        """
        try:
            bundle_sha256 = sha256_file(bundle)[0]
        except OSError as e:
            raise CacheError(f"cannot read bundle {bundle}: {e.strerror or e}") from e
        staged = self.read(bundle, expect=expect)
        reports: list[GateReport] = []
        manifest = staged.manifest
        try:
            refused = self.refusal(manifest.name, manifest.version, bundle_sha256=bundle_sha256,
                                   manifest_sha256=hashlib.sha256(staged.manifest_bytes).hexdigest())
            if refused and not force:
                raise GateError(refused)
            check = self._gate_into(reports, bundle_sha256) if gates else None
            self.cache.install(staged, check=check, activate=activate)
        finally:
            with contextlib.suppress(OSError):
                remove_tree(staged.directory)  # gone already when the install committed
        return InstallResult(staged.manifest, activate, reports[0] if reports else None)

    def activate(self, name: str, version: int, *, gates: bool = True, force: bool = False) -> GateReport | None:
        """Make a cached version active after gating it in a child process.

        Raises:
            CacheError: not cached. GateError, ModelError: the version is unfit,
                or its gate failed before (without ``force``).
        """
        self.check_not_failed(name, version, force=force)
        reports: list[GateReport] = []
        self.cache.activate(name, version, check=self._gate_into(reports) if gates else None)
        return reports[0] if reports else None

    def check_not_failed(self, name: str, version: int, *, force: bool = False) -> None:
        """Refuse a cached version whose gate failed before, unless ``force``.

        Raises:
            GateError: it failed before (the message gives the reason and says --force).
            CacheError, IntegrityError: not cached, or its manifest is unreadable.
        """
        if force:
            return
        path = self.cache.version_dir(name, version) / "manifest.json"
        try:
            data = read_capped(path, self.config.limits.max_manifest_bytes)
        except OSError as e:
            raise CacheError(f"{name} v{version} is not in the cache ({e.strerror or e})") from e
        refused = self.refusal(name, version, manifest_sha256=hashlib.sha256(data).hexdigest())
        if refused:
            raise GateError(refused)

    def _gate_into(self, reports: list[GateReport], bundle_sha256: str = "") -> Check:
        """A cache ``check`` that gates the candidate, keeps its report and clears an old failure mark."""

        def check(directory: Path, manifest: Manifest) -> None:
            reports.append(self.gate(directory, manifest, bundle_sha256=bundle_sha256))
            self.cache.state.update(lambda s: s.without_failure(manifest.name, manifest.version))

        return check

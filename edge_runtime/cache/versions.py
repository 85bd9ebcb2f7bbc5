"""The on-disk model cache: immutable version dirs and atomic active/previous links.

Layout under the state dir (directories 0700, files 0600)::

    models/<name>/<version>/      manifest.json, manifest.sig, payload; immutable
    models/<name>/active -> <v>   relative symlink, replaced by symlink + rename
    models/<name>/previous -> <v>
    staging/<unique>/             verified bundles waiting to be installed, named by
                                  their owning process (:mod:`edge_runtime.bundle.staging_owner`)
    state.json, state.lock        see :mod:`edge_runtime.cache.state`

Crash safety: every change is one rename (version dir into place, a link swap,
a version dir into the trash) then an fsync of its directory, ordered so that
any prefix of an operation leaves a complete, hash-valid version active;
:meth:`ModelCache.recover` removes leftovers and repairs links at start-up
(:mod:`edge_runtime.cache.recovery`). Paths and links are
:mod:`edge_runtime.cache.layout`'s, which versions gc keeps
:mod:`edge_runtime.cache.keep_rules`' and the ``models list`` records
:mod:`edge_runtime.cache.model_info`'s; this module holds the policy.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from edge_runtime._util.fsutil import fsync_dir, fsync_tree, remove_tree
from edge_runtime.bundle.manifest import Manifest, StagedBundle
from edge_runtime.bundle.manifest_parse import parse_manifest
from edge_runtime.bundle.reverify import Trust, VerifiedManifest, read_verified_manifest
from edge_runtime.bundle.staging_owner import sweep_staging
from edge_runtime.cache.keep_rules import GC_STEPS, collect_old, removable_versions, remove_revoked, remove_version
from edge_runtime.cache.layout import CacheLayout, Fault, cache_errors, check_hashes, check_layout, read_link
from edge_runtime.cache.model_info import ModelInfo, list_models
from edge_runtime.cache.recovery import recover_cache
from edge_runtime.cache.state import StateStore
from edge_runtime.errors import CacheError, ConfigError, EdgeRuntimeError, IntegrityError, RollbackError

__all__ = [
    "ACTIVATE_STEPS",
    "INSTALL_STEPS",
    "ROLLBACK_STEPS",
    "Check",
    "Fault",
    "ModelCache",
]

Check = Callable[[Path, Manifest], None]
"""``check(directory, manifest)``: load and gate a candidate; raise to refuse it."""

_LINK_STEPS = ("previous-linked", "previous-set", "active-linked", "active-set")
INSTALL_STEPS = (
    *("install:checked", "install:synced", "install:renamed", "install:dir-synced"),
    "install:floor-raised",
    *(f"install:{s}" for s in _LINK_STEPS),
    *GC_STEPS,
)
ACTIVATE_STEPS = tuple(f"activate:{s}" for s in _LINK_STEPS)
ROLLBACK_STEPS = tuple(f"rollback:{s}" for s in _LINK_STEPS)

_log = logging.getLogger(__name__)


def _no_fault(step: str) -> None:
    pass


class ModelCache:
    """Installs, activates, rolls back, verifies and collects cached model versions.

    Mutations hold the :class:`StateStore` lock (threads and processes). A gate
    ``check`` runs outside it so a slow golden run does not block the CLI;
    what it relied on is re-checked under the lock.
    """

    def __init__(
        self,
        state_dir: Path,
        keep_versions: int = 3,
        fault: Fault | None = None,
        *,
        max_manifest_bytes: int = 1 << 20,
        max_signature_bytes: int = 64 << 10,
        trust: Trust | None = None,
    ) -> None:
        """Open the cache under ``state_dir``, creating its dirs 0700.

        With ``trust`` every manifest read from the cache (load, activate,
        rollback, verify) has its signature re-checked with the keys trusted
        at that moment; without it (bare tools, tests) only its hashes are.

        Raises CacheError: ``keep_versions`` < 1, or a dir is a symlink or cannot be created.
        """
        if keep_versions < 1:
            raise CacheError(f"keep_versions must be at least 1, got {keep_versions}")
        self.keep_versions = keep_versions
        self.state = StateStore(state_dir)
        self.state_dir = state_dir
        self._fault = fault or _no_fault
        self._max_manifest = max_manifest_bytes
        self._max_signature = max_signature_bytes
        self._trust = trust
        self._layout = CacheLayout(state_dir, self._fault)

    # ------------------------------------------------------------------ queries

    def staging_root(self) -> Path:
        """Where the bundle reader creates its ``<unique>/`` staging dirs."""
        return self._layout.staging

    def names(self) -> list[str]:
        """Model names present in the cache, sorted."""
        return self._layout.names()

    def versions(self, name: str) -> list[int]:
        """Installed versions of ``name`` ascending (real dirs named by a decimal version)."""
        return self._layout.versions(name)

    def version_dir(self, name: str, version: int) -> Path:
        """The directory of ``name`` ``version``, existing or not. Raises CacheError if either is invalid."""
        return self._layout.version_dir(name, version)

    def active_version(self, name: str) -> int | None:
        """The active version or None. Raises CacheError if the link is corrupt or dangling."""
        return self._layout.link_version(name, "active")

    def previous_version(self, name: str) -> int | None:
        """The version ``rollback()`` returns to, or None. Raises CacheError like active_version."""
        return self._layout.link_version(name, "previous")

    def floor(self, name: str) -> int:
        """The anti-rollback floor: the highest version ever installed, 0 if none.

        The larger of the stored floor and the versions on disk, so a crash
        between the rename and the state write cannot lower it.
        Raises CacheError: the state file is corrupt.
        """
        return max(self.state.load().model(name).highest, *self.versions(name), 0)

    def manifest(self, name: str, version: int) -> Manifest:
        """Read a cached version's manifest again from disk (size-capped, no symlinks).

        With a :class:`Trust` its signature is re-checked with the keys trusted
        now, and the manifest is parsed from the very bytes checked.

        Raises:
            CacheError: the version is not in the cache.
            SignatureError: the signature does not verify with the keys trusted now.
            ConfigError: the trust dir is missing or holds an invalid key.
            IntegrityError: unreadable, too large, invalid, or for another name/version.
        """
        return self._read_manifest(name, version, self._trust).manifest

    def verify_version(self, name: str, version: int) -> Manifest:
        """Re-check a cached version: manifest signature (keys trusted now), file list, every hash.

        Returns the verified manifest.

        Raises:
            CacheError: the version is not in the cache.
            SignatureError, ConfigError: see :meth:`manifest`.
            IntegrityError: a file is missing, extra, a link, unreadable, or its
                size or sha256 differs (bit rot); the message names the file.
        """
        return self._check_files(name, version, self._trust)

    def verify_all(self) -> list[tuple[str, int, EdgeRuntimeError | None]]:
        """``verify_version`` each cached version: (name, version, error or None).

        Raises ConfigError: the trust dir is unusable (no version can be judged).
        """
        results: list[tuple[str, int, EdgeRuntimeError | None]] = []
        for name in self.names():
            for version in self.versions(name):
                try:
                    self.verify_version(name, version)
                    results.append((name, version, None))
                except ConfigError:
                    raise
                except EdgeRuntimeError as e:
                    results.append((name, version, e))
        return results

    def list_models(self) -> list[ModelInfo]:
        """One record per model name; corrupt links are reported in ``problems``, not raised."""
        return list_models(self._layout, self.state)

    # ---------------------------------------------------------------- mutations

    def install(self, staged: StagedBundle, *, check: Check | None = None, activate: bool = True) -> int:
        """Move a verified staged bundle into the cache and return its version.

        Order: anti-rollback, layout check, ``check(dir, manifest)``, fsync,
        rename to ``models/<name>/<version>``, raise the floor, then (with
        ``activate``) previous -> old active and active -> new, then gc. Up to
        the rename nothing in the cache changes, and a failure removes the
        staged dir.

        Raises:
            RollbackError: the version is not above the floor.
            IntegrityError: the staged dir does not match its manifest.
            CacheError: the dir is not under ``staging_root()``, the version
                exists, the state is corrupt, or the file system failed.
            Whatever ``check`` raises (GateError, ModelLoadError, ...).
        """
        manifest = staged.manifest
        name, version = manifest.name, manifest.version
        src, top = self._layout.staged_paths(staged.directory)
        renamed = False
        try:
            self._refuse_rollback(name, version)
            check_layout(src, manifest)
            with cache_errors(f"cannot read {src / 'manifest.json'}"):
                on_disk = (src / "manifest.json").read_bytes()
            if on_disk != staged.manifest_bytes or parse_manifest(on_disk) != manifest:
                raise IntegrityError(f"{src / 'manifest.json'}: differs from the verified manifest")
            if check is not None:
                check(src, manifest)
            self._fault("install:checked")
            with cache_errors(f"cannot sync {src}"):
                fsync_tree(src, 0o600, 0o700)
            self._fault("install:synced")
            with self.state.locked(), cache_errors(f"cannot install {name} v{version}"):
                self._refuse_rollback(name, version)
                ndir = self._layout.make_name_dir(name)
                if os.path.lexists(ndir / str(version)):
                    raise CacheError(f"{ndir / str(version)} already exists")
                src.rename(ndir / str(version))
                renamed = True
                self._fault("install:renamed")
                fsync_dir(ndir)
                fsync_dir(src.parent)
                self._fault("install:dir-synced")
                # Only after the rename: a floor raised for a version that never
                # landed would lock the device out of that version for good.
                self.state.update(lambda s: s.with_floor_raised(name, version))
                self._fault("install:floor-raised")
                if activate:
                    self._switch(name, version, "install")
                try:
                    self.gc(name)
                except CacheError as e:  # the install is committed; failing it now would mislead
                    _log.warning("gc of %s after installing v%d failed: %s", name, version, e.one_line())
        except BaseException:
            if not renamed:
                with contextlib.suppress(OSError):
                    remove_tree(top)
            raise
        if top != src:
            with contextlib.suppress(OSError):
                remove_tree(top)
        return version

    def activate(self, name: str, version: int, *, check: Check | None = None) -> None:
        """Make a cached version active (operator action: no anti-rollback).

        Its signature and hashes are re-checked (:meth:`verify_version`) and
        ``check(dir, manifest)`` runs on that verified manifest before the
        links change; the old active becomes ``previous``.

        Raises:
            CacheError: not in the cache, or the file system failed.
            SignatureError, ConfigError, IntegrityError: the version fails verification.
            Whatever ``check`` raises.
        """
        manifest = self.verify_version(name, version)
        if check is not None:
            check(self.version_dir(name, version), manifest)
        with self.state.locked():
            self._layout.require_cached(name, version)  # gc may have run while check did
            self._switch(name, version, "activate")

    def rollback(self, name: str, version: int | None = None) -> int:
        """Activate ``previous``, or the given cached ``version``; return it.

        Anti-rollback does not apply: only versions still in the cache qualify.
        The version left becomes ``previous``, so a rollback can be undone.

        Raises:
            CacheError: no previous version, not in the cache, or fs failure.
            SignatureError, ConfigError, IntegrityError: the target fails verification.
        """
        with self.state.locked():
            target = self.previous_version(name) if version is None else version
            if target is None:
                raise CacheError(f"{name} has no previous version to roll back to")
            self.verify_version(name, target)
            self._switch(name, target, "rollback")
            return target

    def pin(self, name: str, version: int | None) -> None:
        """Protect a cached version from gc (None unpins). Raises CacheError if it is not cached."""
        with self.state.locked():
            if version is not None:
                self._layout.require_cached(name, version)
            self.state.update(lambda s: s.with_model(name, pinned=version))

    def gc(self, name: str) -> list[int]:
        """Delete versions older than the newest ``keep_versions``; return those deleted.

        Never deletes active, previous, pinned or a probation record's
        versions; deletes nothing while a link is corrupt.
        Raises CacheError: the state is corrupt or the file system failed.
        """
        return collect_old(self._layout, self.state, name, self.keep_versions, self._fault)

    def removable_versions(self, name: str) -> list[int]:
        """Versions of ``name`` that may ever be deleted, oldest first: not active, previous, pinned
        or a probation record's; none while a link is corrupt. Raises CacheError: the state is corrupt."""
        return removable_versions(self._layout, self.state, name)

    def remove_version(self, name: str, version: int) -> None:
        """Delete one version that :meth:`removable_versions` lists (to make room before an install).

        Raises CacheError: the version is not removable (any more), or the file system failed.
        """
        remove_version(self._layout, self.state, name, version, self._fault)

    def remove_revoked(self, name: str, version: int) -> int:
        """Delete a version that rests on a revoked key (even active or previous); returns the new floor.

        Raises CacheError: the file system failed or the state is corrupt.
        """
        return remove_revoked(self._layout, self.state, name, version, self._fault)

    def recover(self) -> list[str]:
        """Repair the cache at start-up; return one human-readable note per repair.

        Removes staging entries of dead processes (:func:`sweep_staging`), stray
        temp files, links and trash. For each
        model whose ``active`` is missing, corrupt, dangling, incomplete or fails
        its hashes, activates ``previous`` if valid, else the highest valid
        version, else removes ``active``. Drops a corrupt or redundant
        ``previous``; raises the stored floor to the highest installed version.
        Raises CacheError: the state file is corrupt or the file system failed.
        """
        # Hashes only: recovery repairs what a crash leaves. Whether a version is still
        # trusted is judged when it is loaded, where a failure falls back with an event
        # and a trust dir that is broken for a while does not make it drop the links.
        return recover_cache(self._layout, self.state, self._verify_hashes)

    def sweep_staging(self) -> list[str]:
        """Remove staging leftovers of dead processes (a killed CLI install); one note per entry.

        Entries of live processes are kept. Raises CacheError: the file system failed.
        """
        with cache_errors(f"cannot clean {self._layout.staging}"):
            return sweep_staging(self._layout.staging)

    # ------------------------------------------------------------------ helpers

    def _read_manifest(self, name: str, version: int, trust: Trust | None) -> VerifiedManifest:
        vdir = self._layout.require_cached(name, version)
        return read_verified_manifest(vdir, name, version, trust=trust, max_manifest_bytes=self._max_manifest,
                                      max_signature_bytes=self._max_signature)

    def _verify_hashes(self, name: str, version: int) -> None:
        self._check_files(name, version, None)

    def _check_files(self, name: str, version: int, trust: Trust | None) -> Manifest:
        manifest = self._read_manifest(name, version, trust).manifest
        vdir = self._layout.version_dir(name, version)
        check_layout(vdir, manifest)
        check_hashes(vdir, manifest)
        return manifest

    def _switch(self, name: str, target: int, op: str) -> None:
        """Under the lock: previous -> current active, then active -> ``target``."""
        ndir = self._layout.name_dir(name)
        try:
            old = read_link(ndir / "active")
        except CacheError:
            old = None  # a corrupt link holds nothing worth keeping as previous
        if old == target:
            return
        with cache_errors(f"cannot activate {name} v{target}"):
            if old is not None and self._layout.is_version_dir(name, old):
                self._layout.set_link(ndir, "previous", old, op)
            self._layout.set_link(ndir, "active", target, op)

    def _refuse_rollback(self, name: str, version: int) -> None:
        floor = self.floor(name)
        if version <= floor:
            raise RollbackError(f"{name} version {version} is not above the anti-rollback floor {floor}")

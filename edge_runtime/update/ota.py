"""Over-the-air updates: poll a signed channel, download, install, activate.

The poller runs in its own thread so downloads, verification and gating never
block inference. A bundle is fetched into ``staging/`` (size-capped, resumable,
checked against the channel's sha256), installed through the normal verify
path without activation, then handed to the :class:`Activator` for gates, swap
and probation. Every outcome is an event with a reason.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from edge_runtime import __version__
from edge_runtime._util.progress import Clock, Heartbeat, beating_wait
from edge_runtime._util.retry_policy import redact_url
from edge_runtime._util.wall_clock import CLOCK_FLOOR
from edge_runtime.bundle.publisher_keys import MAX_BYTES as MAX_KEYS_BYTES
from edge_runtime.bundle.publisher_keys import TARGET_PATH as KEYS_TARGET
from edge_runtime.bundle.requirements import check_runtime_and_hardware
from edge_runtime.bundle.staging_owner import owner_tag
from edge_runtime.cache.disk_room import make_room_for_download
from edge_runtime.cache.pins import pin_refusal, pinned_version
from edge_runtime.config.model import OtaConfig
from edge_runtime.errors import (
    CacheError,
    EdgeRuntimeError,
    FetchError,
    GateError,
    IncompatibleError,
    ModelError,
    RollbackError,
)
from edge_runtime.telemetry.events import EventBus
from edge_runtime.update.activation import Activator
from edge_runtime.update.channel import parse_channel
from edge_runtime.update.fetcher import Fetcher
from edge_runtime.update.state_recovery import keep_channel_document
from edge_runtime.update.store import ModelStore
from edge_runtime.update.transport import HttpFetcher
from edge_runtime.update.trust_rotation import adopt_publisher_keys, sweep_revoked
from edge_runtime.update.tuf_client import DirectoryFetcher, Downloads, ModelTarget, TufRepository

__all__ = ["OtaUpdater", "UpdateResult"]

_log = logging.getLogger(__name__)
_INSTALL_MARGIN_S = 600.0  # install + gates of one bundle, beyond its download's deadline


@dataclass(frozen=True)
class UpdateResult:
    """What one update did: the model, the version installed, whether it now serves."""

    name: str
    version: int
    active: bool


class OtaUpdater:
    """Polls ``config.channel_url`` every ``poll_seconds`` (if set) and applies updates.

    The channel document is ``channel_url``; its signature document is at
    ``channel_url + ".sig"``.

    ``update_from_url`` is also the path of the fleet ``update`` command.
    """

    def __init__(self, config: OtaConfig, store: ModelStore, activator: Activator | None, events: EventBus, *,
                 fetcher: Fetcher | None = None,
                 now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc),
                 poll_seconds: Callable[[], float] | None = None, clock: Clock | None = None) -> None:
        self.config = config
        self.store = store
        self.activator = activator
        self.events = events
        self._fetcher = fetcher
        self.now = now
        self.poll_seconds = poll_seconds or (lambda: config.poll_seconds)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy = threading.Lock()
        # The poll thread beats while it waits between polls and after each step of a poll.
        self.progress = Heartbeat(clock) if clock is not None else Heartbeat()

    @property
    def fetcher(self) -> Fetcher:
        """The HTTP client, built on first use (loading the CA store costs time and memory)."""
        if self._fetcher is None:
            self._fetcher = HttpFetcher.from_config(self.config)
        return self._fetcher

    def _repository_fetcher(self) -> Downloads:
        """How the TUF repository is read: from a local directory (a copied repository), else over HTTP."""
        url = self.config.repository_url
        if url.startswith("/"):
            return DirectoryFetcher(Path(url))
        return self.fetcher

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start polling in a background thread when a repository or channel URL is configured."""
        if not (self.config.repository_url or self.config.channel_url):
            return
        self._thread = threading.Thread(target=self._loop, name="ota", daemon=True)
        self._thread.start()

    @property
    def stuck_seconds(self) -> float:
        """How long one step of a poll may go without a beat before the poller counts as stuck.

        A step is the channel fetch (two fetches, each bounded by ``deadline_seconds``)
        or one update: its download (the same deadline), then install and gates (a
        child with its own limits), possibly after waiting for a fleet ``update``
        that holds the update lock meanwhile: twice one update's bound.
        """
        return 2 * (self.config.deadline_seconds + _INSTALL_MARGIN_S)

    @property
    def alive(self) -> bool:
        """The poller thread runs and beats within :attr:`stuck_seconds`; False once it died or hangs.

        True without a channel URL (nothing to poll) and once stopping.
        """
        if self._thread is None or self._stop.is_set():
            return True
        return self._thread.is_alive() and self.progress.age() <= self.stuck_seconds

    def stop(self) -> None:
        """Stop polling; an update in progress finishes its current step first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        refused = ""  # the last refusal reported: a repository stuck on one problem is one event, not one a poll
        while not self._stop.is_set():
            try:
                self.poll_once()
                refused = ""
            except EdgeRuntimeError as e:
                _log.warning("OTA poll failed: %s", e.one_line())
                if e.one_line() != refused and not isinstance(e, FetchError):
                    # An attack or a stale repository (expired, rolled back, badly signed): the fleet should know.
                    refused = e.one_line()
                    self.events.emit("update_failed", reason=f"update metadata refused: {refused}")
            except Exception:  # keep polling: one bad cycle must not end updates for good
                _log.exception("OTA poll crashed")
            self.progress.beat()
            beating_wait(self._stop, self.poll_seconds(), self.progress)

    # ------------------------------------------------------------------ updates

    def poll_once(self) -> list[UpdateResult]:
        """Fetch and verify the channel document, then apply every newer version.

        With ``repository_url`` set this is :meth:`poll_repository` (TUF).

        Raises:
            FetchError, SignatureError, IncompatibleError (expired/replayed), ManifestError.
        """
        if self.config.repository_url:
            return self.poll_repository()
        url = self.config.channel_url
        cap = self.config.max_channel_bytes
        data = self.fetcher.fetch_bytes(url, cap)
        signature = self.fetcher.fetch_bytes(url + ".sig", cap)  # detached, like manifest.sig
        cache = self.store.cache
        trusted = self.store.trust.current()
        channel = parse_channel(data, signature, trusted=trusted.keys, threshold=trusted.threshold, now=self.now(),
                                min_sequence=cache.state.load().channel_sequence, base_url=url)
        cache.state.update(
            lambda s: dataclasses.replace(s, channel_sequence=max(s.channel_sequence, channel.sequence)))
        keep_channel_document(cache.state_dir, data, signature)  # proves the sequence if state.json is lost
        results = []
        for name, entry in sorted(channel.entries.items()):
            self.progress.beat()  # one update is one step: see stuck_seconds
            if entry.version <= cache.floor(name):
                continue
            if pinned_version(cache, name) is not None:  # an operator pinned it (fleet `pin`): no automatic updates
                continue
            refused = self.store.refusal(name, entry.version, bundle_sha256=entry.sha256)
            if refused:  # its gate failed before: not downloaded again (a fixed build has another sha256)
                _log.info("skipping update: %s", refused)
                continue
            self.events.emit("update_available", model=name, version=entry.version,
                             reason=f"channel sequence {channel.sequence}")
            try:
                results.append(self.update_from_url(entry.url, expected_sha256=entry.sha256,
                                                    expected_size=entry.size, model=(name, entry.version)))
            except EdgeRuntimeError as e:
                _log.warning("update of %s to v%s failed: %s", name, entry.version, e.one_line())
        return results

    def update_from_url(self, url: str, *, expected_sha256: str | None = None,
                        expected_size: int | None = None, model: tuple[str, int] | None = None) -> UpdateResult:
        """Download, verify, install and activate the bundle at ``url``; a pinned model is only installed.

        The candidate is gated in a child process before the install commits.
        ``model`` (name, version) is what the channel announced: it names the
        ``update_failed`` event of a bundle refused before its manifest is known.

        Raises:
            FetchError, BundleError, GateError, ModelError: nothing changed, or
                the previous version was restored; an ``update_failed`` event says why.
        """
        if self.config.repository_url:
            # The repository's metadata says what is current and fresh; a bare URL says neither.
            raise IncompatibleError("this device takes updates through its TUF repository ([ota] repository_url): "
                                    "send update {target: models/<name>.bundle}")

        def download(dest: Path) -> None:
            self.fetcher.fetch_to_file(url, dest, max_bytes=self.store.config.limits.max_bundle_bytes,
                                       expected_size=expected_size, expected_sha256=expected_sha256)

        return self._apply(url, redact_url(url), expected_size, download, model, expect=None)

    def _apply(self, key_source: str, where: str, expected_size: int | None, download: Callable[[Path], object],
               model: tuple[str, int] | None, *, expect: tuple[str, int] | None) -> UpdateResult:
        """Download into staging with ``download(dest)``, then install, gate and activate (events on the way)."""
        with self._busy:
            cache = self.store.cache
            # A name derived from the source lets a later attempt resume a cut download; the owner
            # in it keeps another process's staging sweep off it while this one lives.
            key = hashlib.sha256(key_source.encode()).hexdigest()[:16]
            dest = cache.staging_root() / f"download-{key}.{owner_tag()}.bundle"
            name, version = model or ("", 0)
            installed = False
            try:
                make_room_for_download(cache, dest, expected_size)
                download(dest)
                # Gated in a child before the install commits, so the floor rises only for a
                # version that passed; a crash, memory bomb or hang is the child's (README).
                result = self.store.install(dest, activate=False, gates=True, expect=expect)
                installed = True
                name, version = result.manifest.name, result.manifest.version
                self.events.emit("update_installed", model=name, version=version, reason=f"from {where}")
                dest.unlink(missing_ok=True)
                if pin_refusal(cache, name, version) is not None:
                    pass  # a pinned model only gets the version installed
                elif self.activator is not None:
                    self.activator.activate(name, version, reason=f"OTA update from {where}", gated=result.gates)
                else:  # the CLI (`models install --from-repo`): the daemon serves it after `reload` / SIGHUP
                    self.store.activate(name, version, gates=False)
            except EdgeRuntimeError as e:
                if not isinstance(e, FetchError):  # the fetcher keeps a resumable partial
                    dest.unlink(missing_ok=True)
                if isinstance(e, (GateError, ModelError)) and not installed:  # the child gate refused it
                    self.events.emit("gate_failed", model=name, version=version or None, reason=e.one_line())
                self.events.emit("update_failed", model=name, version=version or None,
                                 reason=f"{where}: {e.one_line()}")
                raise
            active = (self.activator.on_probation(name) == version if self.activator is not None
                      else cache.active_version(name) == version)
            return UpdateResult(name, version, active)

    # ------------------------------------------------------------------ TUF repository

    def poll_repository(self, *, raise_failures: bool = False) -> list[UpdateResult]:
        """Refresh the TUF repository (``repository_url``), then apply every newer model it offers.

        The models looked up are those in the cache and ``ota.models``. Each target's
        ``custom`` (model, version, requirements) is checked before its download; the
        bundle must then be that model and version, and verify as ever.

        A model that fails is logged with an ``update_failed`` event and the others go on;
        with ``raise_failures`` the first such error is raised once all were tried (the CLI).

        Raises:
            FetchError, SignatureError, RollbackError, IncompatibleError (expired metadata),
                IntegrityError, ManifestError: the metadata is refused; nothing was downloaded.
        """
        cache = self.store.cache
        repo = self._open_repository()
        results = []
        failures: list[EdgeRuntimeError] = []
        for name in sorted(set(cache.names()) | set(self.config.models)):
            self.progress.beat()
            try:
                target = repo.model(name)
                if target is None or not self._wanted(target):
                    continue
            except EdgeRuntimeError as e:
                if not raise_failures:  # else the caller reports it
                    _log.warning("update of %s refused: %s", name, e.one_line())
                self.events.emit("update_failed", model=name, reason=e.one_line())
                failures.append(e)
                continue
            self.events.emit("update_available", model=name, version=target.version,
                             reason=f"TUF target {target.info.path}")
            where = f"TUF target {target.info.path} v{target.version}"
            try:
                results.append(self._apply(f"{self.config.repository_url}|{target.info.path}|{target.sha256}",
                                           where, target.length, partial(repo.download, target),
                                           (name, target.version), expect=(name, target.version)))
            except EdgeRuntimeError as e:
                if not raise_failures:
                    _log.warning("update of %s to v%s failed: %s", name, target.version, e.one_line())
                failures.append(e)
        if raise_failures and failures:
            raise failures[0]
        return results

    def update_target(self, path: str) -> UpdateResult:
        """The fleet ``update {target}``: refresh the repository and install what it resolves for ``path``.

        When that version already serves, nothing is downloaded and it reports success (a rollout is
        idempotent).

        Raises:
            IncompatibleError: no repository configured, or the target needs another runtime/hardware.
            CacheError: the repository has no such target. RollbackError: it is not above the floor.
            And what :meth:`poll_repository` raises.
        """
        if not self.config.repository_url:
            raise IncompatibleError("update {target} needs a TUF repository ([ota] repository_url)")
        name = path.removeprefix("models/").removesuffix(".bundle")
        if path != f"models/{name}.bundle" or not name:
            raise CacheError(f"target {path[:100]!r} is not a model target (models/<name>.bundle)")
        cache = self.store.cache
        repo = self._open_repository()
        target = repo.model(name)
        if target is None:
            raise CacheError(f"the TUF repository has no target {path}")
        if target.version == cache.active_version(name):  # already done: a rollout may send it again
            return UpdateResult(name, target.version, True)
        if target.version <= cache.floor(name):
            raise RollbackError(f"{path} is v{target.version}, not above the anti-rollback floor "
                                f"v{cache.floor(name)}")
        self._check_compatible(target)
        return self._apply(f"{self.config.repository_url}|{path}|{target.sha256}",
                           f"TUF target {path} v{target.version}", target.length,
                           partial(repo.download, target), (name, target.version),
                           expect=(name, target.version))

    def _open_repository(self) -> TufRepository:
        """The repository, refreshed (root rotations followed), with its publisher keys adopted.

        Raises IncompatibleError first when the device clock is not set (TUF expiry needs it).
        """
        now = self.now().timestamp()
        if now < CLOCK_FLOOR:  # expired metadata would look fresh to a clock in the past
            raise IncompatibleError(f"not updating: the device clock is not set ({now:.0f} is before "
                                    f"{CLOCK_FLOOR:.0f}), so TUF expiry cannot be judged; the current models serve")
        cache = self.store.cache
        repo = TufRepository(self.config.repository_url, self.store.config.trust_dir / "root.json",
                             cache.state_dir, self._repository_fetcher(), cache.staging_root(),
                             max_metadata_bytes=self.config.max_channel_bytes)
        repo.refresh()
        self._follow_publisher_keys(repo)
        return repo

    def _follow_publisher_keys(self, repo: TufRepository) -> None:
        """Adopt the repository's publisher keys (when it delivers them); on a change remove what rests on
        revoked keys. A bad document is refused with an event and changes nothing."""
        cache = self.store.cache
        dest = cache.staging_root() / f"publisher-keys.{owner_tag()}.json"
        try:
            data = repo.small_target(KEYS_TARGET, MAX_KEYS_BYTES, dest)
            if data is None or not adopt_publisher_keys(self.store, data):
                return
        except EdgeRuntimeError as e:
            self.events.emit("update_failed", reason=f"publisher keys from the repository refused: {e.one_line()}")
            return
        trusted = self.store.trust.current()
        key_ids = sorted(trusted.keys)
        self.events.emit("trust_updated", reason=f"publisher keys {', '.join(k[:16] for k in key_ids)} "
                                                 f"(threshold {trusted.threshold}) from TUF target {KEYS_TARGET}",
                         key_ids=key_ids, threshold=trusted.threshold)
        sweep_revoked(self.store, self.activator, self.events)

    def _wanted(self, target: ModelTarget) -> bool:
        """A newer version this device may take: above the floor, not pinned, not refused, compatible.

        Raises:
            IncompatibleError, ManifestError: its ``custom`` requirements are not met here.
        """
        cache = self.store.cache
        if target.version <= cache.floor(target.name) or pinned_version(cache, target.name) is not None:
            return False
        refused = self.store.refusal(target.name, target.version, bundle_sha256=target.sha256)
        if refused:
            _log.info("skipping update: %s", refused)
            return False
        self._check_compatible(target)
        return True

    def _check_compatible(self, target: ModelTarget) -> None:
        """Raises IncompatibleError / ManifestError: the target's ``custom`` requirements are not met here."""
        check_runtime_and_hardware(f"TUF target {target.info.path} v{target.version}", target.runtime,
                                   target.hardware, device_tags=self.store.device_tags(),
                                   runtime_version=__version__)

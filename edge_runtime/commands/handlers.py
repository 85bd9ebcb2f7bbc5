"""Fleet commands: the device's handler of each verb (the dispatcher is :mod:`edge_runtime.commands.dispatch`).

:class:`DeviceCommands` supplies the handlers; the arguments of each verb::

    ping     {}                                  -> {"pong": <command ts>, "device_ts": <device clock>}
    status   {}                                  -> the daemon's status dict + runtime settings
    update   {"target": str}                     install what the TUF repository resolves for that target path
    update   {"url": str, "sha256"?: hex, "size"?: int}   download, verify, install, activate (no repository)
    rollback {"model": str, "version"?: int}     serve that cached version (default: previous)
    pin      {"model": str, "version": int}      serve it, keep it from gc, skip it in OTA polling
    unpin    {"model": str}
    config   {"<setting>": value, ...}           see runtime_settings.RuntimeSettings; all or nothing
    reload   {}                                  serve what the cache marks active (like SIGHUP)
    shadow   {"model": str, "version": int, "share"?: 0-1, "promote_after"?: int, "min_agreement"?: 0-1}
             run that cached version beside the active one on a share of inputs; share 0 stops it

A pin freezes *automatic* updates: the OTA poller skips a pinned model (it
calls :func:`~edge_runtime.cache.pins.pinned_version`). ``rollback`` of a pinned model is refused, naming
the pin, and an explicit ``update`` installs without activating (the pin wins:
change it with ``pin``/``unpin``); the pinned version stays protected from gc.
Settings changed by ``config`` last until the daemon restarts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from edge_runtime.cache.pins import pin_refusal, pinned_version
from edge_runtime.commands.auth import SIGNED_VERBS
from edge_runtime.commands.dispatch import Handler
from edge_runtime.commands.parse import Command, Reply
from edge_runtime.commands.runtime_settings import RuntimeSettings
from edge_runtime.config.model import in_range
from edge_runtime.config.typed_toml import build
from edge_runtime.errors import CommandError, ConfigError, InputError
from edge_runtime.monitoring.shadow import ShadowPlan

if TYPE_CHECKING:
    from edge_runtime.cache.versions import ModelCache
    from edge_runtime.monitoring.monitor import Monitor
    from edge_runtime.update.activation import Activator
    from edge_runtime.update.ota import UpdateResult
    from edge_runtime.update.store import ModelStore

__all__ = ["MODEL_VERBS", "SIGNED_VERBS", "DeviceCommands", "Updater"]

MODEL_VERBS = frozenset({"update", "rollback", "pin", "unpin", "reload", "shadow"})
"""Verbs that change what serves; they may take long (a download), so the bridge runs them apart."""
T = TypeVar("T")


class Updater(Protocol):
    """What the ``update`` verb needs of the OTA side (:class:`~edge_runtime.update.ota.OtaUpdater` is one)."""

    def update_from_url(self, url: str, *, expected_sha256: str | None = None,
                        expected_size: int | None = None) -> UpdateResult:
        """Download, verify, install and activate (only install, when pinned) the bundle at ``url``.

        Raises FetchError, BundleError, GateError, ModelError: the previous version serves.
        """
        ...

    def update_target(self, path: str) -> UpdateResult:
        """Install what the TUF repository resolves for target ``path`` (then as ``update_from_url``).

        Raises CommandError-worthy EdgeRuntimeErrors: no repository, no such target, refused metadata.
        """
        ...


# ---------------------------------------------------------------------- handler arguments


def _hex64(value: str) -> str:
    return "" if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else "must be 64 lowercase hex digits"


def _non_empty(value: str) -> str:
    return "" if value else "must not be empty"


_VERSION = {"check": in_range(1, 2**53)}


@dataclass(frozen=True)
class _NoArgs:
    pass


@dataclass(frozen=True)
class _UpdateArgs:
    url: str = ""
    target: str = ""
    sha256: str | None = field(default=None, metadata={"check": _hex64})
    size: int | None = field(default=None, metadata={"check": in_range(1, 2**48)})


@dataclass(frozen=True)
class _ModelArgs:
    model: str = field(metadata={"check": _non_empty})


@dataclass(frozen=True)
class _RollbackArgs:
    model: str = field(metadata={"check": _non_empty})
    version: int | None = field(default=None, metadata=_VERSION)


@dataclass(frozen=True)
class _PinArgs:
    model: str = field(metadata={"check": _non_empty})
    version: int = field(metadata=_VERSION)


@dataclass(frozen=True)
class _ShadowArgs:
    model: str = field(metadata={"check": _non_empty})
    version: int | None = field(default=None, metadata=_VERSION)
    share: float = field(default=0.1, metadata={"check": in_range(0.0, 1.0)})
    queue: int = field(default=4, metadata={"check": in_range(1, 64)})
    promote_after: int = field(default=0, metadata={"check": in_range(0, 10**9)})
    min_agreement: float = field(default=0.95, metadata={"check": in_range(0.0, 1.0)})


def _args(cls: type[T], command: Command) -> T:
    """Check ``command.args`` against dataclass ``cls`` with the config file's strict rules."""
    try:
        return build(cls, command.args, where="args")
    except ConfigError as e:
        raise CommandError(e.worded("argument")) from e  # the config file's checks, about an argument


class DeviceCommands:
    """The handlers of every verb, over the daemon's real parts.

    ``status`` returns the daemon's status dict (versions, probation, uptime...).
    Handlers run in the caller's thread; ``update`` blocks for the download,
    gates and swap.
    """

    def __init__(self, activator: Activator, ota: Updater, store: ModelStore, settings: RuntimeSettings,
                 status: Callable[[], Mapping[str, Any]], *, clock: Callable[[], float] = time.time,
                 monitor: Monitor | None = None) -> None:
        self.activator = activator
        self.monitor = monitor
        self.ota = ota
        self.store = store
        self.settings = settings
        self._status = status
        self._clock = clock

    def handlers(self) -> dict[str, Handler]:
        """verb -> handler, for :class:`Dispatcher`."""
        return {"ping": self.ping, "status": self.status, "update": self.update, "rollback": self.rollback,
                "pin": self.pin, "unpin": self.unpin, "config": self.config, "reload": self.reload,
                "shadow": self.shadow}

    def ping(self, command: Command) -> Reply:
        """Answer with the command's ts and the device clock (shows skew, which signed commands care about)."""
        _args(_NoArgs, command)
        return Reply(True, "pong", data={"pong": command.ts, "device_ts": round(self._clock(), 3)})

    def status(self, command: Command) -> Reply:
        """The daemon's status plus the runtime settings."""
        _args(_NoArgs, command)
        return Reply(True, "status", data={**self._status(), "settings": self.settings.snapshot()})

    def update(self, command: Command) -> Reply:
        """Download, verify, install and activate the bundle at ``url`` (only install it when the model is pinned).

        Raises:
            CommandError: bad arguments. FetchError, BundleError, GateError,
                ModelError: the update failed and the previous version serves.
        """
        args = _args(_UpdateArgs, command)
        if bool(args.url) == bool(args.target):
            raise CommandError("update needs either args.target (a TUF target path) or args.url")
        if args.target:
            if args.sha256 is not None or args.size is not None:
                raise CommandError("args.sha256/args.size go with args.url: a TUF target's hashes are signed")
            result = self.ota.update_target(args.target)
        else:
            result = self.ota.update_from_url(args.url, expected_sha256=args.sha256, expected_size=args.size)
        state = "active (on probation)" if result.active else "installed, not active"
        if (refused := pin_refusal(self.store.cache, result.name, result.version)) is not None:
            state += f" ({refused})"
        return Reply(True, f"{result.name} v{result.version} {state}",
                     data={"model": result.name, "version": result.version, "active": result.active})

    def rollback(self, command: Command) -> Reply:
        """Serve ``version`` (default: the previous one) of ``model`` now; emits ``operator_rollback``.

        A pinned model is refused: the pin is the operator's standing decision,
        so it is changed with ``pin``/``unpin``, never overridden by a rollback.

        Raises:
            CommandError: bad arguments, unknown model, or the model is pinned.
            CacheError, ModelError, IntegrityError: nothing to roll back to, or it does not load.
        """
        args = _args(_RollbackArgs, command)
        cache = self._cache_with(args.model)
        refused = pin_refusal(cache, args.model, args.version)
        if refused is not None:
            raise CommandError(refused)
        before = cache.active_version(args.model)
        target = self.activator.rollback(args.model, args.version, reason=f"operator rollback (command {command.id})")
        return Reply(True, f"{args.model} rolled back to v{target}",
                     data={"model": args.model, "version": target, "from": before, "pinned": None})

    def pin(self, command: Command) -> Reply:
        """Serve ``version`` of ``model`` (switching if needed), keep it from gc, stop OTA updating it.

        Emits ``pinned`` (``version``, ``previous``, ``switched``) once the pin is stored.

        Raises:
            CommandError: bad arguments, unknown model or version not cached.
            CacheError, ModelError, IntegrityError: the version does not load.
        """
        args = _args(_PinArgs, command)
        cache = self._cache_with(args.model)
        if args.version not in cache.versions(args.model):
            cached = ", ".join(f"v{v}" for v in cache.versions(args.model))
            raise CommandError(f"{args.model} v{args.version} is not in the cache (cached: {cached})")
        previous = cache.active_version(args.model)
        switched = previous != args.version
        if switched:
            self.activator.rollback(args.model, args.version, kind=None)
        cache.pin(args.model, args.version)
        self.activator.events.emit("pinned", model=args.model, version=args.version, previous=previous,
                                   switched=switched, reason=f"operator pin (command {command.id})")
        return Reply(True, f"{args.model} pinned to v{args.version}" + (" (now serving)" if switched else ""),
                     data={"model": args.model, "version": args.version, "switched": switched})

    def unpin(self, command: Command) -> Reply:
        """Remove the pin of ``model`` (OTA updates it again). Raises CommandError: bad args, unknown model."""
        args = _args(_ModelArgs, command)
        cache = self._cache_with(args.model)
        was = pinned_version(cache, args.model)
        cache.pin(args.model, None)
        if was is not None:
            self.activator.events.emit("unpinned", model=args.model, version=was,
                                       reason=f"operator unpin (command {command.id})")
        message = f"{args.model} unpinned (was v{was})" if was is not None else f"{args.model} was not pinned"
        return Reply(True, message, data={"model": args.model, "was": was})

    def config(self, command: Command) -> Reply:
        """Change runtime settings, all or nothing. Raises CommandError: none given, unknown or bad (named)."""
        if not command.args:
            raise CommandError("config needs at least one setting, e.g. {\"mqtt.telemetry_seconds\": 30}")
        applied = self.settings.update(command.args)
        if "log_level" in applied:
            logging.getLogger().setLevel(str(applied["log_level"]))
        return Reply(True, "set " + ", ".join(f"{k}={v}" for k, v in sorted(applied.items())),
                     data={"applied": applied, "settings": self.settings.snapshot()})

    def reload(self, command: Command) -> Reply:
        """Serve whatever the cache marks active (after a CLI change); reports the models that changed."""
        _args(_NoArgs, command)
        changed = self.activator.sync(reason=f"reload command {command.id}")
        return Reply(True, f"reloaded: {', '.join(changed) or 'nothing changed'}", data={"changed": changed})

    def shadow(self, command: Command) -> Reply:
        """Start (``share`` > 0) or stop (``share`` 0) the shadow run of a cached version of ``model``.

        Raises:
            CommandError: bad arguments, monitoring off, unknown model, a version not cached or the active one.
            CacheError, ModelError, IntegrityError: the candidate does not load.
        """
        args = _args(_ShadowArgs, command)
        if self.monitor is None:
            raise CommandError("monitoring is off on this device ([monitoring] enabled = false)")
        cache = self._cache_with(args.model)
        if args.share == 0:
            figures = self.monitor.stop_shadow(args.model, f"stopped by command {command.id}")
            return Reply(True, f"{args.model}: shadow stopped" if figures else f"{args.model}: no shadow was running",
                         data={"model": args.model, "shadow": figures})
        if args.version is None:
            raise CommandError("argument 'args.version' is required to start a shadow run")
        if args.version not in cache.versions(args.model):
            cached = ", ".join(f"v{v}" for v in cache.versions(args.model))
            raise CommandError(f"{args.model} v{args.version} is not in the cache (cached: {cached})")
        plan = ShadowPlan(args.model, args.version, args.share, args.queue, args.promote_after, args.min_agreement)
        try:
            figures = self.monitor.start_shadow(plan)
        except InputError as e:
            raise CommandError(e.one_line()) from e
        return Reply(True, f"{args.model}: shadowing v{args.version} on {args.share:.0%} of inputs",
                     data={"model": args.model, "shadow": figures})

    def _cache_with(self, model: str) -> ModelCache:
        cache = self.store.cache
        if model not in cache.names():
            raise CommandError(f"unknown model {model[:64]!r} (cached: {', '.join(cache.names()) or 'none'})")
        return cache

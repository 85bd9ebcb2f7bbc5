"""Fleet commands: the dispatcher (parse, authenticate, run once, reply) and the device's handlers.

:class:`Dispatcher` turns one ``(verb, payload)`` into one :class:`Reply` and
never raises. Per command: parse and bound the payload
(:mod:`edge_runtime.commands.parse`); verify a signed envelope, or refuse an
unsigned one for a verb in ``signed_verbs`` (:mod:`edge_runtime.commands.auth`);
claim the id in the :class:`~edge_runtime.commands.ledger.CommandLedger` so it
runs once (a redelivery gets the stored reply with ``"duplicate": true``; one
arriving while the first still runs gets ``"in_progress": true`` and is not
run); run the handler; store its reply. A failure anywhere is
``Reply(ok=False, message=<one line>)``, with the id when it can be recovered.
Replies of commands that ran, failures included, are stored: an id is used up
once its handler has run. The ledger keeps a digest of each id's verb and args:
an id sent again with a *different* command is not run and gets an error reply
with ``"duplicate": true, "conflict": "id reused with different args"`` (a
silent replay of the first reply would tell the operator their new command ran).

Unsigned commands have an age limit too (``max_age_seconds``: ``ts`` more than
that behind or ahead of the device clock is refused, "expired timestamp"),
unless the id already ran, which gets its stored reply. A device clock before
:data:`CLOCK_FLOOR` (no RTC, not yet synchronised: a Pi boots in 1970) cannot
judge age at all: then only ``ping`` and ``status`` are answered (the ping
reply shows the device clock) and every other verb is refused until the clock
is set.

:class:`DeviceCommands` supplies the handlers; the arguments of each verb::

    ping     {}                                  -> {"pong": <command ts>, "device_ts": <device clock>}
    status   {}                                  -> the daemon's status dict + runtime settings
    update   {"url": str, "sha256"?: hex, "size"?: int}   download, verify, install, activate
    rollback {"model": str, "version"?: int}     serve that cached version (default: previous)
    pin      {"model": str, "version": int}      serve it, keep it from gc, skip it in OTA polling
    unpin    {"model": str}
    config   {"<setting>": value, ...}           see runtime_settings.RuntimeSettings; all or nothing
    reload   {}                                  serve what the cache marks active (like SIGHUP)

A pin freezes *automatic* updates: the OTA poller skips a pinned model (it
calls :func:`pinned_version`). ``rollback`` of a pinned model is refused, naming
the pin, and an explicit ``update`` installs without activating (the pin wins:
change it with ``pin``/``unpin``); the pinned version stays protected from gc.
Settings changed by ``config`` last until the daemon restarts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from edge_runtime.commands.auth import SIGNED_VERBS, CommandAuth, is_signed_envelope
from edge_runtime.commands.ledger import CommandLedger
from edge_runtime.commands.parse import Command, Reply, best_effort_id, check_verb, command_from_object, load_object
from edge_runtime.commands.runtime_settings import RuntimeSettings
from edge_runtime.config.model import in_range
from edge_runtime.config.typed_toml import build
from edge_runtime.errors import CommandError, ConfigError, EdgeRuntimeError

if TYPE_CHECKING:
    from edge_runtime.cache.versions import ModelCache
    from edge_runtime.update.activation import Activator
    from edge_runtime.update.ota import OtaUpdater
    from edge_runtime.update.store import ModelStore

__all__ = [
    "CLOCK_FLOOR",
    "MODEL_VERBS",
    "SIGNED_VERBS",
    "Command",
    "DeviceCommands",
    "Dispatcher",
    "Handler",
    "Reply",
    "pinned_version",
]

MODEL_VERBS = frozenset({"update", "rollback", "pin", "unpin", "reload"})
"""Verbs that change what serves; they may take long (a download), so the bridge runs them apart."""
CLOCK_FLOOR = 1_767_225_600.0
"""2026-01-01 UTC, before this release was built: a device clock earlier than this is not set."""
UNTIMED_VERBS = frozenset({"ping", "status"})
"""Read-only verbs still answered while the device clock is not set."""
CONFLICT = "id reused with different args"
Handler = Callable[[Command], Reply]
"""Runs one command; raises EdgeRuntimeError (its one-line message becomes the reply) to fail."""
_log = logging.getLogger(__name__)
T = TypeVar("T")


def pinned_version(cache: ModelCache, name: str) -> int | None:
    """The version of ``name`` an operator pinned, or None. The OTA poller skips pinned models.

    Raises CacheError: the state file is corrupt.
    """
    return cache.state.load().model(name).pinned


def pin_refusal(cache: ModelCache, name: str, serving: int | None = None) -> str | None:
    """Why serving ``serving`` of ``name`` (None: whichever a rollback picks) is refused, or None when it is not.

    The pin wins over a rollback or an activation: it is the operator's standing
    decision, changed only with ``pin``/``unpin``, so ``status``, ``models list``
    and the events never show a pin the device does not serve.

    Raises CacheError: the state file is corrupt.
    """
    pinned = pinned_version(cache, name)
    if pinned is None or pinned == serving:
        return None
    return f"{name} is pinned to v{pinned}: unpin it first, or pin the version to serve"


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
    url: str = field(metadata={"check": _non_empty})
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

    def __init__(self, activator: Activator, ota: OtaUpdater, store: ModelStore, settings: RuntimeSettings,
                 status: Callable[[], Mapping[str, Any]], *, clock: Callable[[], float] = time.time) -> None:
        self.activator = activator
        self.ota = ota
        self.store = store
        self.settings = settings
        self._status = status
        self._clock = clock

    def handlers(self) -> dict[str, Handler]:
        """verb -> handler, for :class:`Dispatcher`."""
        return {"ping": self.ping, "status": self.status, "update": self.update, "rollback": self.rollback,
                "pin": self.pin, "unpin": self.unpin, "config": self.config, "reload": self.reload}

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
        result = self.ota.update_from_url(args.url, expected_sha256=args.sha256, expected_size=args.size)
        state = "active (on probation)" if result.active else "installed, not active"
        if (refused := pin_refusal(self.ota.store.cache, result.name, result.version)) is not None:
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

    def _cache_with(self, model: str) -> ModelCache:
        cache = self.store.cache
        if model not in cache.names():
            raise CommandError(f"unknown model {model[:64]!r} (cached: {', '.join(cache.names()) or 'none'})")
        return cache


class Dispatcher:
    """Parses, authenticates and runs each command once; :meth:`handle` never raises.

    ``signed_verbs``: verbs refused unless signed (needs ``auth``). A signed
    envelope for any verb is verified when ``auth`` is set and refused when not.
    ``device`` and ``groups`` are what signed commands may be addressed to.
    ``max_age_seconds`` (None: no limit) bounds how far an unsigned command's
    ``ts`` may lie from ``clock`` (wall-clock Unix seconds); see the module doc.
    """

    def __init__(self, handlers: Mapping[str, Handler], *, ledger: CommandLedger, auth: CommandAuth | None,
                 signed_verbs: Collection[str] = SIGNED_VERBS, max_bytes: int, max_depth: int, device: str,
                 groups: Collection[str] = (), max_age_seconds: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if signed_verbs and auth is None:
            raise ValueError("signed_verbs need a CommandAuth to verify them")
        self._handlers = dict(handlers)
        self._ledger = ledger
        self._auth = auth
        self._signed_verbs = frozenset(signed_verbs)
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self.device = device
        self.groups = tuple(groups)
        self.max_age_seconds = max_age_seconds
        self._clock = clock

    def handle(self, verb: str, payload: bytes) -> Reply:
        """Handle the ``payload`` received on the ``.../cmd/<verb>`` topic; return the reply to send."""
        try:
            return self._handle(verb, payload)
        except Exception:  # the command worker must survive any bug and keep answering
            _log.exception("command %r crashed the dispatcher", verb[:32])
            return Reply(False, "internal error while handling the command (see the device log)",
                         best_effort_id(payload))

    def parse(self, verb: str, payload: bytes) -> Command:
        """Parse and authenticate without running anything.

        Raises:
            CommandError: refused (malformed, unsigned when required, bad signature, ...).
        """
        check_verb(verb)
        doc = load_object(payload, max_bytes=self.max_bytes, max_depth=self.max_depth)
        if is_signed_envelope(doc):
            if self._auth is None:
                raise CommandError("signed commands are not enabled on this device (no operator keys configured)")
            return self._auth.verify_envelope(doc, verb, device=self.device, groups=self.groups)
        if verb in self._signed_verbs:
            raise CommandError(f"command {verb!r} must be signed by an operator key")
        return command_from_object(doc, verb)

    def _handle(self, verb: str, payload: bytes) -> Reply:
        try:
            command = self.parse(verb, payload)
        except CommandError as e:
            return Reply(False, e.one_line(), best_effort_id(payload))
        handler = self._handlers.get(verb)
        if handler is None:
            return Reply(False, f"command verb {verb!r} is not supported by this device", command.id)
        refused = self._check_time(command)
        if refused is not None:
            return refused
        try:
            claim = self._ledger.claim(command.id, _digest(command))
        except CommandError as e:  # without the ledger "run once" cannot be kept: do not run
            return Reply(False, f"{verb} not run: {e.one_line()}", command.id)
        if claim.conflict:
            return Reply(False, f"command id {command.id!r} was already used for a different command "
                                "(verb or args differ); nothing was run: send it with a new id", command.id,
                         {"duplicate": True, "conflict": CONFLICT})
        if claim.running:
            return Reply(False, f"command {command.id!r} is already running; its reply follows", command.id,
                         {"duplicate": True, "in_progress": True})
        if claim.reply is not None:
            return dataclasses.replace(claim.reply, id=command.id, data={**claim.reply.data, "duplicate": True})
        reply = self._run(handler, command)
        try:
            self._ledger.record(command.id, reply)
        except CommandError as e:
            _log.error("command %s ran but its reply was not stored: %s", command.id, e.one_line())
        return reply

    def _check_time(self, command: Command) -> Reply | None:
        """The refusal of a command the device clock cannot vouch for, or None to go on."""
        now = self._clock()
        if now < CLOCK_FLOOR:
            if command.verb in UNTIMED_VERBS:
                return None  # read-only, so safe whatever their age; the ping reply shows the clock
            return Reply(False, f"{command.verb} refused: the device clock is not set ({now:.0f} is before "
                                f"{CLOCK_FLOOR:.0f}), so the command's age cannot be checked; only "
                                f"{' and '.join(sorted(UNTIMED_VERBS))} are answered until it is", command.id)
        if command.signed_by is not None or self.max_age_seconds is None:
            return None  # signed commands: CommandAuth checked ts already
        age = now - command.ts
        if abs(age) <= self.max_age_seconds:
            return None
        try:
            stored = self._ledger.lookup(command.id)
        except CommandError:
            stored = None
        if stored is not None:
            return dataclasses.replace(stored, data={**stored.data, "duplicate": True})  # a late redelivery
        where = f"{age:.0f} s old" if age > 0 else f"{-age:.0f} s ahead of the device clock"
        return Reply(False, f"expired timestamp: command ts is {where} (limit {self.max_age_seconds:g} s); "
                            "send it again with the current time", command.id)

    def _run(self, handler: Handler, command: Command) -> Reply:
        signer = f" (signed by {', '.join(k[:16] for k in command.signed_by)})" if command.signed_by else ""
        _log.info("running command %s %s%s", command.verb, command.id, signer)
        try:
            reply = handler(command)
        except EdgeRuntimeError as e:
            reply = Reply(False, f"{command.verb} failed: {e.one_line()}")
        except Exception as e:  # a handler bug is one failed command, not a dead command worker
            _log.exception("command %s %s crashed", command.verb, command.id)
            reply = Reply(False, f"{command.verb} failed: internal error ({type(e).__name__}; see the device log)")
        return dataclasses.replace(reply, id=command.id)


def _digest(command: Command) -> str:
    """SHA-256 of the verb and args: what must match for a repeated id to be the same command."""
    text = json.dumps({"verb": command.verb, "args": dict(command.args)}, sort_keys=True, separators=(",", ":"),
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()

"""The persistent state of the model cache: ``<state>/state.json``, typed and locked.

Per model name it records the anti-rollback floor (``highest`` version ever
installed), an optional ``pinned`` version, the ``probation`` record of a
freshly activated version and the versions whose gate ``failed`` (not retried
without ``--force``); globally a ``boot_count``. On disk it is JSON with a
``schema`` number, replaced with temp + fsync + rename so a crash leaves the old
or the new file, never a torn one.

A missing file means a fresh device. A file that exists but cannot be parsed is
an error (:class:`CacheError`), never a silent reset: resetting would drop the
anti-rollback floor and let an old, vulnerable model back in.

Writers go through :meth:`StateStore.update`, a read-modify-write under a lock
that is both a ``threading.RLock`` (threads of the daemon) and an ``flock`` on
``<state>/state.lock`` (the daemon and a CLI process), so no update is lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime._util.fsutil import CLOEXEC, NOFOLLOW, atomic_write, make_private_dir, read_capped
from edge_runtime._util.strict_text import load_json
from edge_runtime.bundle.manifest import is_valid_name
from edge_runtime.errors import CacheError

__all__ = [
    "LOCK_FILE",
    "MAX_FAILED_VERSIONS",
    "STATE_FILE",
    "STATE_SCHEMA",
    "FailedVersion",
    "ModelState",
    "Probation",
    "State",
    "StateStore",
    "decode_state",
]

STATE_SCHEMA = 1
STATE_FILE = "state.json"
LOCK_FILE = "state.lock"
MAX_STATE_BYTES = 4 << 20
_MAX_INT = 2**53
#: Gate failures remembered per model (the newest); older ones may be retried.
MAX_FAILED_VERSIONS = 16
_MAX_REASON = 500
_SHA256_CHARS = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Probation:
    """A version on trial after activation, and the version to fall back to.

    ``started_at`` is a Unix timestamp; ``boot_attempts`` counts daemon starts
    while on probation, so a model that crashes the process is caught too.
    """

    version: int
    previous: int | None
    started_at: float
    inferences: int = 0
    errors: int = 0
    boot_attempts: int = 0


@dataclass(frozen=True)
class FailedVersion:
    """A version whose gate failed: OTA and ``models activate/install`` refuse it without ``--force``.

    ``sha256`` is the bundle's (empty when a cached version was gated, with no
    bundle at hand); ``manifest_sha256`` that of its signed manifest bytes;
    ``at`` a Unix timestamp.
    """

    version: int
    reason: str
    sha256: str
    manifest_sha256: str
    at: float


@dataclass(frozen=True)
class ModelState:
    """What is remembered about one model name."""

    highest: int = 0
    pinned: int | None = None
    probation: Probation | None = None
    failed: tuple[FailedVersion, ...] = ()

    def failure(self, version: int) -> FailedVersion | None:
        """The recorded gate failure of ``version``, if any."""
        return next((f for f in self.failed if f.version == version), None)


@dataclass(frozen=True)
class State:
    """The whole state file. Treat as immutable: derive new states with the helpers."""

    boot_count: int = 0
    models: Mapping[str, ModelState] = field(default_factory=dict)
    #: Highest OTA channel-document sequence accepted (replay protection).
    channel_sequence: int = 0

    def model(self, name: str) -> ModelState:
        """The state of ``name`` (a fresh :class:`ModelState` if never seen)."""
        return self.models.get(name, ModelState())

    def with_model(self, name: str, **changes: Any) -> State:
        """A copy where model ``name`` has ``changes`` applied (highest, pinned, probation)."""
        models = dict(self.models)
        models[name] = dataclasses.replace(self.model(name), **changes)
        return dataclasses.replace(self, models=models)

    def with_floor_raised(self, name: str, version: int) -> State:
        """This state if ``name``'s anti-rollback floor is already at least ``version``, else a raised copy."""
        return self if self.model(name).highest >= version else self.with_model(name, highest=version)

    def with_failure(self, name: str, failed: FailedVersion) -> State:
        """A copy that records ``failed`` for ``name`` (replacing that version's record; newest kept)."""
        reason = failed.reason[:_MAX_REASON]
        kept = [f for f in self.model(name).failed if f.version != failed.version]
        kept.append(dataclasses.replace(failed, reason=reason))
        return self.with_model(name, failed=tuple(kept[-MAX_FAILED_VERSIONS:]))

    def without_failure(self, name: str, version: int) -> State:
        """This state if ``version`` of ``name`` has no failure recorded, else a copy without it."""
        if self.model(name).failure(version) is None:
            return self
        return self.with_model(name, failed=tuple(f for f in self.model(name).failed if f.version != version))

    def to_json(self) -> bytes:
        """The on-disk form: sorted, indented JSON with the schema number."""
        models = {}
        for k, v in sorted(self.models.items()):
            models[k] = dataclasses.asdict(v)
            if not v.failed:
                del models[k]["failed"]  # the pre-"failed" form, so an older runtime still reads it
        doc = {
            "schema": STATE_SCHEMA,
            "boot_count": self.boot_count,
            "channel_sequence": self.channel_sequence,
            "models": models,
        }
        return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"


class _Obj:
    """Typed access to one JSON object; every error names where it is."""

    def __init__(self, obj: object, where: str, keys: tuple[str, ...]) -> None:
        if not isinstance(obj, dict):
            raise CacheError(f"{where} must be a JSON object")
        unknown = sorted(set(obj) - set(keys))
        if unknown:
            raise CacheError(f"{where} has unknown key {unknown[0]!r}")
        self.obj: dict[str, Any] = obj
        self.where = where

    def value(self, key: str) -> Any:
        if key not in self.obj:
            raise CacheError(f"{self.where}.{key} is missing")
        return self.obj[key]

    def int_(self, key: str, lo: int = 0) -> int:
        value = self.value(key)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= _MAX_INT:
            raise CacheError(f"{self.where}.{key} must be an integer >= {lo}")
        return value

    def opt_int(self, key: str, lo: int = 1) -> int | None:
        return None if self.value(key) is None else self.int_(key, lo)

    def float_(self, key: str) -> float:
        value = self.value(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e12:
            raise CacheError(f"{self.where}.{key} must be a non-negative number")
        return float(value)


def _probation(raw: object, where: str) -> Probation | None:
    if raw is None:
        return None
    f = _Obj(raw, where, ("version", "previous", "started_at", "inferences", "errors", "boot_attempts"))
    return Probation(
        version=f.int_("version", 1),
        previous=f.opt_int("previous"),
        started_at=f.float_("started_at"),
        inferences=f.int_("inferences"),
        errors=f.int_("errors"),
        boot_attempts=f.int_("boot_attempts"),
    )


def _sha256(f: _Obj, key: str, *, empty: bool) -> str:
    value = f.value(key)
    if not isinstance(value, str) or not ((empty and not value) or
                                          (len(value) == 64 and set(value) <= _SHA256_CHARS)):
        raise CacheError(f"{f.where}.{key} must be a sha256 hex digest")
    return value


def _failed(raw: object, where: str) -> tuple[FailedVersion, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_FAILED_VERSIONS:
        raise CacheError(f"{where} must be a list of at most {MAX_FAILED_VERSIONS} records")
    out = []
    for i, item in enumerate(raw):
        f = _Obj(item, f"{where}[{i}]", ("version", "reason", "sha256", "manifest_sha256", "at"))
        reason = f.value("reason")
        if not isinstance(reason, str) or len(reason) > _MAX_REASON:
            raise CacheError(f"{f.where}.reason must be a string of at most {_MAX_REASON} characters")
        out.append(FailedVersion(version=f.int_("version", 1), reason=reason,
                                 sha256=_sha256(f, "sha256", empty=True),
                                 manifest_sha256=_sha256(f, "manifest_sha256", empty=False), at=f.float_("at")))
    return tuple(out)


def decode_state(data: bytes, where: str = STATE_FILE) -> State:
    """Parse state-file bytes strictly.

    Raises:
        CacheError: not UTF-8 JSON, another schema, or a field is missing,
            mistyped, out of range or unknown (the message names it).
    """
    try:
        doc = load_json(data, "state file", error=CacheError)
    except CacheError as e:
        raise CacheError(f"{where}: state file is corrupt ({e})") from e
    top = _Obj(doc, where, ("schema", "boot_count", "models", "channel_sequence"))
    schema = top.int_("schema")
    if schema != STATE_SCHEMA:
        raise CacheError(f"{where}: state schema {schema} is not supported (expected {STATE_SCHEMA})")
    models_raw = top.value("models")
    if not isinstance(models_raw, dict):
        raise CacheError(f"{where}.models must be a JSON object")
    models: dict[str, ModelState] = {}
    for name, raw in models_raw.items():
        if not is_valid_name(name):  # manifest.name's rule: every name in the state is a directory name
            raise CacheError(f"{where}.models has an invalid model name {name!r}")
        mw = f"{where}.models[{name!r}]"
        f = _Obj(raw, mw, ("highest", "pinned", "probation", "failed"))
        models[name] = ModelState(
            highest=f.int_("highest"),
            pinned=f.opt_int("pinned"),
            probation=_probation(f.value("probation"), f"{mw}.probation"),
            failed=_failed(f.obj["failed"], f"{mw}.failed") if "failed" in f.obj else (),
        )
    sequence = top.int_("channel_sequence") if "channel_sequence" in top.obj else 0
    return State(boot_count=top.int_("boot_count"), models=models, channel_sequence=sequence)


class StateStore:
    """Loads and atomically updates ``<state_dir>/state.json``.

    Share one instance per process: the lock is re-entrant for the thread that
    holds it, but two instances in one thread would wait on each other's flock.
    """

    def __init__(self, state_dir: Path) -> None:
        """Use ``state_dir`` (created 0700 if missing).

        Raises:
            CacheError: the state dir cannot be created or is a symlink/non-dir.
        """
        try:
            make_private_dir(state_dir)
        except OSError as e:
            raise CacheError(f"state dir {state_dir} is unusable: {e}") from e
        self.state_dir = state_dir
        self.path = state_dir / STATE_FILE
        self.lock_path = state_dir / LOCK_FILE
        self._mutex = threading.RLock()
        self._depth = 0
        self._fd = -1

    def load(self) -> State:
        """The current state; a fresh :class:`State` when the file does not exist.

        Raises:
            CacheError: the file is unreadable, too large or corrupt.
        """
        try:
            data = read_capped(self.path, MAX_STATE_BYTES)
        except FileNotFoundError:
            return State()
        except OSError as e:
            raise CacheError(f"{self.path}: cannot read state file: {e.strerror or e}") from e
        return decode_state(data, str(self.path))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the state lock (threads and processes); re-entrant in one thread.

        Raises:
            CacheError: the lock file cannot be opened or locked.
        """
        with self._mutex:
            if self._depth == 0:
                self._fd = self._acquire()
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    # Closing the descriptor drops the flock; a killed process
                    # drops it the same way, so a crash never leaves it held.
                    os.close(self._fd)
                    self._fd = -1

    def _acquire(self) -> int:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | NOFOLLOW | CLOEXEC, 0o600)
        except OSError as e:
            raise CacheError(f"{self.lock_path}: cannot open lock file: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            os.close(fd)
            raise CacheError(f"{self.lock_path}: cannot lock: {e.strerror or e}") from e
        return fd

    def update(self, fn: Callable[[State], State]) -> State:
        """Read, apply ``fn`` and write back, all under the lock; return the new state.

        ``fn`` must be a pure function of the state it is given. Nothing is
        written when it returns an equal state.

        Raises:
            CacheError: the state is corrupt or cannot be written.
        """
        with self.locked():
            old = self.load()
            new = fn(old)
            if new != old:
                try:
                    atomic_write(self.path, new.to_json())
                except OSError as e:
                    raise CacheError(f"{self.path}: cannot write state file: {e.strerror or e}") from e
            return new

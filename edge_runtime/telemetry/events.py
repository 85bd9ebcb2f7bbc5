"""Lifecycle events: one bus, many subscribers (log, events file, MQTT spool).

Every event is a flat JSON-ready dict with ``kind``, ``ts`` (Unix seconds),
``model``, ``version`` and a human ``reason``. The bus also appends each event
to ``events.jsonl`` in the state dir (0600, rotated at 1 MiB) so what happened
across restarts can be read back with nothing else running.

The kinds are a public contract (MQTT ``events`` topic, ``events.jsonl``): every
kind the package emits is in :data:`EventKind`, which mypy checks at each
``emit`` call, and the README's "Events" table lists each one.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

__all__ = ["EVENT_KINDS", "EventBus", "EventKind", "Subscriber", "read_events"]

EventKind = Literal[
    # the daemon
    "started", "stopped", "recovered", "state_recovered",
    # updates (OTA) and activation
    "update_available", "update_installed", "update_failed", "gate_failed", "activated", "activation_failed",
    "probation_started", "committed", "rolled_back", "rollback_failed", "load_failed", "reloaded",
    "trust_updated", "versions_revoked",
    # operator commands
    "operator_rollback", "pinned", "unpinned", "messages_dropped",
    # pipelines and their sources
    "pipeline_failed", "source_error", "source_failed", "source_recovered", "source_ended", "source_state_reset",
    "inference_error", "inference_recovered", "model_unavailable", "model_available",
    # liveness
    "source_stalled", "worker_stalled", "stall_cleared",
    # monitoring: drift, field accuracy, shadow runs
    "drift", "drift_cleared", "accuracy", "accuracy_recovered",
    "shadow_started", "shadow_passed", "shadow_failed", "shadow_stopped",
]
"""Every event kind edge-runtime emits; a new kind goes here and in the README's "Events" table."""

EVENT_KINDS: frozenset[str] = frozenset(get_args(EventKind))
"""The kinds of :data:`EventKind` as strings, for code that reads events back."""

Subscriber = Callable[[dict[str, Any]], None]
_ROTATE_BYTES = 1 << 20
_log = logging.getLogger("edge_runtime.telemetry.events")


class EventBus:
    """Fan events out to subscribers; a failing subscriber never stops the others."""

    def __init__(self, log_path: Path | None = None, clock: Callable[[], float] = time.time) -> None:
        self._log_path = log_path
        self._clock = clock
        self._lock = threading.Lock()
        self._subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> None:
        """Call ``fn(event)`` for every later event (from the emitting thread)."""
        with self._lock:
            self._subscribers.append(fn)

    def unsubscribe(self, fn: Subscriber) -> None:
        """Stop calling ``fn``; events emitted from now on no longer reach it (no-op if it never subscribed)."""
        with self._lock:
            if fn in self._subscribers:
                self._subscribers.remove(fn)

    def emit(self, kind: EventKind, *, model: str = "", version: int | None = None, reason: str = "",
             **data: Any) -> dict[str, Any]:
        """Publish one event and return it."""
        event: dict[str, Any] = {"kind": kind, "ts": round(self._clock(), 3), "model": model,
                                 "version": version, "reason": reason, **data}
        _log.info("event %s model=%s version=%s %s", kind, model or "-", version, reason)
        with self._lock:
            self._append(event)
            subscribers = list(self._subscribers)
        for fn in subscribers:
            try:
                fn(event)
            except Exception:  # a subscriber bug must not break the update path
                _log.exception("event subscriber failed")
        return event

    def _append(self, event: dict[str, Any]) -> None:
        if self._log_path is None:
            return
        line = (json.dumps(event, sort_keys=True, default=str) + "\n").encode()
        try:
            if self._log_path.exists() and self._log_path.stat().st_size > _ROTATE_BYTES:
                os.replace(self._log_path, self._log_path.with_name(self._log_path.name + ".1"))
            fd = os.open(self._log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as e:
            _log.warning("cannot append to %s: %s", self._log_path, e.strerror)


def read_events(path: Path) -> list[dict[str, Any]]:
    """Events from an ``events.jsonl`` file (oldest first); unreadable lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events

"""Gated activation with probation, fallback and a crash-loop guard.

Like an A/B slot with a commit step::

    gate child (load + warm-up + golden + latency gates, memory and time capped)
    -> load candidate in-process -> persist probation record
    -> atomic link swap + in-process swap -> probation (N inferences or T seconds:
    error rate, p95 vs the previous version) -> commit, or restore the previous.

The probation record (with a boot-attempt counter) is persisted *before* the
swap. Every start during probation bumps the counter first; past
``max_boot_attempts`` the start reverts to the previous version by itself, so a
model that crashes the process cannot keep a device in a crash loop.
Every failure keeps or restores the previous model and emits an event saying why.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.cache.state import Probation
from edge_runtime.config.model import ActivationConfig
from edge_runtime.errors import CacheError, EdgeRuntimeError
from edge_runtime.runtime.gates import GateReport, sample_feeds
from edge_runtime.runtime.loaded_model import LoadedModel
from edge_runtime.runtime.service import InferenceService
from edge_runtime.telemetry.events import EventBus, EventKind
from edge_runtime.update.store import ModelStore

__all__ = ["Activator"]

_log = logging.getLogger(__name__)


@dataclass
class _Probe:
    """Live probation of one model version (in memory; the record on disk is the guard)."""

    version: int
    previous: int | None
    baseline_p95_ms: float | None
    deadline: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def total(self) -> int:
        return len(self.latencies) + self.errors


class Activator:
    """Brings models up at boot and moves them between versions safely.

    ``clock`` is wall-clock seconds (probation deadlines, record timestamps).
    Thread-safe: one lock per model name serialises activations of that name.
    """

    def __init__(self, store: ModelStore, service: InferenceService, events: EventBus,
                 config: ActivationConfig, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.cache = store.cache
        self.service = service
        self.events = events
        self.config = config
        self.clock = clock
        self._locks: dict[str, threading.Lock] = {}
        self._probes: dict[str, _Probe] = {}
        self._probe_lock = threading.Lock()
        service.observe(self._on_inference)

    # ------------------------------------------------------------------ boot

    def boot(self, name: str) -> int | None:
        """Serve the active version of ``name`` at start-up; returns the version served.

        Applies the crash-loop guard first, then loads (re-hashing the files),
        warms up and swaps in. A version that fails to load falls back to the
        previous one. Never raises for a model problem: it is reported as an event.
        """
        with self._lock(name):
            record = self.cache.state.load().model(name).probation
            active = self.cache.active_version(name)
            if record is not None and record.version != active:
                self._set_probation(name, None)  # stale: the swap never happened
                record = None
            if record is not None:
                attempts = record.boot_attempts + 1
                if attempts > self.config.max_boot_attempts:
                    reason = (f"v{record.version} restarted {record.boot_attempts} times during probation "
                              "(crash loop)")
                    return self._revert(name, record.version, record.previous, reason)
                # Persisted before loading: if this start crashes too, the next one sees it.
                self._set_probation(name, dataclasses.replace(record, boot_attempts=attempts))
            if active is None:
                return None
            try:
                self._load_and_swap(name, active)
            except EdgeRuntimeError as e:
                fallback = self._fallback_version(name, active)
                reason = f"v{active} failed to load: {e.one_line()}"
                if fallback is None:
                    self.events.emit("load_failed", model=name, version=active, reason=reason)
                    return None
                return self._revert(name, active, fallback, reason)
            if record is not None:
                self._start_probe(name, record.version, record.previous, None)
            return active

    # ------------------------------------------------------------------ activation

    def activate(self, name: str, version: int, *, reason: str = "update", gated: GateReport | None = None,
                 force: bool = False) -> None:
        """Gate a cached version in a child process, load it here, swap it in and start its probation.

        ``gated`` is the report of a child gate already run on this version
        (OTA gates before it commits an install), so it is not run twice. A
        version whose gate failed before is refused unless ``force``.

        Raises:
            GateError, ModelError, IntegrityError, CacheError: the candidate was
                refused; the previous version keeps serving (an event says why).
        """
        with self._lock(name):
            report = gated
            if report is None:
                try:  # refused before any gate: not cached, untrusted now, or failed its gate before
                    self.store.check_not_failed(name, version, force=force)
                    manifest = self.cache.manifest(name, version)
                except EdgeRuntimeError as e:
                    self.events.emit("activation_failed", model=name, version=version, reason=e.one_line())
                    raise
                try:
                    report = self.store.gate(self.cache.version_dir(name, version), manifest)
                except EdgeRuntimeError as e:
                    self.events.emit("gate_failed", model=name, version=version, reason=e.one_line())
                    raise
            try:
                candidate = self.store.load(name, version)
            except EdgeRuntimeError as e:
                self.events.emit("activation_failed", model=name, version=version, reason=e.one_line())
                raise
            previous = self.cache.active_version(name)
            baseline = self.service.metrics.model_summary(name)["p95_ms"]
            self._set_probation(name, Probation(version=version, previous=previous, started_at=self.clock()))
            try:
                self.cache.activate(name, version)
            except EdgeRuntimeError:
                self._set_probation(name, None)
                candidate.close()
                raise
            self._swap_in(name, candidate)
            gates = f"golden {report.golden_passed}/{report.golden_total}"
            self.events.emit("activated", model=name, version=version, previous=previous,
                             reason=f"{reason}; gates passed ({gates})")
            self._start_probe(name, version, previous, baseline)

    def sync(self, *, reason: str = "SIGHUP") -> list[str]:
        """Serve whatever the cache marks active (after a CLI change or a reload command).

        Each model that changed version emits ``reloaded`` (an operator change:
        ``version``, ``previous``); one that does not load emits ``load_failed``.
        """
        changed = []
        for name in self.cache.names():
            active = self.cache.active_version(name)
            previous = self.service.add_slot(name).version
            if active is not None and previous != active:
                with self._lock(name):
                    try:
                        self._load_and_swap(name, active)
                    except EdgeRuntimeError as e:
                        self.events.emit("load_failed", model=name, version=active, reason=e.one_line())
                        continue
                changed.append(name)
                self.events.emit("reloaded", model=name, version=active, previous=previous,
                                 reason=f"{reason}: the cache marks v{active} active")
        return changed

    def rollback(self, name: str, version: int | None = None, *, reason: str = "operator rollback",
                 kind: EventKind | None = "operator_rollback") -> int:
        """Serve ``version`` (default: the previous one) now, ending any probation: an operator's choice.

        Emits ``kind`` (``version``, ``previous``; no ``failed_version``: nothing
        failed) unless ``kind`` is None (the caller reports the change itself).

        Raises:
            CacheError: nothing to roll back to. ModelError/IntegrityError: it does not load.
        """
        with self._lock(name):
            current = self.cache.active_version(name)
            target = version if version is not None else self.cache.previous_version(name)
            if target is None:
                raise CacheError(f"model {name!r} has no previous version to roll back to")
            self._load_and_swap(name, target, link=True)
            self._end_probe(name)
            if kind is not None:
                self.events.emit(kind, model=name, version=target, previous=current, reason=reason)
            return target

    # ------------------------------------------------------------------ probation

    def tick(self) -> None:
        """Finish every probation that is due (called periodically by the daemon)."""
        now = self.clock()
        with self._probe_lock:
            due = [(n, p) for n, p in self._probes.items() if self._due(p, now)]
        for name, probe in due:
            problem = self._judge(probe)
            with self._lock(name):
                if self._probes.get(name) is not probe:
                    continue  # superseded meanwhile
                if problem:
                    self._revert(name, probe.version, probe.previous, f"probation failed: {problem}")
                else:
                    self._end_probe(name)
                    self.events.emit("committed", model=name, version=probe.version,
                                     reason=f"probation passed ({probe.total} inferences, {probe.errors} errors)")

    def on_probation(self, name: str) -> int | None:
        """The version of ``name`` on probation, if any."""
        probe = self._probes.get(name)
        return None if probe is None else probe.version

    def _on_inference(self, name: str, version: int, latency_ms: float, ok: bool) -> None:
        probe = self._probes.get(name)
        if probe is None or probe.version != version:
            return
        with self._probe_lock:
            if ok:
                probe.latencies.append(latency_ms)
            else:
                probe.errors += 1

    def _due(self, probe: _Probe, now: float) -> bool:
        limit = self.config.probation_inferences
        too_many_errors = limit and probe.errors > self.config.max_error_rate * limit
        return bool(now >= probe.deadline or (limit and probe.total >= limit) or too_many_errors)

    def _judge(self, probe: _Probe) -> str:
        with self._probe_lock:
            latencies, errors, total = list(probe.latencies), probe.errors, probe.total
        if total and errors / total > self.config.max_error_rate:
            return f"error rate {errors}/{total} above {self.config.max_error_rate:.1%}"
        if latencies and probe.baseline_p95_ms is not None:
            p95 = float(np.percentile(latencies, 95))
            limit = probe.baseline_p95_ms * self.config.max_p95_ratio + self.config.p95_slack_ms
            if p95 > limit:
                return f"p95 latency {p95:.2f} ms above {limit:.2f} ms (previous p95 {probe.baseline_p95_ms:.2f} ms)"
        return ""

    def _start_probe(self, name: str, version: int, previous: int | None, baseline: float | None) -> None:
        with self._probe_lock:
            self._probes[name] = _Probe(version, previous, baseline, self.clock() + self.config.probation_seconds)
        self.events.emit("probation_started", model=name, version=version,
                         reason=f"{self.config.probation_inferences} inferences or "
                                f"{self.config.probation_seconds:g} s")

    def _end_probe(self, name: str) -> None:
        with self._probe_lock:
            self._probes.pop(name, None)
        self._set_probation(name, None)

    # ------------------------------------------------------------------ internals

    def _lock(self, name: str) -> threading.Lock:
        with self._probe_lock:
            return self._locks.setdefault(name, threading.Lock())

    def _set_probation(self, name: str, record: Probation | None) -> None:
        self.cache.state.update(lambda s: s.with_model(name, probation=record))

    def _fallback_version(self, name: str, failed: int) -> int | None:
        previous = self.cache.previous_version(name)
        if previous is not None and previous != failed:
            return previous
        older = [v for v in self.cache.versions(name) if v != failed]
        return max(older) if older else None

    def _load_and_swap(self, name: str, version: int, *, link: bool = False) -> None:
        model = self.store.load(name, version)
        if link:
            try:
                self.cache.rollback(name, version)
            except EdgeRuntimeError:
                model.close()
                raise
        self._swap_in(name, model)

    def _swap_in(self, name: str, model: LoadedModel) -> None:
        """Warm ``model`` up (first-run compilation happens here, never on a user's
        request), then publish it; in-flight requests finish on the old model."""
        self.service.warm_up(name, model, sample_feeds(model))
        self.service.add_slot(name).swap(model, drain_timeout=self.config.drain_timeout_seconds)
        self.service.metrics.set_version(name, model.version)

    def _revert(self, name: str, failed: int, target: int | None, reason: str) -> int | None:
        """Restore ``target`` (the version before ``failed``) and record why."""
        with self._probe_lock:
            self._probes.pop(name, None)
        self._set_probation(name, None)
        if target is None or target not in self.cache.versions(name):
            self.events.emit("rollback_failed", model=name, version=failed,
                             reason=f"{reason}; no previous version to restore")
            return None
        try:
            self._load_and_swap(name, target, link=True)
        except EdgeRuntimeError as e:
            self.events.emit("rollback_failed", model=name, version=target, reason=f"{reason}; {e.one_line()}")
            return None
        self.events.emit("rolled_back", model=name, version=target, failed_version=failed, reason=reason)
        return target

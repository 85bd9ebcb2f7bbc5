"""Liveness that means progress: the supervisor's verdict on whether to feed the systemd watchdog.

Every supervisor tick :meth:`Liveness.check` reads the heartbeats
(:mod:`edge_runtime._util.progress`) of each pipeline's source and worker threads and of the
API's serving loop, publishes their ages in the metrics, and decides:

- a **source** without progress for over ``liveness.stall_seconds`` (blocked
  in a call: OpenCV's open on a FIFO nobody writes, a hung RTSP server or
  camera driver) is reported (``source_stalled`` event, ERROR line,
  ``edge_source_stalls_total``) and restarted: its thread is abandoned (a
  blocked OpenCV call cannot be interrupted; the thread is a daemon thread
  and ends by itself if the call ever returns) and a fresh source starts;
- the daemon **cannot recover by itself** when a stalled source may not be
  restarted again (``max_restarts`` used within ``restart_window_seconds``,
  ``max_abandoned_threads`` threads still blocked, or a source type that is
  not restartable), when a pipeline's inference worker is stalled (a hung
  model call), when the API's serving loop is stalled, or when a thread or
  component died. Then the verdict names why: the daemon logs it, sends it as
  ``STATUS=``, and withholds ``WATCHDOG=1`` so systemd restarts the service.
  Giving up on a stalled source is reported once (``source_stalled`` with
  ``action = "gave_up"``); if the part makes progress again the verdict
  clears (``stall_cleared`` event) and the pings resume.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from edge_runtime._util.progress import Clock, RestartBudget
from edge_runtime.config.liveness import LivenessConfig
from edge_runtime.telemetry.events import EventBus, EventKind
from edge_runtime.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from edge_runtime.api.server import ApiServer
    from edge_runtime.pipelines.pipeline import Pipeline

__all__ = ["Component", "Liveness"]

_log = logging.getLogger(__name__)
_STALLED: dict[str, EventKind] = {"source": "source_stalled", "worker": "worker_stalled"}  # Pipeline.stalled() parts


class Component(Protocol):
    """A part started after the pipelines and stopped before them (OTA poller, MQTT bridge).

    ``alive`` is judged every supervisor tick while the daemon runs: False when
    one of its threads died or is stuck past its own bound; then the watchdog
    is withheld.
    """

    def start(self) -> None:
        """Start its threads. Raises EdgeRuntimeError/OSError if it cannot start."""
        ...

    def stop(self) -> None:
        """Stop its threads (safe to call twice)."""
        ...

    @property
    def alive(self) -> bool:
        """Its threads run and make progress."""
        ...


class Liveness:
    """Judges progress once per supervisor tick; see the module docstring for the policy.

    Called from the supervisor thread only. ``clock`` drives the restart
    budgets (monotonic seconds).
    """

    def __init__(self, config: LivenessConfig, events: EventBus, metrics: Metrics,
                 clock: Clock | None = None) -> None:
        self.config = config
        self.events = events
        self.metrics = metrics
        self._clock = clock
        self._budgets: dict[str, RestartBudget] = {}
        self._stalled: dict[str, tuple[str, str]] = {}  # pipeline -> (part, problem) of an unrestarted stall
        self._api_stalled = ""
        self.problem = ""
        """Why the watchdog is withheld now ("" while every part makes progress)."""

    def check(self, pipelines: Sequence[Pipeline], api: ApiServer | None, components: Sequence[Component]) -> str:
        """One tick: report and restart stalled sources; return (and keep in :attr:`problem`) what cannot recover."""
        bound = self.config.stall_seconds
        problems: list[str] = []
        for pipeline in pipelines:
            self.metrics.pipeline_progress(pipeline.name, pipeline.progress_age())
            if not pipeline.alive:
                problems.append(f"pipeline {pipeline.name}: a thread died")
                continue
            stall = pipeline.stalled(bound)
            if stall is None:
                self._cleared(pipeline)
                continue
            problem = self._on_stall(pipeline, *stall, pipelines)
            if problem:
                problems.append(problem)
        if api is not None:
            age = api.progress.age()
            self.metrics.api_progress(age)
            if not api.alive:
                problems.append("the API server thread ended")
            elif age > bound:
                self._api_stalled = self._api_stalled or f"the API serving loop made no progress for {age:.1f} s"
                problems.append(self._api_stalled)
            else:
                self._api_stalled = ""
        problems += [f"{type(c).__name__} is not alive" for c in components if not c.alive]
        self.problem = "; ".join(problems)
        return self.problem

    # ------------------------------------------------------------------ stalls

    def _on_stall(self, pipeline: Pipeline, part: str, age: float, pipelines: Sequence[Pipeline]) -> str:
        """Restart a stalled source if allowed; else the reason the daemon cannot recover ("" when restarted)."""
        known = self._stalled.get(pipeline.name)
        if known is not None and known[0] == part:
            return known[1]  # reported once per stall; the text stays the same, so it is logged once
        what = f"pipeline {pipeline.name}: {part} {pipeline.source.label if part == 'source' else pipeline.model}"
        stuck = f"{what} made no progress for {age:.1f} s (bound {self.config.stall_seconds:g} s)"
        if part == "source":
            why_not = self._why_not_restart(pipeline, pipelines)
            if not why_not:
                return self._restart(pipeline, stuck, age)
        else:
            why_not = "a stalled inference cannot be interrupted"
        problem = f"{stuck}; {why_not}"
        self._stalled[pipeline.name] = (part, problem)
        self.metrics.stall(pipeline.name)
        _log.error("%s; not restarting it: %s", stuck, why_not)
        self.events.emit(_STALLED[part], model=pipeline.model, reason=problem, pipeline=pipeline.name,
                         source=pipeline.source.label, stalled_s=round(age, 3), action="gave_up",
                         restarts=pipeline.restarts)
        return problem

    def _why_not_restart(self, pipeline: Pipeline, pipelines: Sequence[Pipeline]) -> str:
        if not pipeline.restartable:
            return f"a {pipeline.config.source.type!r} source cannot be restarted"
        abandoned = sum(p.abandoned_threads for p in pipelines)
        if abandoned >= self.config.max_abandoned_threads:
            return (f"{abandoned} abandoned source threads are still blocked "
                    f"(liveness.max_abandoned_threads = {self.config.max_abandoned_threads})")
        budget = self._budget(pipeline.name)
        if not budget.take():
            return (f"{budget.max_restarts} restarts within {budget.window_seconds:g} s used "
                    f"(liveness.max_restarts)")
        return ""

    def _restart(self, pipeline: Pipeline, stuck: str, age: float) -> str:
        old = pipeline.source.label
        self.metrics.stall(pipeline.name)
        try:
            pipeline.restart_source()
        except Exception as e:  # building the source failed (state db, config): cannot recover by ourselves
            _log.exception("%s; restarting it failed", stuck)
            return f"{stuck}; restarting it failed: {e}"
        self._stalled.pop(pipeline.name, None)
        _log.error("%s; abandoned its thread and restarted it (restart %d)", stuck, pipeline.restarts)
        self.events.emit("source_stalled", model=pipeline.model, reason=f"{stuck}; restarted", pipeline=pipeline.name,
                         source=old, stalled_s=round(age, 3), action="restarted", restarts=pipeline.restarts)
        return ""

    def _cleared(self, pipeline: Pipeline) -> None:
        known = self._stalled.pop(pipeline.name, None)
        if known is None:
            return
        part = known[0]
        _log.info("pipeline %s: the %s makes progress again", pipeline.name, part)
        self.events.emit("stall_cleared", model=pipeline.model, reason=f"pipeline {pipeline.name}: the {part} "
                         "makes progress again", pipeline=pipeline.name, part=part)

    def _budget(self, name: str) -> RestartBudget:
        budget = self._budgets.get(name)
        if budget is None:
            args = (self.config.max_restarts, self.config.restart_window_seconds)
            budget = self._budgets[name] = RestartBudget(*args) if self._clock is None else RestartBudget(
                *args, clock=self._clock)
        return budget

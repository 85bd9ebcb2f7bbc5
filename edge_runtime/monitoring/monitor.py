"""The monitor: what the inference service calls after every image prediction.

Per prediction (:meth:`Monitor.observe`, on the inferring thread, a few tens
of microseconds): a ``result_id`` goes into each result, the features go into
the drift windows of the serving version (when its bundle ships a
reference), the result waits for its ground truth, and a running shadow gets
its share. A bug here is logged and counted, never raised into inference.

It also takes ground truth (MQTT ``truth/<pipeline>``, API
``POST /v2/models/<name>/truth``), starts and stops shadow runs (config,
fleet ``shadow``), and reports everything to telemetry and ``/metrics``.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edge_runtime._util.strict_text import load_json
from edge_runtime.bundle.reference_stats import Baseline
from edge_runtime.config.monitoring import MonitoringConfig
from edge_runtime.errors import InputError
from edge_runtime.monitoring.drift import DriftMonitor
from edge_runtime.monitoring.shadow import ShadowPlan, ShadowRun, Source
from edge_runtime.monitoring.truth import TruthMatcher, parse_truth
from edge_runtime.runtime.loaded_model import LoadedModel, Prediction
from edge_runtime.telemetry.events import EventBus

__all__ = ["MAX_TRUTH_BYTES", "Monitor"]

_log = logging.getLogger(__name__)
MAX_TRUTH_BYTES = 256 << 10
_MAX_TRUTHS = 256
Loader = Callable[[str, int], LoadedModel]
Promote = Callable[[str, int], None]
Rollback = Callable[[str, int, str], None]


@dataclass
class _Serving:
    version: int
    drift: DriftMonitor | None
    baseline: Baseline


class Monitor:
    """Drift, field accuracy and shadow runs of every served model."""

    def __init__(self, config: MonitoringConfig, events: EventBus, *, loader: Loader | None = None,
                 promote: Promote | None = None, rollback: Rollback | None = None,
                 pipelines: Mapping[str, str] | None = None) -> None:
        """``pipelines`` maps pipeline names to their model, for truth sent on ``truth/<pipeline>``."""
        self.config, self.events = config, events
        self._loader, self._promote = loader, promote
        self._pipelines = dict(pipelines or {})
        self.truth = TruthMatcher(config, events.emit, rollback=rollback)
        self._serving: dict[str, _Serving] = {}
        self._shadows: dict[str, ShadowRun] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._prefix = os.urandom(3).hex()  # ids stay unique across restarts without any state
        self.errors = 0

    # ------------------------------------------------------------------ the hot path

    def observe(self, name: str, model: LoadedModel, source: Source, prediction: Prediction) -> None:
        """Book one prediction of ``model`` serving ``name`` on input ``source`` (never raises)."""
        try:
            self._observe(name, model, source, prediction)
        except Exception:  # monitoring must never fail an inference
            self.errors += 1
            if self.errors == 1 or self.errors % 1000 == 0:
                _log.exception("monitoring failed on a %s prediction (%d failures so far)", name, self.errors)

    def _observe(self, name: str, model: LoadedModel, source: Source, prediction: Prediction) -> None:
        results = prediction.results
        if not results:
            return
        rid = f"{self._prefix}-{next(self._ids)}"
        for i, result in enumerate(results):
            result["result_id"] = rid if i == 0 else f"{rid}.{i}"
        serving = self._serving.get(name)
        if serving is None or serving.version != model.version:
            serving = self._switch(name, model)
        if serving.drift is not None and prediction.tensor is not None:
            serving.drift.add(model.features(prediction.tensor, prediction.outputs, results[0]))
        for result in results:  # every item of a batch can get its truth
            self.truth.register(name, model.version, result["result_id"], result, serving.baseline)
        shadow = self._shadows.get(name)
        if shadow is not None:
            if shadow.plan.version == model.version:
                # On the inferring thread: never wait here for the candidate's inference in flight.
                self.stop_shadow(name, f"v{model.version} is now the active version", wait=0.0)
            else:
                shadow.offer(source, prediction)

    def _switch(self, name: str, model: LoadedModel) -> _Serving:
        with self._lock:
            serving = self._serving.get(name)
            if serving is not None and serving.version == model.version:
                return serving
            ref = model.reference
            drift = None
            if ref is not None:
                drift = DriftMonitor(name, model.version, ref, model.features.names, self.config, self.events.emit)
            if serving is not None:
                self.truth.forget(name, serving.version)
            serving = self._serving[name] = _Serving(model.version, drift, ref.baseline if ref else Baseline())
            return serving

    # ------------------------------------------------------------------ ground truth

    def add_truth(self, payload: bytes, *, model: str | None = None,
                  pipeline: str | None = None) -> list[dict[str, Any]]:
        """Match one truth object, or a JSON array of up to 256, with earlier results.

        ``model`` (API) or ``pipeline`` (MQTT topic; a pipeline or model name) says whose results they are.

        Raises:
            InputError: over the size cap, not strict JSON, a malformed truth, or an unknown pipeline.
        """
        if pipeline is not None:
            model = self._pipelines.get(pipeline) or (pipeline if pipeline in self._serving else None)
            if model is None:
                raise InputError(f"truth for unknown pipeline {pipeline[:64]!r}")
        doc = load_json(payload, "truth", error=InputError, max_bytes=MAX_TRUTH_BYTES, max_depth=6)
        items = doc if isinstance(doc, list) else [doc]
        if len(items) > _MAX_TRUTHS:
            raise InputError(f"truth holds {len(items)} items, over the {_MAX_TRUTHS} cap")
        truths = [parse_truth(item) for item in items]  # all parsed before any is counted
        return [self.truth.add_truth(t, model) for t in truths]

    # ------------------------------------------------------------------ shadow runs

    def start_shadow(self, plan: ShadowPlan) -> dict[str, Any]:
        """Start shadowing ``plan.version`` of ``plan.model`` (a run already going for it is stopped first).

        Raises:
            InputError: the model is not served, or the version is the active one.
            EdgeRuntimeError: the candidate does not load (CacheError, IntegrityError, ModelError, ...).
        """
        if self._loader is None:
            raise InputError("shadow runs need the daemon's model store")
        serving = self._serving.get(plan.model)
        if serving is not None and serving.version == plan.version:
            raise InputError(f"{plan.model} v{plan.version} is the active version: shadow another one")
        candidate = self._loader(plan.model, plan.version)
        self.stop_shadow(plan.model, f"replaced by a shadow of v{plan.version}")
        run = ShadowRun(plan, candidate, self.events.emit, self._promote)
        with self._lock:
            self._shadows[plan.model] = run
        run.start()
        return run.figures()

    def stop_shadow(self, model: str, reason: str = "stopped", *, wait: float = 5.0) -> dict[str, Any] | None:
        """End the shadow run of ``model``, waiting up to ``wait`` s for its worker; its figures, or None.

        The worker closes the candidate itself when it ends, so not waiting loses nothing.
        """
        with self._lock:
            run = self._shadows.pop(model, None)
        if run is None:
            return None
        run.stop(reason, timeout=wait)
        return run.figures()

    def close(self) -> None:
        """Stop every shadow run (daemon shutdown)."""
        for model in list(self._shadows):
            self.stop_shadow(model, "daemon stopping")

    # ------------------------------------------------------------------ reports

    def snapshot(self) -> dict[str, Any]:
        """For telemetry and the fleet ``status``: drift, accuracy, shadow runs, failures."""
        with self._lock:
            serving = dict(self._serving)
            shadows = dict(self._shadows)
        return {
            "drift": {n: s.drift.snapshot() for n, s in sorted(serving.items()) if s.drift is not None},
            "truth": self.truth.snapshot(),
            "shadow": {n: r.figures() for n, r in sorted(shadows.items())},
            "errors": self.errors,
        }

    def prometheus_lines(self, esc: Callable[[str], str]) -> list[str]:
        """The monitoring families of ``/metrics``."""
        snap = self.snapshot()
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, rows: list[tuple[str, float | int]]) -> None:
            lines.extend((f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"))
            lines.extend(f"{name}{{{labels}}} {value}" for labels, value in rows)

        drift = [(m, f, v) for m, d in snap["drift"].items() for f, v in d["features"].items()]
        for metric, key, text in (("edge_drift_score", "score", "Chi-square statistic over its critical value "
                                   "(1 or more: drift) per feature."),
                                  ("edge_drift_psi", "psi", "Population stability index of the live window."),
                                  ("edge_drift_psi_threshold", "psi_threshold",
                                   "The PSI that matches the drift test's false-alarm rate at this window size.")):
            family(metric, "gauge", text, [(f'model="{esc(m)}",feature="{esc(f)}"', v[key]) for m, f, v in drift])
        family("edge_drift_active", "gauge", "1 while the feature is in drift.",
               [(f'model="{esc(m)}",feature="{esc(f)}"', int(v["active"])) for m, f, v in drift])
        family("edge_drift_samples_total", "counter", "Predictions booked in the drift windows.",
               [(f'model="{esc(m)}"', d["samples"]) for m, d in snap["drift"].items()])
        truth = snap["truth"]
        family("edge_accuracy", "gauge", "Rolling field accuracy (or detection precision/recall) from ground truth.",
               [(f'model="{esc(m)}",version="{v}",metric="{k}"', value)
                for m, versions in truth["accuracy"].items() for v, figures in versions.items()
                for k, value in figures.items() if k in ("accuracy", "precision", "recall")])
        family("edge_accuracy_threshold", "gauge", "The bundle's baseline minus the margin (below: accuracy event).",
               [(f'model="{esc(m)}",version="{v}",metric="{k}"', line)
                for m, versions in truth["accuracy"].items() for v, figures in versions.items()
                for k, line in figures["thresholds"].items()])
        family("edge_truth_matched_total", "counter", "Ground truths matched to a result.", [("", truth["matched"])])
        family("edge_truth_misses_total", "counter", "Ground truths or results that found no match, by reason.",
               [(f'reason="{r}"', n) for r, n in sorted(truth["misses"].items())])
        family("edge_truth_pending", "gauge", "Results waiting for their ground truth.", [("", truth["pending"])])
        shadows = [(f'model="{esc(m)}",candidate="{r["candidate"]}"', r) for m, r in snap["shadow"].items()]
        family("edge_shadow_agreement", "gauge", "Share of shadowed inputs where the candidate agrees with the active.",
               [(lab, r["agreement"]) for lab, r in shadows if r["agreement"] is not None])
        family("edge_shadow_distance", "gauge", "Mean relative distance of the candidate's outputs.",
               [(lab, r["distance"]) for lab, r in shadows if r["distance"] is not None])
        family("edge_shadow_samples_total", "counter", "Inputs the candidate ran on.",
               [(lab, r["samples"]) for lab, r in shadows])
        family("edge_shadow_dropped_total", "counter", "Inputs offered to the shadow but dropped (queue full).",
               [(lab, r["dropped"]) for lab, r in shadows])
        family("edge_shadow_latency_p95_seconds", "gauge", "p95 latency of the active model and the candidate.",
               [(f'{lab},side="{side}"', r[f"{side}_p95_ms"] / 1000.0) for lab, r in shadows
                for side in ("active", "shadow") if r[f"{side}_p95_ms"] is not None])
        family("edge_monitoring_errors_total", "counter", "Predictions monitoring failed to book (a bug).",
               [("", snap["errors"])])
        return [line.replace("{}", "") for line in lines]


"""The one place that wires the daemon: ordered start, reverse-order stop.

Start: state dir + cache recovery -> events, metrics, inference service ->
models (crash-loop guard, load, warm-up) -> local API -> pipelines -> OTA
poller -> supervisor (probation ticks, progress-based liveness, sd_notify
READY/WATCHDOG/STATUS: WATCHDOG=1 only while every part makes progress, see
:mod:`.liveness`).
Stop (SIGTERM/SIGINT): the same in reverse; pipelines drain the item in flight,
the API finishes its requests, then the models are released. SIGHUP re-reads
which versions the cache marks active (after ``edge-runtime models ...``).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from edge_runtime._util.fsutil import make_private_dir
from edge_runtime.api.server import ApiServer
from edge_runtime.cache.instance_lock import InstanceLock
from edge_runtime.commands.runtime_settings import RuntimeSettings
from edge_runtime.config.model import Config, PipelineConfig
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.liveness import Component, Liveness
from edge_runtime.monitoring.monitor import Monitor
from edge_runtime.pipelines.pipeline import Pipeline, SourceFactory
from edge_runtime.pipelines.sources.base import MqttInputs, Source
from edge_runtime.pipelines.sources.factory import build_source
from edge_runtime.runtime.service import InferenceService
from edge_runtime.telemetry.events import EventBus
from edge_runtime.telemetry.metrics import Metrics
from edge_runtime.telemetry.sdnotify import Notifier
from edge_runtime.update.activation import Activator
from edge_runtime.update.ota import OtaUpdater
from edge_runtime.update.state_recovery import LOST, recover_state
from edge_runtime.update.store import ModelStore

if TYPE_CHECKING:
    from edge_runtime.commands.bridge import MqttBridge
    from edge_runtime.commands.dispatch import Dispatcher
    from edge_runtime.commands.ledger import CommandLedger

__all__ = ["Component", "Daemon", "print_result"]

_log = logging.getLogger(__name__)
ResultSink = Callable[[dict[str, Any]], None]


def print_result(result: dict[str, Any]) -> None:
    """Default result sink: one JSON line per result on stdout, written whole."""
    sys.stdout.write(json.dumps(result, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


class Daemon:
    """The running daemon: every part, started in order and stopped in reverse."""

    def __init__(self, config: Config, *, notifier: Notifier | None = None,
                 on_result: ResultSink | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.on_result = on_result or print_result
        self.stop_event = threading.Event()
        self._reload = threading.Event()
        self.metrics = Metrics()
        self.events = EventBus(config.state_dir / "events.jsonl")
        self.store = ModelStore(config)
        self.service = InferenceService(self.metrics)
        self.activator = Activator(self.store, self.service, self.events, config.activation)
        self.monitor = self._build_monitor()
        # Settings a fleet `config` command may change while running.
        self.settings = RuntimeSettings.from_config(config)
        # Built even without a channel URL: the fleet `update {url}` command uses it too.
        self.ota = OtaUpdater(config.ota, self.store, self.activator, self.events,
                              poll_seconds=lambda: self.settings.get("ota.poll_seconds"))
        # Created before start so that every event from the first one on reaches the spool.
        self.mqtt: MqttBridge | None = None
        self._ledger: CommandLedger | None = None
        if config.mqtt.enabled:
            # paho and the command code load only when used
            from edge_runtime.commands.bridge import MqttBridge, resolve_device_id

            device = resolve_device_id(config)
            truth = None if self.monitor is None else partial(_truth_by_pipeline, self.monitor)
            self.mqtt = MqttBridge(config, device=device, commands=self._build_commands(device), events=self.events,
                                   settings=self.settings, versions=self.versions, metrics=self.metrics.snapshot,
                                   truth=truth)
        self.api: ApiServer | None = None
        self.pipelines: list[Pipeline] = []
        self.components: list[Component] = []
        self.liveness = Liveness(config.liveness, self.events, self.metrics)
        self._supervisor: threading.Thread | None = None
        self._started = False
        self._instance = InstanceLock(config.state_dir)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start everything in order. Raises EdgeRuntimeError/OSError if a part cannot start."""
        make_private_dir(self.config.state_dir)
        self._instance.acquire()  # before anything touches the cache: a second daemon refuses here
        recovery = recover_state(self.store.cache, self.store.trusted_keys, self.store.threshold())
        if recovery is not None:
            _log.warning("%s", recovery.one_line())
            self.events.emit("state_recovered", reason=recovery.one_line(), floors=dict(recovery.floors),
                             channel_sequence=recovery.channel_sequence, lost=list(LOST))
        for note in self.store.cache.recover():
            self.events.emit("recovered", reason=note)
        names = set(self.store.cache.names()) | {p.model for p in self.config.pipelines}
        serving, waiting = [], []
        for name in sorted(names):
            self.service.add_slot(name)
            version = self.activator.boot(name)
            self.notifier.status(f"{name}: {'v' + str(version) if version else 'no version loaded'}")
            if version:
                serving.append(f"{name} v{version}")
            else:
                waiting.append(name)
                _log.warning("model %r has no usable installed version: its requests and pipeline wait "
                             "until one is installed (models install, OTA or a fleet update)", name)
        for pipe_cfg in self.config.pipelines:  # exported from 0 before /metrics can be read, not once they start
            self.metrics.known_pipeline(pipe_cfg.name)
        if self.config.api.enabled:
            self.api = ApiServer(self.config.api, self.service, self.metrics, monitor=self.monitor)
            self.api.start()
            _log.info("inference API listening on %s", self.api.url)
        inputs = None
        if self.mqtt is not None:
            inputs = MqttInputs(self.mqtt.link.subscribe, self.mqtt.base, self.config.mqtt.max_input_bytes,
                                answer=self._mqtt_answer(self.mqtt))
        for pipe_cfg in self.config.pipelines:
            new_source = self._source_factory(pipe_cfg, inputs)
            # An mqtt source subscribes when built: a second one would double every input. It only waits
            # on its own queue, so it has no call to get stuck in; a stall there is a give-up.
            restart = new_source if pipe_cfg.source.type not in ("mqtt", "none") else None
            source = new_source()
            pipeline = Pipeline(pipe_cfg, source, self.service, self.metrics, self.events,
                                self._sink(pipe_cfg, source), new_source=restart)
            pipeline.start()
            self.pipelines.append(pipeline)
        self._start_configured_shadow()
        parts: list[Component] = [self.ota] if self.mqtt is None else [self.ota, self.mqtt]
        for component in parts:
            component.start()
            self.components.append(component)
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._supervisor.start()
        self._started = True
        reason = f"serving {', '.join(serving) or 'no models'}"
        self.events.emit("started", reason=reason + (f"; waiting for {', '.join(waiting)}" if waiting else ""))

    def stop(self, timeout: float = 20.0) -> None:
        """Stop in reverse order within about ``timeout`` seconds; safe to call twice."""
        if not self._started:
            return
        self._started = False
        self.notifier.stopping()
        self.stop_event.set()
        for pipeline in self.pipelines:  # each source has its own stop event (a stalled one is replaced alone)
            pipeline.source.stop_event.set()
        # Emitted before the MQTT bridge stops, so the fleet gets it too (now, or from the spool at next start).
        self.events.emit("stopped", reason="clean shutdown")
        deadline = time.monotonic() + timeout
        if self._supervisor is not None:
            self._supervisor.join(timeout=2.0)
        for component in reversed(self.components):
            _guarded(f"stopping {type(component).__name__}", component.stop)
        for pipeline in reversed(self.pipelines):
            pipeline.stop(max(0.5, deadline - time.monotonic()))
        if self.api is not None:
            _guarded("stopping the API", self.api.stop)
        if self.monitor is not None:
            _guarded("stopping shadow runs", self.monitor.close)
        for slot in self.service.slots.values():
            slot.close()
        if self._ledger is not None:
            _guarded("closing the command ledger", self._ledger.close)
        self._instance.release()

    # ------------------------------------------------------------------ monitoring

    def _build_monitor(self) -> Monitor | None:
        """Drift, truth and shadow runs, hooked into every prediction (None with monitoring off)."""
        settings = self.config.monitoring
        if not settings.enabled:
            return None

        def rollback(name: str, version: int, reason: str) -> None:
            def run() -> None:
                if self.store.cache.active_version(name) == version:  # not when it was replaced meanwhile
                    target = self.activator.rollback(name, reason=reason, kind=None)
                    self.events.emit("rolled_back", model=name, version=target, failed_version=version,
                                     previous=version, reason=f"field accuracy: {reason}")

            # Off the caller's thread: truth arrives on the MQTT network thread or an API request.
            threading.Thread(target=_guarded, args=(f"rolling back {name} v{version} on accuracy", run),
                             name="accuracy-rollback", daemon=True).start()

        monitor = Monitor(settings, self.events, loader=lambda n, v: self.store.load(n, v),
                          promote=lambda n, v: self.activator.activate(n, v, reason="shadow run passed"),
                          rollback=rollback, pipelines={p.label: p.model for p in self.config.pipelines})
        self.service.monitor(monitor.observe)
        self.metrics.add_section("monitoring", monitor.snapshot, monitor.prometheus_lines)
        return monitor

    def _start_configured_shadow(self) -> None:
        shadow = self.config.monitoring.shadow
        if self.monitor is None or not shadow.model:
            return
        try:
            self.monitor.start_shadow(shadow)  # the config section is the plan
        except EdgeRuntimeError as e:
            _log.error("cannot start the configured shadow of %s v%s: %s", shadow.model, shadow.version,
                       e.one_line())

    # ------------------------------------------------------------------ fleet commands

    def _build_commands(self, device: str) -> Dispatcher:
        """The fleet command dispatcher over this daemon's parts (its ledger closes at :meth:`stop`)."""
        from edge_runtime.bundle.signing import load_trusted_keys
        from edge_runtime.commands.auth import SIGNED_VERBS, CommandAuth
        from edge_runtime.commands.dispatch import Dispatcher
        from edge_runtime.commands.handlers import DeviceCommands
        from edge_runtime.commands.ledger import CommandLedger

        mqtt = self.config.mqtt
        ledger = self._ledger = CommandLedger(self.config.state_dir / "commands.db", mqtt.command_id_window_seconds)
        auth = None
        if mqtt.signed_commands and mqtt.operator_keys_dir is not None:
            auth = CommandAuth(load_trusted_keys(mqtt.operator_keys_dir),
                               max_age_seconds=mqtt.command_max_age_seconds, nonce_store=ledger,
                               max_bytes=mqtt.max_command_bytes, max_depth=mqtt.max_json_depth)
        handlers = DeviceCommands(self.activator, self.ota, self.store, self.settings, self.status,
                                  monitor=self.monitor).handlers()
        return Dispatcher(handlers, ledger=ledger, auth=auth, signed_verbs=SIGNED_VERBS if auth else (),
                          max_bytes=mqtt.max_command_bytes, max_depth=mqtt.max_json_depth,
                          device=device, groups=mqtt.groups, max_age_seconds=mqtt.unsigned_command_max_age_seconds)

    def versions(self) -> dict[str, int | None]:
        """The version each model serves now (None: none loaded), by name."""
        return {name: slot.version for name, slot in sorted(self.service.slots.items())}

    def status(self) -> dict[str, Any]:
        """The fleet `status` command's answer: the MQTT bridge's part, then what serves and how."""
        bridge = self.mqtt.status() if self.mqtt is not None else {"versions": self.versions()}
        return {
            **bridge,
            "probation": {n: self.activator.on_probation(n) for n in self.service.slots
                          if self.activator.on_probation(n)},
            "pinned": {m.name: m.pinned for m in self.store.cache.list_models() if m.pinned is not None},
            "ready": self.service.ready,
            "uptime_s": round(self.metrics.snapshot()["uptime_s"], 1),
        }

    def _source_factory(self, pipe_cfg: PipelineConfig, inputs: MqttInputs | None) -> SourceFactory:
        """Builds ``pipe_cfg``'s source, each with its own stop event (also to replace a stalled one)."""
        def build() -> Source:
            return build_source(pipe_cfg.source, state_dir=self.config.state_dir, pipeline_name=pipe_cfg.label,
                                limits=self.config.limits, metrics=self.metrics, events=self.events,
                                stop_event=threading.Event(), mqtt=inputs)

        return build

    def _sink(self, pipe_cfg: PipelineConfig, source: object) -> ResultSink | None:
        """Where a pipeline's results go: stdout (``results = "log"``) and, with MQTT, the results topic;
        an MQTT input's result goes back to its sender (the source's ``answer``)."""
        printer = self.on_result if pipe_cfg.results != "none" else None
        bridge = self.mqtt
        if bridge is None:
            return printer
        answer: ResultSink = getattr(source, "answer", None) or bridge.publish_result

        def sink(result: dict[str, Any]) -> None:
            if printer is not None:
                printer(result)
            answer(result)

        return sink

    def _mqtt_answer(self, bridge: MqttBridge) -> Callable[[str | None, dict[str, Any], bytes], None]:
        """How MQTT sources answer an input: at its response topic, else the results topic of its model."""
        models = {p.label: p.model for p in self.config.pipelines}

        def answer(response_topic: str | None, doc: dict[str, Any], correlation: bytes) -> None:
            doc = {"model": models.get(str(doc.get("pipeline")), ""), **doc}
            bridge.publish_result(doc, correlation=correlation, response_topic=response_topic)

        return answer

    def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, stop cleanly; returns the exit code (0)."""
        signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        # Hand the GIL over every 1 ms (default 5 ms): a model loading in the
        # background then delays a request by at most ~1 ms per turn.
        sys.setswitchinterval(0.001)
        try:
            self.start()
            while not self.stop_event.wait(0.5):
                pass
        finally:
            self.stop()
        return 0

    # ------------------------------------------------------------------ supervision

    def alive(self) -> bool:
        """The supervisor's last verdict: every pipeline, the API and each component make progress.

        False while a part is stalled past ``liveness.stall_seconds`` and cannot
        be restarted, or a thread died (:attr:`Liveness.problem` says which).
        """
        return not self.liveness.problem

    def _supervise(self) -> None:
        period = 0.5 if self.notifier.watchdog_seconds is None else min(0.5, self.notifier.watchdog_seconds / 3)
        ready_sent = False
        withheld = ""
        while not self.stop_event.wait(period):
            _guarded("probation check", self.activator.tick)
            if self._reload.is_set():
                self._reload.clear()
                _guarded("reload", self.activator.sync)
            if not ready_sent and self.service.ready:
                served = ", ".join(f"{n} v{s.version}" for n, s in sorted(self.service.slots.items()) if s.version)
                ready_sent = self.notifier.ready(f"serving {served}") or True
            problem = ""
            try:
                problem = self.liveness.check(self.pipelines, self.api, self.components)
            except Exception:  # a bug in the judge must not kill the supervisor (and with it every ping)
                _log.exception("liveness check failed")
            if problem and problem != withheld and not self.stop_event.is_set():
                _log.error("cannot recover by itself; withholding the watchdog ping so systemd restarts it: %s",
                           problem)
                self.notifier.status(f"unhealthy: {problem}"[:500])
            elif not problem and withheld:
                _log.warning("every part makes progress again; feeding the watchdog")
                self.notifier.status("serving again")
            withheld = problem
            if not problem:
                self.notifier.watchdog()


def _truth_by_pipeline(monitor: Monitor, pipeline: str, payload: bytes) -> object:
    return monitor.add_truth(payload, pipeline=pipeline)


def _guarded(what: str, fn: Callable[[], object]) -> None:
    """Run ``fn``; log (never raise) a failure, so one part cannot block shutdown or supervision."""
    try:
        fn()
    except Exception:
        _log.exception("%s failed", what)

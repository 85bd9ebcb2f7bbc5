"""Everything the daemon says and hears over MQTT (topics per DESIGN.md).

    <prefix>/<device>/status           retained: online/offline + versions; Last Will = offline
    <prefix>/<device>/telemetry        every telemetry_seconds, through the spool (seq)
    <prefix>/<device>/events           QoS 1, every lifecycle event, through the spool (seq)
    <prefix>/<device>/results/<model>  optional, rate-limited; MQTT-input results always
    <prefix>/<device>/truth/<pipeline>  ground truth for earlier results (monitoring), not retained
    <prefix>/<device>/cmd/<verb>, <prefix>/group/<g>/cmd/<verb>, <prefix>/all/cmd/<verb>
    replies: the MQTT 5 response topic + correlation data, else <prefix>/<device>/reply/<id>

Telemetry and events are appended to the on-disk spool first and forwarded in
order, paced, once the link is up; nothing is lost within the spool's bound.
Commands run on two worker threads, never on the MQTT network thread: one for the
verbs that change models (``MODEL_VERBS``: an update may download for minutes),
one for the rest, so ``ping``/``status``/``config`` are answered meanwhile.
Before that, :class:`~edge_runtime.commands.intake.CommandIntake` refuses retained
messages and drops what exceeds the intake rate (counted in ``status``); replies
wait for the link in a :class:`~edge_runtime.mqtt.reply_outbox.ReplyOutbox` when it is down.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from edge_runtime import __version__
from edge_runtime._util.progress import Clock, Heartbeat, beating_wait
from edge_runtime.commands.handlers import MODEL_VERBS
from edge_runtime.commands.intake import CommandIntake, TokenBucket
from edge_runtime.commands.parse import Reply
from edge_runtime.commands.runtime_settings import RuntimeSettings
from edge_runtime.config.model import Config
from edge_runtime.errors import EdgeRuntimeError, LinkError
from edge_runtime.mqtt.forwarder import Forwarder
from edge_runtime.mqtt.link import Delivery, Message, MqttLink
from edge_runtime.mqtt.reply_outbox import ReplyOutbox
from edge_runtime.mqtt.spool import Spool
from edge_runtime.telemetry.events import EventBus
from edge_runtime.telemetry.report import SystemStats, build_telemetry

__all__ = ["CommandHandler", "Link", "MqttBridge", "resolve_device_id"]

_log = logging.getLogger(__name__)
_MACHINE_ID = Path("/etc/machine-id")
TRUTH_RATE, TRUTH_BURST = 200.0, 400
"""Ground-truth messages taken in per second (bursts of TRUTH_BURST); past it dropped and counted."""
TELEMETRY_STUCK_SECONDS = 120.0
"""How long one telemetry tick (status check, spool append, an fsync on a failing SD card) may take
before the bridge counts as stuck: beyond the period, which a fleet ``config`` may change."""


def resolve_device_id(config: Config, machine_id: Path = _MACHINE_ID) -> str:
    """``device_id`` from config, else /etc/machine-id, else the host name (topic-safe)."""
    if config.device_id:
        return config.device_id
    try:
        mid = machine_id.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        mid = ""
    if mid and mid.isalnum():
        return mid
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
    return host.strip("-._")[:64] or "edge-device"


class CommandHandler(Protocol):
    """Turns one received command into its reply; never raises (:class:`.dispatch.Dispatcher` is one)."""

    def handle(self, verb: str, payload: bytes) -> Reply:
        """The reply to the ``payload`` received on ``.../cmd/<verb>``."""
        ...


class Link(Protocol):
    """The part of :class:`~edge_runtime.mqtt.link.MqttLink` the bridge uses (a test passes a fake)."""

    @property
    def connected(self) -> bool:
        """Publishing now goes out."""
        ...

    @property
    def alive(self) -> bool:
        """Its threads run (it reconnects by itself while they do)."""
        ...

    def start(self) -> None:
        """Connect in the background, and keep reconnecting."""
        ...

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Publish ``final`` (topic, payload) retained if connected, then disconnect for good."""
        ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False,
                response_topic: str | None = None, correlation_data: bytes | None = None,
                user_properties: tuple[tuple[str, str], ...] | list[tuple[str, str]] = ()) -> Delivery:
        """Send one message. Raises LinkError when not connected."""
        ...

    def subscribe(self, topic_filter: str, handler: Callable[[Message], None], qos: int = 1) -> None:
        """Call ``handler`` for each message matching ``topic_filter``, now and after every reconnect."""
        ...

    def on_connect(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` after every (re)connect."""
        ...


TruthSink = Callable[[str, bytes], object]
"""Takes ground truth: (pipeline or model name from the topic, payload); raises InputError when malformed."""
LinkFactory = Callable[[str, tuple[str, bytes]], Link]
"""Builds the link from (client id, Last Will (topic, payload))."""


class MqttBridge:
    """Owns the link, spool, forwarder, telemetry timer and command workers of a daemon.

    It knows only what it is given: ``commands`` answers each command (the
    composition root builds the dispatcher), ``events`` is the bus whose events
    it forwards (and where it reports spool losses), ``settings`` the runtime
    settings it reads (telemetry period, results), ``versions()`` what serves
    now (status and telemetry), ``metrics()`` the metrics snapshot for telemetry.
    ``link`` builds the link (default: a real :class:`~edge_runtime.mqtt.link.MqttLink`).
    """

    def __init__(self, config: Config, *, device: str, commands: CommandHandler, events: EventBus,
                 settings: RuntimeSettings, versions: Callable[[], dict[str, int | None]],
                 metrics: Callable[[], Mapping[str, Any]], link: LinkFactory | None = None,
                 clock: Clock | None = None, truth: TruthSink | None = None) -> None:
        """``truth(pipeline, payload)`` takes what arrives on ``truth/<pipeline>`` (monitoring)."""
        self.mqtt = config.mqtt
        self.device = device
        self.base = f"{self.mqtt.prefix}/{self.device}"
        self.settings = settings
        self.events = events
        self._versions = versions
        self._metrics = metrics
        self._truth = truth
        # Truth is parsed on the network thread: a flood must not hold up commands behind it.
        self._truth_bucket = TokenBucket(TRUTH_RATE, TRUTH_BURST)
        self.truth_counts = {"accepted": 0, "refused_retained": 0, "dropped_rate": 0, "malformed": 0}
        self.spool = Spool(config.state_dir / "mqtt-spool.db", max_messages=self.mqtt.spool_max_messages,
                           max_bytes=self.mqtt.spool_max_bytes)
        make_link: LinkFactory = link or (lambda client_id, will: MqttLink(self.mqtt, client_id, will=will))
        self.link = make_link(self.mqtt.client_id or f"edge-{self.device}",
                              (f"{self.base}/status", self._status_payload("offline", "connection lost")))
        self.forwarder = Forwarder(self.spool, self.link, flush_rate=self.mqtt.flush_rate,
                                   max_inflight=self.mqtt.max_inflight, connected=lambda: self.link.connected)
        self.stats = SystemStats(config.state_dir)
        self.commands = commands
        self.intake = CommandIntake(self.mqtt.command_rate, self.mqtt.command_burst)
        self.outbox = ReplyOutbox(self.link)
        # Two workers, each in arrival order: model operations (an update can take minutes) never
        # hold up ping/status/config.
        self._lanes: dict[str, queue.Queue[tuple[str, Message] | None]] = {
            "commands": queue.Queue(maxsize=64), "model-commands": queue.Queue(maxsize=64)}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._result_times: dict[str, float] = {}
        self._status_lock = threading.Lock()
        self._status_versions: dict[str, int | None] | None = None  # what the retained status says
        self._connects = 0
        self.telemetry_progress = Heartbeat(clock) if clock is not None else Heartbeat()
        events.subscribe(self._on_event)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Subscribe to command topics, connect, start forwarding and telemetry."""
        for filt in self._command_filters():
            self.link.subscribe(filt, self._on_command_message, qos=1)
        if self._truth is not None:
            self.link.subscribe(f"{self.base}/truth/+", self._on_truth_message, qos=1)
        self.link.on_connect(self._on_connect)
        self.link.start()
        self.forwarder.start()
        self.telemetry_progress.beat()  # the models loaded since __init__: the bound starts now
        workers: list[tuple[Callable[[], None], str]] = [(self._telemetry_loop, "telemetry")]
        workers += [(partial(self._command_loop, lane), name) for name, lane in self._lanes.items()]
        for target, name in workers:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Publish ``offline`` ourselves (no Last Will), stop the threads, close the spool."""
        self.events.unsubscribe(self._on_event)  # events after this stay in events.jsonl only
        self._stop.set()
        for lane in self._lanes.values():
            lane.put(None)
        for thread in self._threads:
            thread.join(timeout=5)
        self.forwarder.stop()
        self.link.stop(final=(f"{self.base}/status", self._status_payload("offline", "clean shutdown")))
        self.spool.close()

    @property
    def alive(self) -> bool:
        """The link machinery and our threads run, and the telemetry thread beats (systemd watchdog).

        The telemetry thread counts as stuck once it has not beaten for its period plus
        :data:`TELEMETRY_STUCK_SECONDS`. False before start and after stop (the threads do not run).
        """
        bound = self.settings.get("mqtt.telemetry_seconds") + TELEMETRY_STUCK_SECONDS
        return (self.link.alive and all(t.is_alive() for t in self._threads)
                and self.telemetry_progress.age() <= bound)

    # ------------------------------------------------------------------ outgoing

    def _status_payload(self, state: str, reason: str = "") -> bytes:
        doc: dict[str, Any] = {"state": state, "device": self.device, "ts": round(time.time(), 3),
                               "runtime": __version__, "groups": list(self.mqtt.groups)}
        if reason:
            doc["reason"] = reason
        if state == "online":
            doc["versions"] = self._versions()
        return json.dumps(doc, sort_keys=True).encode()

    def _publish_status(self, reason: str) -> None:
        """Retained ``online`` status with the versions now serving and why it is published."""
        with self._status_lock:
            versions = self._versions()
            try:
                self.link.publish(f"{self.base}/status", self._status_payload("online", reason), qos=1, retain=True)
            except LinkError as e:
                _log.warning("could not publish status: %s", e.one_line())
                return
            self._status_versions = versions

    def _republish_if_changed(self) -> None:
        """Fleet tools discover versions from the retained status: keep it equal to what serves.

        Called after every event and every telemetry tick, so each path that
        changes a version (OTA, rollback, pin, reload, SIGHUP, fallback) is covered.
        """
        if self.link.connected and self._versions() != self._status_versions:
            self._publish_status("version change")

    def _on_connect(self) -> None:
        self._connects += 1
        self._publish_status("started" if self._connects == 1 else "reconnected")
        self.outbox.flush()
        self.forwarder.wake()

    def _on_event(self, event: dict[str, Any]) -> None:
        topic = f"{self.base}/events"
        try:
            self.spool.append(topic, lambda seq: json.dumps({**event, "seq": seq, "device": self.device},
                                                            sort_keys=True, default=str).encode())
        except EdgeRuntimeError:
            pass  # not stored: the spool counted its seq as dropped and logged why
        else:
            self._report_lost()
        self.forwarder.wake()
        self._republish_if_changed()

    def _report_lost(self) -> None:
        """Once the spool stores again, say which seqs it could not store (telemetry lists them too)."""
        lost = self.spool.take_lost()
        if lost:
            why = "; ".join(sorted({w for _, _, w in lost}))
            self.events.emit("messages_dropped", count=sum(b - a + 1 for a, b, _ in lost),
                                    ranges=[[a, b] for a, b, _ in lost],
                                    reason=f"the spool could not store them: {why}")

    def _telemetry_loop(self) -> None:
        while not beating_wait(self._stop, self.settings.get("mqtt.telemetry_seconds"), self.telemetry_progress):
            try:
                self._republish_if_changed()
                self.publish_telemetry()
            except EdgeRuntimeError:
                pass  # not stored: the spool counted its seq as dropped and logged why
            except Exception:  # a telemetry bug must not stop the loop (and the watchdog)
                _log.exception("telemetry failed")

    def publish_telemetry(self) -> int:
        """Spool one telemetry message now; returns its seq.

        Raises EdgeRuntimeError: the spool could not store it (its seq is counted as dropped).
        """
        snapshot = dict(self._metrics())
        stats = self.stats.sample()
        spool_info = self.spool.stats()
        seq = self.spool.append(f"{self.base}/telemetry", lambda s: build_telemetry(
            s, device=self.device, metrics_snapshot=snapshot, models=self._versions(), stats=stats,
            spool=spool_info))
        self._report_lost()
        self.forwarder.wake()
        return seq

    def publish_result(self, result: dict[str, Any], correlation: bytes | None = None,
                       response_topic: str | None = None) -> None:
        """Results sink: MQTT-input answers always (at ``response_topic`` when given), others only
        when enabled and within the rate."""
        model = str(result.get("model", ""))
        if correlation is None:
            if not self.settings.get("mqtt.results"):
                return
            now = time.monotonic()
            if now - self._result_times.get(model, 0.0) < 1.0 / self.settings.get("mqtt.results_max_per_second"):
                return
            self._result_times[model] = now
        payload = json.dumps(result, sort_keys=True, default=str).encode()
        # Best effort: telemetry and events are the spooled record, results are not.
        with contextlib.suppress(LinkError):
            self.link.publish(response_topic or f"{self.base}/results/{model}", payload, qos=1 if correlation else 0,
                              correlation_data=correlation)

    # ------------------------------------------------------------------ commands

    def _command_filters(self) -> list[str]:
        prefix = self.mqtt.prefix
        return [f"{self.base}/cmd/+", f"{prefix}/all/cmd/+", *(f"{prefix}/group/{g}/cmd/+" for g in self.mqtt.groups)]

    def _on_command_message(self, message: Message) -> None:
        if not self.intake.admit(message.topic, message.retain):
            return
        verb = message.topic.rsplit("/", 1)[-1]
        lane = self._lanes["model-commands" if verb in MODEL_VERBS else "commands"]
        try:
            lane.put_nowait((verb, message))
        except queue.Full:
            self._reply(message, Reply(ok=False, message="device busy: too many commands queued", id=None))

    def _on_truth_message(self, message: Message) -> None:
        counts = self.truth_counts
        if message.retain:  # a retained truth would be matched again after every reconnect
            counts["refused_retained"] += 1
            _log.warning("ignored a retained message on %s: publish ground truth without retain", message.topic)
            return
        if not self._truth_bucket.take():
            counts["dropped_rate"] += 1
            _log.warning("dropped truth on %s: over %g messages/s", message.topic, TRUTH_RATE)
            return
        if len(message.payload) > self.mqtt.max_command_bytes:
            counts["malformed"] += 1
            _log.warning("ignored truth on %s: %d bytes, over the %d-byte cap", message.topic,
                         len(message.payload), self.mqtt.max_command_bytes)
            return
        assert self._truth is not None
        try:
            self._truth(message.topic.rsplit("/", 1)[-1], message.payload)
        except EdgeRuntimeError as e:
            counts["malformed"] += 1
            _log.warning("ignored truth on %s: %s", message.topic, e.one_line())
            return
        counts["accepted"] += 1

    def _command_loop(self, lane: queue.Queue[tuple[str, Message] | None]) -> None:
        while True:
            item = lane.get()
            if item is None:
                return
            verb, message = item
            reply = self.commands.handle(verb, message.payload)
            self._reply(message, reply)

    def _reply(self, message: Message, reply: Reply) -> None:
        payload = reply.to_json()
        if message.response_topic:
            topic, correlation = message.response_topic, message.correlation_data
        else:
            topic, correlation = f"{self.base}/reply/{reply.id or 'invalid'}", None
        # The device property tells a fleet tool which device answered a group command.
        self.outbox.send(topic, payload, correlation=correlation, user_properties=(("device", self.device),))

    def status(self) -> dict[str, Any]:
        """The bridge's part of the `status` command's answer (the daemon adds what serves and how)."""
        return {
            "device": self.device,
            "runtime": __version__,
            "versions": self._versions(),
            "link": {"connected": self.link.connected},
            "spool": {"pending": self.spool.pending, "dropped": self.spool.dropped},
            "commands": {**self.intake.counts(), "replies_waiting": self.outbox.waiting,
                         "replies_lost": self.outbox.lost},
            "truth": dict(self.truth_counts),
        }

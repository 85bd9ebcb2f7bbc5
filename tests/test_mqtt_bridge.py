"""MqttBridge on its own: given only its narrow collaborators and a fake link, everything it says is observable.

The link is the one fake (what it publishes is the observable behaviour); the
spool, forwarder, reply outbox, event bus, settings, metrics and the command
dispatcher are the real ones. The end-to-end path with mosquitto and
`edge-runtime serve` is tests/test_mqtt_daemon.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.commands.bridge import TELEMETRY_STUCK_SECONDS, MqttBridge
from edge_runtime.commands.dispatch import Dispatcher
from edge_runtime.commands.ledger import CommandLedger
from edge_runtime.commands.parse import Command, Reply
from edge_runtime.commands.runtime_settings import RuntimeSettings
from edge_runtime.config.model import Config, MqttConfig
from edge_runtime.errors import LinkError
from edge_runtime.mqtt.link import Delivery, Message
from edge_runtime.telemetry.events import EventBus
from edge_runtime.telemetry.metrics import Metrics

DEVICE = "dev7"
BASE = f"edge/{DEVICE}"


@dataclass(frozen=True)
class Sent:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    correlation: bytes | None
    properties: tuple[tuple[str, str], ...]

    def doc(self) -> dict[str, Any]:
        return json.loads(self.payload)  # type: ignore[no-any-return]


class FakeLink:
    """Records every publish; acknowledges at once while ``connected``; delivers messages to subscribers."""

    def __init__(self, client_id: str, will: tuple[str, bytes]) -> None:
        self.client_id = client_id
        self.will = will
        self.connected = True
        self.alive = False
        self.sent: list[Sent] = []
        self.final: tuple[str, bytes] | None = None
        self._subscribers: list[tuple[str, Callable[[Message], None]]] = []
        self._on_connect: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        self.alive = True
        for fn in self._on_connect:
            fn()

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        self.final = final
        self.alive = False

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False,
                response_topic: str | None = None, correlation_data: bytes | None = None,
                user_properties: tuple[tuple[str, str], ...] | list[tuple[str, str]] = ()) -> Delivery:
        if not self.connected:
            raise LinkError("not connected")
        with self._lock:
            self.sent.append(Sent(topic, payload, qos, retain, correlation_data, tuple(user_properties)))
        delivery = Delivery(topic)
        delivery.finish(None)
        return delivery

    def subscribe(self, topic_filter: str, handler: Callable[[Message], None], qos: int = 1) -> None:
        self._subscribers.append((topic_filter, handler))

    def on_connect(self, fn: Callable[[], None]) -> None:
        self._on_connect.append(fn)

    def deliver(self, message: Message) -> None:
        for topic_filter, handler in self._subscribers:
            if _matches(topic_filter, message.topic):
                handler(message)

    def on(self, topic: str) -> list[Sent]:
        with self._lock:
            return [s for s in self.sent if s.topic == topic]

    def filters(self) -> list[str]:
        return [f for f, _ in self._subscribers]


def _matches(topic_filter: str, topic: str) -> bool:
    want, got = topic_filter.split("/"), topic.split("/")
    return len(want) == len(got) and all(w in ("+", g) for w, g in zip(want, got, strict=True))


def wait_for(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


@dataclass
class Rig:
    bridge: MqttBridge
    link: FakeLink
    events: EventBus
    versions: dict[str, int | None]
    release_update: threading.Event


@pytest.fixture()
def rig(tmp_path: Path) -> Iterator[Rig]:
    config = Config(state_dir=tmp_path / "state", device_id=DEVICE,
                    mqtt=MqttConfig(enabled=True, groups=("lab",), telemetry_seconds=3600.0))
    config.state_dir.mkdir(mode=0o700)
    events = EventBus(config.state_dir / "events.jsonl")
    versions: dict[str, int | None] = {"det": 3}
    release = threading.Event()

    def ping(command: Command) -> Reply:
        return Reply(True, "pong", data={"pong": command.ts})

    def update(command: Command) -> Reply:  # a model verb that takes long, like a download
        assert release.wait(10)
        return Reply(True, "updated")

    ledger = CommandLedger(config.state_dir / "commands.db", 3600.0)
    dispatcher = Dispatcher({"ping": ping, "update": update}, ledger=ledger, auth=None, signed_verbs=(),
                            max_bytes=4096, max_depth=8, device=DEVICE)
    links: list[FakeLink] = []

    def make_link(client_id: str, will: tuple[str, bytes]) -> FakeLink:
        links.append(FakeLink(client_id, will))
        return links[-1]

    metrics = Metrics()
    bridge = MqttBridge(config, device=DEVICE, commands=dispatcher, events=events,
                        settings=RuntimeSettings.from_config(config), versions=lambda: dict(versions),
                        metrics=metrics.snapshot, link=make_link)
    bridge.start()
    try:
        yield Rig(bridge, links[0], events, versions, release)
    finally:
        release.set()
        bridge.stop()
        ledger.close()


def test_status_is_retained_online_with_the_versions_and_the_will_says_offline(rig: Rig) -> None:
    (status,) = rig.link.on(f"{BASE}/status")
    assert status.retain and status.qos == 1
    doc = status.doc()
    assert doc["state"] == "online" and doc["reason"] == "started" and doc["device"] == DEVICE
    assert doc["versions"] == {"det": 3} and doc["groups"] == ["lab"]
    will_topic, will = rig.link.will
    assert will_topic == f"{BASE}/status" and json.loads(will)["state"] == "offline"
    assert rig.link.client_id == f"edge-{DEVICE}"


def test_subscribes_to_device_group_and_all_commands(rig: Rig) -> None:
    assert sorted(rig.link.filters()) == sorted([f"{BASE}/cmd/+", "edge/all/cmd/+", "edge/group/lab/cmd/+"])


def test_events_go_out_through_the_spool_with_seq_and_a_version_change_republishes_status(rig: Rig) -> None:
    rig.versions["det"] = 4  # what serves changed; the next event brings the retained status up to date
    rig.events.emit("activated", model="det", version=4, reason="test")
    sent = wait_for(lambda: rig.link.on(f"{BASE}/events"))
    event = sent[0].doc()
    assert event["kind"] == "activated" and event["version"] == 4 and event["device"] == DEVICE
    assert isinstance(event["seq"], int) and sent[0].qos == 1
    statuses = rig.link.on(f"{BASE}/status")
    assert statuses[-1].doc()["reason"] == "version change" and statuses[-1].doc()["versions"] == {"det": 4}


def test_telemetry_carries_the_metrics_and_versions(rig: Rig) -> None:
    seq = rig.bridge.publish_telemetry()
    sent = wait_for(lambda: rig.link.on(f"{BASE}/telemetry"))
    doc = sent[0].doc()
    assert doc["seq"] == seq and doc["device"] == DEVICE
    assert [(m["name"], m["version"]) for m in doc["models"]] == [("det", 3)]
    assert "uptime_s" in json.dumps(doc)


def test_a_command_is_answered_at_its_response_topic_naming_the_device(rig: Rig) -> None:
    payload = json.dumps({"id": "c1", "ts": time.time(), "args": {}}).encode()
    rig.link.deliver(Message(f"{BASE}/cmd/ping", payload, qos=1, retain=False, response_topic="ops/replies",
                             correlation_data=b"k1"))
    (reply,) = wait_for(lambda: rig.link.on("ops/replies"))
    assert reply.doc()["ok"] is True and reply.doc()["id"] == "c1"
    assert reply.correlation == b"k1" and ("device", DEVICE) in reply.properties


def test_a_long_model_command_does_not_hold_up_ping(rig: Rig) -> None:
    """update runs on the model lane: a ping sent after it is answered while it still runs."""
    now = time.time()
    rig.link.deliver(Message("edge/all/cmd/update", json.dumps({"id": "u1", "ts": now, "args": {}}).encode(),
                             qos=1, retain=False))
    rig.link.deliver(Message(f"{BASE}/cmd/ping", json.dumps({"id": "p1", "ts": now, "args": {}}).encode(),
                             qos=1, retain=False))
    wait_for(lambda: rig.link.on(f"{BASE}/reply/p1"))
    assert rig.link.on(f"{BASE}/reply/u1") == []
    rig.release_update.set()
    assert wait_for(lambda: rig.link.on(f"{BASE}/reply/u1"))[0].doc()["message"] == "updated"


def test_a_retained_command_is_refused_and_counted(rig: Rig) -> None:
    rig.link.deliver(Message(f"{BASE}/cmd/ping", json.dumps({"id": "r1", "ts": time.time()}).encode(),
                             qos=1, retain=True))
    time.sleep(0.3)
    assert rig.link.on(f"{BASE}/reply/r1") == []
    assert rig.bridge.status()["commands"]["refused_retained"] == 1


def test_results_are_off_by_default_but_mqtt_input_answers_always_go_out(rig: Rig) -> None:
    rig.bridge.publish_result({"model": "det", "label": "cat"})
    rig.bridge.publish_result({"model": "det", "label": "dog"}, correlation=b"x", response_topic="in/answer")
    assert rig.link.on(f"{BASE}/results/det") == []
    (answer,) = rig.link.on("in/answer")
    assert answer.doc()["label"] == "dog" and answer.correlation == b"x"


def test_alive_follows_the_link_and_stop_publishes_offline(rig: Rig) -> None:
    assert rig.bridge.alive
    rig.link.alive = False  # the link's threads died
    assert not rig.bridge.alive
    rig.link.alive = True
    rig.release_update.set()
    rig.bridge.stop()
    assert not rig.bridge.alive  # its workers ended
    assert rig.link.final is not None
    topic, payload = rig.link.final
    assert topic == f"{BASE}/status" and json.loads(payload)["reason"] == "clean shutdown"


def test_a_telemetry_tick_stuck_past_its_bound_makes_the_bridge_not_alive(tmp_path: Path) -> None:
    """The metrics() collaborator hangs (as an fsync on a failing card would): the telemetry thread stops
    beating, and past its period plus TELEMETRY_STUCK_SECONDS the bridge is not alive; it recovers after."""
    now = [1000.0]
    config = Config(state_dir=tmp_path / "state", device_id=DEVICE,
                    mqtt=MqttConfig(enabled=True, telemetry_seconds=0.05))
    config.state_dir.mkdir(mode=0o700)
    hang, entered = threading.Event(), threading.Event()
    metrics = Metrics()

    def stuck_metrics() -> dict[str, Any]:
        entered.set()
        assert hang.wait(10)
        return metrics.snapshot()

    links: list[FakeLink] = []
    bridge = MqttBridge(config, device=DEVICE, commands=_NoCommands(), events=EventBus(tmp_path / "e.jsonl"),
                        settings=RuntimeSettings.from_config(config), versions=dict, metrics=stuck_metrics,
                        link=lambda cid, will: links.append(FakeLink(cid, will)) or links[-1],
                        clock=lambda: now[0])
    bridge.start()
    try:
        assert entered.wait(10)
        assert bridge.alive  # inside a tick, within its bound
        now[0] += 0.05 + TELEMETRY_STUCK_SECONDS + 1
        assert not bridge.alive
        hang.set()
        wait_for(lambda: bridge.alive)  # the tick ended; the thread beats again
    finally:
        hang.set()
        bridge.stop()


class _NoCommands:
    def handle(self, verb: str, payload: bytes) -> Reply:
        return Reply(False, "no commands here")

"""MQTT end to end: a real `edge-runtime serve` against a real mosquitto, real paho clients."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cli_helpers import cli
from daemon_helpers import Serve, pack_onnx, wait_for, write_config
from mqtt_broker import Broker, mosquitto_binary
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_runtime.bundle.signing import generate_keypair, load_private_key
from edge_runtime.commands.auth import new_command, sign_command

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")
Zoo = Callable[[str], Path]
DEVICE = "dev1"


class Watcher:
    """A paho subscriber that resubscribes on every connect and dedupes telemetry/events by seq."""

    def __init__(self, broker: Broker, *topics: str, persistent: bool = False) -> None:
        self.topics = topics
        self.messages: list[mqtt.MQTTMessage] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:6]}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        props = None
        if persistent:  # the broker keeps our subscription and queues for us while we are away
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.5)
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect("127.0.0.1", broker.port, keepalive=30, clean_start=not persistent, properties=props)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        for topic in self.topics:
            client.subscribe(topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(message)

    def on(self, suffix: str) -> list[mqtt.MQTTMessage]:
        with self.lock:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def seqs(self) -> set[int]:
        with self.lock:
            return {json.loads(m.payload)["seq"] for m in self.messages
                    if m.topic.endswith(("/telemetry", "/events"))}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker") as b:
        yield b


TOP = f'device_id = "{DEVICE}"\n'


def mqtt_config(broker: Broker, extra: str = "") -> str:
    return (f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {broker.port}\n'
            f'keepalive_seconds = 5\nreconnect_min_seconds = 0.05\nreconnect_max_seconds = 0.5\n'
            f'groups = ["lab"]\n{extra}')


@pytest.fixture()
def device(tmp_path: Path, keys: dict[str, Path], zoo: Zoo, broker: Broker) -> Iterator[Serve]:
    config, state, port = write_config(tmp_path / "device", keys["trust_dir"], extra=mqtt_config(broker), top=TOP)
    cli("models", "install", pack_onnx(tmp_path / "v1.bundle", zoo("ppocr_cls"), 1, keys["a"], tmp_path),
        "--config", config)
    cli("models", "install", pack_onnx(tmp_path / "v2.bundle", zoo("ppocr_cls"), 2, keys["a"], tmp_path),
        "--config", config)
    serve = Serve(config, state, port).start()
    serve.wait_ready()
    wait_online(broker)
    try:
        yield serve
    finally:
        if serve.proc and serve.proc.poll() is None:
            serve.kill9()


def wait_online(broker: Broker, device: str = DEVICE) -> None:
    """Wait for the device's retained online status: the daemon publishes it only once the broker has
    acknowledged its command subscriptions, so a command sent after this is never lost (API readiness
    alone comes earlier)."""
    wait_for(lambda: '"state": "online"' in _retained(broker, f"edge/{device}/status"), 30, f"{device} online")


class Operator:
    """Sends commands (MQTT 5 response topic + correlation data) and collects the replies."""

    def __init__(self, broker: Broker) -> None:
        self.replies: dict[str, dict[str, Any]] = {}
        self.reply_topic = f"edge/fleet/{uuid.uuid4().hex[:8]}/reply"
        self.client = broker.client(f"op-{uuid.uuid4().hex[:6]}", on_message=self._on_message)
        self.client.subscribe(self.reply_topic, qos=1)
        self.client.subscribe("edge/+/reply/#", qos=1)
        time.sleep(0.2)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        reply = json.loads(message.payload)
        self.replies[str(reply.get("id"))] = reply

    def send(self, verb: str, payload: bytes, *, target: str = f"edge/{DEVICE}", response: bool = True,
             reply_id: str | None = None, timeout: float = 15.0) -> dict[str, Any] | None:
        props = Properties(PacketTypes.PUBLISH)
        if response:
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = (reply_id or "x").encode()
        self.client.publish(f"{target}/cmd/{verb}", payload, qos=1, properties=props).wait_for_publish(5)
        if reply_id is None:
            return None
        return wait_for(lambda: self.replies.get(reply_id), timeout, f"reply to {reply_id}")

    def command(self, verb: str, args: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        cid = uuid.uuid4().hex[:12]
        payload = json.dumps({"id": cid, "ts": time.time(), "args": args or {}}).encode()
        reply = self.send(verb, payload, reply_id=cid, **kw)
        assert reply is not None
        return reply

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_status_online_will_on_kill9_and_clean_offline(device: Serve, broker: Broker) -> None:
    watcher = Watcher(broker, f"edge/{DEVICE}/status", f"edge/{DEVICE}/events")
    try:
        online = wait_for(lambda: [json.loads(m.payload) for m in watcher.on("/status")
                                   if json.loads(m.payload)["state"] == "online"], 20, "online status")[-1]
        assert online["versions"] == {"ppocr-cls": 2} and online["device"] == DEVICE
        device.kill9()
        will = wait_for(lambda: [json.loads(m.payload) for m in watcher.on("/status")
                                 if json.loads(m.payload)["state"] == "offline"], 20, "last will")[-1]
        assert will["reason"] == "connection lost"
        count = len(watcher.on("/status"))
        device.start()
        device.wait_ready()
        wait_for(lambda: any(json.loads(m.payload)["state"] == "online" for m in watcher.on("/status")[count:]), 20,
                 "online again")
        count = len(watcher.on("/status")) - 1
        assert device.terminate() == 0
        offline = wait_for(lambda: [json.loads(m.payload) for m in watcher.on("/status")[count + 1:]
                                    if json.loads(m.payload)["state"] == "offline"], 20, "clean offline")
        time.sleep(1.0)  # a will would follow the socket close at once
        after = [json.loads(m.payload) for m in watcher.on("/status")[count + 1:]]
        assert [d["reason"] for d in after if d["state"] == "offline"] == ["clean shutdown"], after
        assert offline[0]["reason"] == "clean shutdown"
        assert "Traceback" not in device.stderr()
        # The clean stop is an event too: published then, or from the spool after the next start.
        device.start()

        def stop_then_start() -> bool:
            kinds = [json.loads(m.payload)["kind"] for m in watcher.on("/events")]
            return "stopped" in kinds and "started" in kinds[kinds.index("stopped"):]

        wait_for(stop_then_start, 30, "a stopped event, then a started event")
        stopped = [json.loads(m.payload) for m in watcher.on("/events") if json.loads(m.payload)["kind"] == "stopped"]
        assert stopped[-1]["reason"] == "clean shutdown"
    finally:
        watcher.close()


def _spool_seq(state: Path) -> int:
    import sqlite3

    with sqlite3.connect(f"file:{state / 'mqtt-spool.db'}?mode=ro", uri=True, timeout=5) as db:
        rows = db.execute("SELECT name, seq FROM sqlite_sequence").fetchall()
    return max((int(seq) for _, seq in rows), default=0)


@pytest.mark.parametrize("kill_daemon_while_offline", [False, True])
def test_broker_outage_5000_messages_zero_gaps(tmp_path: Path, keys: dict[str, Path], zoo: Zoo,
                                              kill_daemon_while_offline: bool) -> None:
    # A broker with persistence, like a real fleet broker: a subscriber's session and queue
    # survive the restart, so what reaches the subscriber depends only on the device.
    broker = Broker(tmp_path / "broker", persistence=True, max_queued_messages=100_000).start()
    extra = mqtt_config(broker, "telemetry_seconds = 0.001\nflush_rate = 3000.0\n")
    config, state, port = write_config(tmp_path / "device", keys["trust_dir"], extra=extra, top=TOP)
    cli("models", "install", pack_onnx(tmp_path / "v1.bundle", zoo("ppocr_cls"), 1, keys["a"], tmp_path),
        "--config", config)
    serve = Serve(config, state, port).start()
    watcher = Watcher(broker, f"edge/{DEVICE}/telemetry", f"edge/{DEVICE}/events", persistent=True)
    try:
        wait_for(lambda: len(watcher.seqs()) > 50, 30, "telemetry flowing")
        time.sleep(1.5)  # the broker autosaves every second: the subscription is on disk
        broker.kill()
        start = _spool_seq(state)
        wait_for(lambda: _spool_seq(state) >= start + 5000, 120, "5,000 messages produced while offline")
        if kill_daemon_while_offline:
            serve.kill9()
            produced = _spool_seq(state)
            serve.start()
        else:
            produced = _spool_seq(state)
        broker.start()
        # Everything produced while the broker was down comes through.
        wait_for(lambda: watcher.seqs() >= set(range(start + 1, produced + 1)), 120,
                 "every seq produced during the outage, after the broker came back")
        later = _spool_seq(state)
        wait_for(lambda: watcher.seqs() >= set(range(produced + 1, later + 1)), 60, "new messages after it")
    finally:
        watcher.close()
        if serve.proc and serve.proc.poll() is None:
            serve.kill9()
        broker.stop()


def test_broker_restart_without_persistence_commands_still_answered(device: Serve, broker: Broker) -> None:
    op = Operator(broker)
    try:
        assert op.command("ping")["ok"] is True
        op.close()
        broker.kill()
        broker.start()
        op = Operator(broker)
        reply = wait_for(lambda: _try(lambda: op.command("ping", timeout=2)), 30, "answer after broker restart")
        assert reply["ok"] is True
    finally:
        op.close()


def test_command_sent_while_the_daemon_is_down_runs_when_it_is_back(device: Serve, broker: Broker) -> None:
    op = Operator(broker)
    try:
        assert op.command("ping")["ok"] is True
        assert device.terminate() == 0
        cid = "while-down"
        payload = json.dumps({"id": cid, "ts": time.time(), "args": {"model": "ppocr-cls"}}).encode()
        op.send("rollback", payload, reply_id=None)
        device.start()
        reply = wait_for(lambda: op.replies.get(cid), 30, "the queued command's reply")
        assert reply["ok"] is True and device.served_version() == 1
    finally:
        op.close()


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except AssertionError:
        return None


def test_command_verbs_dedupe_and_hostile_payloads(device: Serve, broker: Broker) -> None:
    op = Operator(broker)
    try:
        assert op.command("ping")["data"]["pong"] > 0
        status = op.command("status")
        assert status["ok"] and status["data"]["versions"] == {"ppocr-cls": 2}
        assert op.command("rollback", {"model": "ppocr-cls"})["ok"]
        assert device.served_version() == 1
        assert op.command("pin", {"model": "ppocr-cls", "version": 2})["ok"] and device.served_version() == 2
        assert op.command("unpin", {"model": "ppocr-cls"})["ok"]
        assert op.command("config", {"mqtt.telemetry_seconds": 5})["ok"]
        assert op.command("config", {"mqtt.bogus": 1})["ok"] is False
        assert op.command("reload")["ok"]
        # The same id twice runs once: the second reply is the stored one, marked duplicate.
        cid = "rollback-once"
        payload = json.dumps({"id": cid, "ts": time.time(), "args": {"model": "ppocr-cls"}}).encode()
        first = op.send("rollback", payload, reply_id=cid)
        assert first is not None and first["ok"] and device.served_version() == 1
        op.replies.pop(cid)
        second = op.send("rollback", payload, reply_id=cid)
        assert second is not None and second["data"].get("duplicate") is True and device.served_version() == 1
        # Hostile payloads each get an error reply (or are dropped at the cap); the next command works.
        hostile: list[tuple[str, bytes, tuple[str, ...]]] = [
            ("ping", b"[" * 100_000 + b"]" * 100_000, ("cap", "deep")),  # refused by size before depth
            ("ping", b"[" * 1000 + b"]" * 1000, ("deep", "nest")),
            ("ping", b"\xff\xfe" + b"x" * 10, ("utf",)),
            ("frobnicate", json.dumps({"id": "u1", "ts": time.time(), "args": {}}).encode(), ("verb",)),
            ("rollback", json.dumps({"id": "m1", "ts": time.time(), "args": {}}).encode(), ("model",)),
            ("ping", b"x" * (10 << 20), ()),  # over the packet cap: the broker never delivers it
        ]
        for verb, body, needles in hostile:
            op.replies.clear()
            op.send(verb, body, reply_id=None)
            if needles:
                reply = wait_for(lambda: next(iter(op.replies.values()), None), 15, f"error reply {needles}")
                assert reply["ok"] is False and any(n in reply["message"].lower() for n in needles), reply
            assert op.command("ping")["ok"], f"device stopped answering after {needles}"
    finally:
        op.close()


def test_ping_and_status_are_answered_while_an_update_downloads(tmp_path: Path, keys: dict[str, Path], zoo: Zoo,
                                                                 broker: Broker) -> None:
    from http_fault_server import FaultServer, Route

    extra = mqtt_config(broker) + "[ota]\nallow_http = true\nretries = 0\n"
    config, state, port = write_config(tmp_path / "device", keys["trust_dir"], extra=extra, top=TOP)
    cli("models", "install", pack_onnx(tmp_path / "v1.bundle", zoo("ppocr_cls"), 1, keys["a"], tmp_path),
        "--config", config)
    serve = Serve(config, state, port).start()
    # A bundle server that sends one byte every 0.1 s: the update is busy for about 6 s.
    with FaultServer({"/slow.bundle": Route(body=b"x" * 60, fault="drip", drip_seconds=0.1)}) as server:
        op = Operator(broker)
        try:
            serve.wait_ready()
            wait_online(broker)
            assert op.command("ping")["ok"]
            payload = json.dumps({"id": "slow-update", "ts": time.time(),
                                  "args": {"url": server.url("/slow.bundle")}}).encode()
            op.send("update", payload, reply_id=None)
            wait_for(lambda: server.seen("/slow.bundle"), 15, "the update to start downloading")
            assert op.command("ping", timeout=3.0)["ok"]
            assert op.command("status", timeout=3.0)["data"]["versions"] == {"ppocr-cls": 1}
            assert "slow-update" not in op.replies, "the update finished before the quick commands were tested"
            update = wait_for(lambda: op.replies.get("slow-update"), 30, "the update's reply")
            assert update["ok"] is False and serve.served_version() == 1
        finally:
            op.close()
            serve.kill9()


def test_signed_commands_refuse_unsigned_wrong_key_expired_and_replayed(tmp_path: Path, keys: dict[str, Path],
                                                                        zoo: Zoo, broker: Broker) -> None:
    ops = tmp_path / "operators"
    ops.mkdir()
    generate_keypair(tmp_path / "operator.key")
    generate_keypair(tmp_path / "intruder.key")
    (ops / "operator.pub").write_bytes((tmp_path / "operator.key.pub").read_bytes())
    extra = mqtt_config(broker, f'signed_commands = true\noperator_keys_dir = "{ops}"\n')
    config, state, port = write_config(tmp_path / "device", keys["trust_dir"], extra=extra, top=TOP)
    for v in (1, 2):
        cli("models", "install", pack_onnx(tmp_path / f"v{v}.bundle", zoo("ppocr_cls"), v, keys["a"], tmp_path),
            "--config", config)
    serve = Serve(config, state, port).start()
    serve.wait_ready()
    wait_online(broker)
    op = Operator(broker)
    good, bad = load_private_key(tmp_path / "operator.key"), load_private_key(tmp_path / "intruder.key")

    def signed(key: Any, **kw: Any) -> tuple[str, bytes]:
        command = new_command("rollback", {"model": "ppocr-cls"}, device=DEVICE, **kw)
        return command["id"], sign_command(command, [key])

    try:
        assert op.command("rollback", {"model": "ppocr-cls"})["ok"] is False  # unsigned
        cid, payload = signed(bad)
        assert "key" in op.send("rollback", payload, reply_id=cid)["message"].lower()  # type: ignore[index]
        cid, payload = signed(good, ts=time.time() - 3600)
        assert "expired" in op.send("rollback", payload, reply_id=cid)["message"].lower()  # type: ignore[index]
        assert serve.served_version() == 2
        cid, payload = signed(good)
        assert op.send("rollback", payload, reply_id=cid)["ok"] is True  # type: ignore[index]
        assert serve.served_version() == 1
        # The same signed payload again under a new id is a replayed nonce: refused.
        doc = json.loads(payload)
        inner = json.loads(doc["signed"])
        inner["id"] = "replay-1"
        replay = sign_command(inner, [good])
        reply = op.send("rollback", replay, reply_id="replay-1")
        assert reply is not None and reply["ok"] is False and "nonce" in reply["message"].lower()
        assert op.command("ping")["ok"]  # unsigned ping is still allowed
    finally:
        op.close()
        if serve.proc and serve.proc.poll() is None:
            serve.kill9()


def test_tls_mtls_broker_and_untrusted_cert_refused(tmp_path: Path, keys: dict[str, Path], zoo: Zoo) -> None:
    from tls_helpers import make_pki

    pki, stranger = make_pki(tmp_path / "pki"), make_pki(tmp_path / "other-ca")
    with Broker(tmp_path / "tls-broker", tls=pki, require_certificate=True) as tls_broker:
        for name, ca, expect in (("trusted", pki.ca, True), ("untrusted", stranger.ca, False)):
            extra = (f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {tls_broker.port}\n'
                     f'tls = true\nca_file = "{ca}"\ncert_file = "{pki.client_cert}"\nkey_file = "{pki.client_key}"\n'
                     "reconnect_min_seconds = 0.05\nreconnect_max_seconds = 0.5\n")
            config, state, port = write_config(tmp_path / name, keys["trust_dir"], extra=extra,
                                               top=f'device_id = "{name}"\n')
            serve = Serve(config, state, port).start()
            try:
                if expect:
                    wait_for(lambda: '"state": "online"' in _retained(tls_broker, "edge/trusted/status", pki), 30,
                             "online over mTLS")
                else:
                    wait_for(lambda s=serve: "certificate verify failed" in s.stderr(), 30, "TLS refusal logged")
                    assert _retained(tls_broker, "edge/untrusted/status", pki) == ""  # never connected
            finally:
                serve.kill9()


def _retained(broker: Broker, topic: str, pki: Any = None) -> str:
    """Read one retained message (over mTLS when ``pki`` is given); empty string when there is none."""
    import ssl

    got: list[str] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"r-{uuid.uuid4().hex[:6]}",
                         protocol=MQTTProtocolVersion.MQTTv5)
    if pki is not None:
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        client.tls_set_context(ctx)
    client.on_message = lambda c, u, m: got.append(m.payload.decode())
    client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    deadline = time.monotonic() + 2
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    client.disconnect()
    client.loop_stop()
    return got[0] if got else ""


def test_mqtt_input_source_results_carry_correlation_id(tmp_path: Path, keys: dict[str, Path], zoo: Zoo,
                                                        broker: Broker) -> None:
    from cli_helpers import Device
    from test_cli import pack_face

    extra = mqtt_config(broker) + ('[[pipelines]]\nmodel = "face"\nresults = "none"\n[pipelines.source]\n'
                                   'type = "mqtt"\n')
    config, state, port = write_config(tmp_path / "device", keys["trust_dir"], extra=extra, top=TOP)
    cli("models", "install", pack_face(Device(tmp_path, config, state, keys), zoo, 1), "--config", config)
    serve = Serve(config, state, port).start()
    watcher = Watcher(broker, f"edge/{DEVICE}/results/#")
    try:
        serve.wait_ready()
        wait_for(lambda: '"state": "online"' in _retained(broker, f"edge/{DEVICE}/status"), 20, "device online")
        sender = broker.client("camera-7")
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = b"frame-0042"
        sender.publish(f"edge/{DEVICE}/input/face", zoo("grace_hopper").read_bytes(), qos=1,
                       properties=props).wait_for_publish(5)
        result = wait_for(lambda: watcher.on("/results/face"), 30, "result message")[0]
        body = json.loads(result.payload)
        assert body["correlation_id"] == "frame-0042" and body["result"]["top"][0]["score"] > 0.8
        assert result.properties.CorrelationData == b"frame-0042"
        sender.publish(f"edge/{DEVICE}/input/face", b"x" * (9 << 20), qos=1).wait_for_publish(5)
        time.sleep(0.5)
        # Over the packet cap (max_input_bytes + 64 KiB): the broker never delivers it, so nothing runs or answers;
        # between the two caps it is answered with the reason (test_daemon_inputs.py).
        assert len(watcher.on("/results/face")) == 1
        sender.disconnect()
    finally:
        watcher.close()
        serve.kill9()

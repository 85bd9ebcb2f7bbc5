"""`edge-runtime fleet send|watch|rollout` as an operator runs it, against real daemons and a real mosquitto.

Two `edge-runtime serve` processes (dev-a, dev-b, both in group "lobby", signed commands required for
update/config/...) share one broker for the whole module; each test leaves them as it found them, except
the rollout test, which is the only one that installs models.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cli_helpers import cli
from daemon_helpers import Serve, pack_onnx, wait_for, write_config
from http_fault_server import FaultServer, Route
from mqtt_broker import Broker, Collector, mosquitto_binary

from edge_runtime.bundle.signing import generate_keypair
from edge_runtime.config.model import MqttConfig
from edge_runtime.errors import CommandError
from edge_runtime.fleet.client import FleetClient, Target, build_command, watch_filters
from edge_runtime.fleet.rollout import plan_waves
from edge_runtime.mqtt.link import Message

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")
Zoo = Callable[[str], Path]
DEVICES = ("dev-a", "dev-b")

DEVICE_MQTT = """
[mqtt]
enabled = true
host = "127.0.0.1"
port = {port}
groups = ["lobby"]
keepalive_seconds = 5
reconnect_min_seconds = 0.05
reconnect_max_seconds = 0.5
telemetry_seconds = 0.5
signed_commands = true
operator_keys_dir = "{operator_keys}"
[ota]
allow_http = true
retries = 0
"""


@dataclass
class Fleet:
    root: Path
    broker: Broker
    server: FaultServer
    devices: dict[str, Serve]
    publisher_key: Path
    operator_key: Path
    rogue_key: Path

    def operator_config(self, protocol: str = "5", port: int | None = None) -> Path:
        path = self.root / f"operator-{protocol}-{port or self.broker.port}.toml"
        path.write_text(f'[mqtt]\nhost = "127.0.0.1"\nport = {port or self.broker.port}\nprotocol = "{protocol}"\n')
        return path

    def fleet(self, *args: str | Path, protocol: str = "5") -> subprocess.CompletedProcess[str]:
        return cli("fleet", *args, "--config", self.operator_config(protocol), check=False, timeout=120)


def lines(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    (root / "keys").mkdir()
    trust, operators = root / "trust", root / "operator-keys"
    trust.mkdir()
    operators.mkdir()
    for name, trusted_in in (("publisher", trust), ("operator", operators), ("rogue", None)):
        generate_keypair(root / "keys" / name)
        if trusted_in is not None:
            (trusted_in / f"{name}.pub").write_bytes((root / "keys" / f"{name}.pub").read_bytes())
    broker = Broker(root / "broker").start()
    server = FaultServer({}).__enter__()
    devices: dict[str, Serve] = {}
    watcher = Collector(broker, "edge/+/status", client_id="fixture-status")
    try:
        for device in DEVICES:
            extra = DEVICE_MQTT.format(port=broker.port, operator_keys=operators)
            config, state, port = write_config(root / device, trust, extra=extra)
            config.write_text(f'device_id = "{device}"\n' + config.read_text())  # top level, before any table
            devices[device] = Serve(config, state, port).start()

        def online() -> bool:
            states = {m.topic.split("/")[1]: json.loads(m.payload)["state"] for m in watcher.on("edge/")}
            return all(states.get(d) == "online" for d in DEVICES)

        wait_for(online, 60, "both devices online")
        yield Fleet(root, broker, server, devices, root / "keys" / "publisher", root / "keys" / "operator",
                    root / "keys" / "rogue")
    finally:
        watcher.close()
        for serve in devices.values():
            if serve.proc and serve.proc.poll() is None:
                serve.kill9()
        server.__exit__(None, None, None)
        broker.stop()


# ---------------------------------------------------------------------------------------------- pure parts


def test_public_surface() -> None:
    import edge_runtime.fleet.client as fleet_module
    import edge_runtime.fleet.rollout as rollout_module

    assert set(fleet_module.__all__) == {
        "CONNECT_TIMEOUT", "IDENT", "KINDS", "FleetClient", "FleetReply", "Target", "WatchMessage", "build_command",
        "classify", "watch_filters"}
    assert set(rollout_module.__all__) == {"DeviceOutcome", "DeviceStatus", "RolloutResult", "discover",
                                           "plan_waves", "rollout", "select_devices"}
    for module in (fleet_module, rollout_module):
        assert all(hasattr(module, name) for name in module.__all__)


@pytest.mark.parametrize(("spec", "count", "waves"), [
    ("1,25%,100%", 8, [1, 1, 6]),
    ("1,25%,100%", 1, [1]),
    ("1,100%", 2, [1, 1]),
    ("2,2,50%", 10, [2, 3]),       # an empty wave is dropped; devices past the last size are in no wave
    ("10%,100%", 3, [1, 2]),       # percentages round up: a wave is never empty by rounding
    ("5", 3, [3]),
])
def test_plan_waves_cumulative_sizes(spec: str, count: int, waves: list[int]) -> None:
    devices = [f"d{i}" for i in range(count)]
    planned = plan_waves(devices, spec)
    assert [len(w) for w in planned] == waves
    assert [d for w in planned for d in w] == devices[:sum(waves)]  # order kept, nobody twice


@pytest.mark.parametrize("spec", ["", "0", "1,0%", "150%", "1.5", "a,100%", "-1"])
def test_plan_waves_refuses_bad_sizes(spec: str) -> None:
    with pytest.raises(CommandError, match="bad wave size"):
        plan_waves(["d1", "d2"], spec)


def test_build_command_checks_with_the_device_rules() -> None:
    command_id, payload = build_command("ping", {}, Target(device="cam-7"), command_id="c-1")
    doc = json.loads(payload)
    assert command_id == "c-1" and doc["id"] == "c-1" and doc["args"] == {} and abs(doc["ts"] - time.time()) < 5
    with pytest.raises(CommandError, match="command id"):
        build_command("ping", {}, Target(device="cam-7"), command_id="has space")
    with pytest.raises(CommandError, match="unknown command verb"):
        build_command("reboot", {}, Target())
    with pytest.raises(CommandError, match="must match"):
        Target(device="edge/+")
    with pytest.raises(CommandError, match="unknown kind 'logs'"):
        watch_filters("edge", "+", ["status", "logs"])
    assert Target(group="lobby").topic("edge", "ping") == "edge/group/lobby/cmd/ping"
    assert Target().topic("edge", "ping") == "edge/all/cmd/ping"


class FakeLink:
    """Stands in for MqttLink: always connected; ``deliver`` hands a message to the matching subscribers."""

    def __init__(self, config: MqttConfig, client_id: str) -> None:
        self.handlers: list[tuple[str, Callable[[Message], None]]] = []
        self.connected, self.last_error = True, ""

    def subscribe(self, topic_filter: str, handler: Callable[[Message], None], qos: int = 1) -> None:
        self.handlers.append((topic_filter, handler))

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def deliver(self, topic: str, payload: bytes, **props: Any) -> None:
        for topic_filter, handler in self.handlers:
            if mqtt.topic_matches_sub(topic_filter, topic):
                handler(Message(topic, payload, 1, False, **props))


def _reply(command_id: str, **data: Any) -> bytes:
    return json.dumps({"id": command_id, "ok": True, "message": "pong", "data": data}).encode()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_replies_are_attributed_and_filtered(protocol: str) -> None:
    links: list[FakeLink] = []
    client = FleetClient(MqttConfig(protocol=protocol), client_id="op",
                         link_factory=lambda config, cid: links.append(FakeLink(config, cid)) or links[-1])
    client.open(replies=True)
    link = links[0]
    if protocol == "5":
        assert client.reply_topic == "edge/fleet/op/reply"
        topic, kw = "edge/fleet/op/reply", {"correlation_data": b"c1"}
        link.deliver(topic, _reply("c1"), **kw, user_properties=(("device", "cam-1"),))
        link.deliver(topic, _reply("c1", device="cam-2"), **kw)
        link.deliver(topic, _reply("c1"), **kw)  # nothing says who: the group target cannot either
        expected = ["cam-1", "cam-2", None]
    else:
        assert client.reply_topic is None
        topic, kw = "edge/cam-3/reply/c1", {}
        link.deliver(topic, _reply("c1"))
        expected = ["cam-3"]
    link.deliver(topic, _reply("c1", duplicate=True, in_progress=True), **kw)  # interim: the real reply follows
    link.deliver(topic, b"not a reply", **kw)
    link.deliver("edge/cam-9/reply/other", _reply("other"))
    link.deliver("edge/fleet/op/reply", _reply("other"), correlation_data=b"other")
    got = list(client.replies({"c1": None}, time.monotonic() + 0.3))
    assert [(r.device, r.id, r.ok) for r in got] == [(d, "c1", True) for d in expected]


# ---------------------------------------------------------------------------------------------- send


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_send_ping_one_device(fleet: Fleet, protocol: str) -> None:
    proc = fleet.fleet("send", "--device", "dev-a", "ping", "--id", f"ping-{protocol}", protocol=protocol)
    assert proc.returncode == 0, proc.stderr
    (reply,) = lines(proc)
    assert reply["device"] == "dev-a" and reply["id"] == f"ping-{protocol}"
    assert reply["ok"] is True and reply["message"] == "pong" and "device_ts" in reply["data"]


def test_send_broker_flag_overrides_config(fleet: Fleet) -> None:
    wrong = fleet.operator_config(port=1)  # nothing listens there
    proc = cli("fleet", "send", "--device", "dev-b", "status", "--config", wrong,
               "--broker", f"127.0.0.1:{fleet.broker.port}", check=False)
    assert proc.returncode == 0, proc.stderr
    (reply,) = lines(proc)
    assert reply["device"] == "dev-b" and reply["data"]["device"] == "dev-b"


def test_send_to_unknown_device_times_out(fleet: Fleet) -> None:
    start = time.monotonic()
    proc = fleet.fleet("send", "--device", "ghost", "ping", "--timeout", "1.5")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.strip() == "error: no reply from device ghost within 1.5 s"
    assert time.monotonic() - start < 15  # the timeout, plus interpreter start-up


@pytest.mark.parametrize(("protocol", "target", "verb"), [
    ("5", ("--group", "lobby"), "status"),   # MQTT 5: one response topic; status data names the device
    ("3.1.1", ("--group", "lobby"), "ping"),  # 3.1.1: edge/<device>/reply/<id> names it
    ("5", ("--all",), "status"),
])
def test_send_group_and_all_reach_every_device(fleet: Fleet, protocol: str, target: tuple[str, ...],
                                              verb: str) -> None:
    proc = fleet.fleet("send", *target, verb, "--expect", "2", "--timeout", "10", protocol=protocol)
    assert proc.returncode == 0, proc.stderr
    replies = lines(proc)
    assert sorted(r["device"] for r in replies) == list(DEVICES)
    assert all(r["ok"] for r in replies) and len({r["id"] for r in replies}) == 1


def test_send_group_fewer_replies_than_expected_fails(fleet: Fleet) -> None:
    proc = fleet.fleet("send", "--group", "lobby", "ping", "--expect", "3", "--timeout", "2", protocol="3.1.1")
    assert proc.returncode == 1
    assert len(lines(proc)) == 2
    assert "only 2 of 3 expected replies from group lobby within 2 s" in proc.stderr


def test_signed_commands(fleet: Fleet) -> None:
    signed = fleet.fleet("send", "--device", "dev-a", "config", "--arg", "log_level=INFO", "--sign",
                         fleet.operator_key)
    assert signed.returncode == 0, signed.stderr
    (reply,) = lines(signed)
    assert reply["ok"] is True and reply["data"]["applied"] == {"log_level": "INFO"}

    unsigned = fleet.fleet("send", "--device", "dev-a", "update", "--arg", "url=http://127.0.0.1:9/x.bundle")
    assert unsigned.returncode == 1
    (reply,) = lines(unsigned)
    assert reply["ok"] is False and reply["message"] == "command 'update' must be signed by an operator key"
    assert "1 of 1 replies not ok" in unsigned.stderr

    rogue = fleet.fleet("send", "--group", "lobby", "config", "--args", '{"log_level": "INFO"}', "--sign",
                        fleet.rogue_key, "--expect", "2", protocol="3.1.1")  # 3.1.1: reply topics name devices
    assert rogue.returncode == 1
    replies = lines(rogue)
    assert sorted(r["device"] for r in replies) == list(DEVICES)
    assert all(not r["ok"] and "command signature refused" in r["message"] for r in replies)


# ---------------------------------------------------------------------------------------------- watch


def test_watch_shows_retained_status_and_live_telemetry(fleet: Fleet) -> None:
    proc = fleet.fleet("watch", "--device", "dev-b", "--kind", "status", "--count", "1", "--timeout", "20")
    assert proc.returncode == 0, proc.stderr
    (status,) = lines(proc)
    assert status["topic"] == "edge/dev-b/status" and status["device"] == "dev-b" and status["kind"] == "status"
    assert status["retained"] is True
    assert status["payload"]["state"] == "online" and status["payload"]["groups"] == ["lobby"]

    proc = fleet.fleet("watch", "--kind", "telemetry", "--count", "4", "--timeout", "20")
    assert proc.returncode == 0, proc.stderr
    shown = lines(proc)
    assert len(shown) == 4 and {m["kind"] for m in shown} == {"telemetry"} and not any(m["retained"] for m in shown)
    assert all(isinstance(m["payload"]["seq"], int) for m in shown)


def test_watch_ends_at_timeout_with_nothing_to_show(fleet: Fleet) -> None:
    proc = fleet.fleet("watch", "--device", "ghost", "--timeout", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""


# ---------------------------------------------------------------------------------------------- rollout


def test_rollout_stops_at_a_failed_wave_then_a_good_one_updates_all(fleet: Fleet, zoo: Zoo) -> None:
    work = fleet.root / "bundles"
    work.mkdir()
    wrong = work / "wrong.npy"
    np.save(wrong, np.full((1, 2), 7.0, np.float32))
    bad = pack_onnx(work / "bad.bundle", zoo("ppocr_cls"), 1, fleet.publisher_key, work, golden_expected=wrong)
    good = pack_onnx(work / "good.bundle", zoo("ppocr_cls"), 2, fleet.publisher_key, work)
    fleet.server.routes["/bad.bundle"] = Route(body=bad.read_bytes())
    fleet.server.routes["/good.bundle"] = Route(body=good.read_bytes())
    commands = Collector(fleet.broker, "edge/+/cmd/#", client_id="rollout-commands")
    try:
        proc = fleet.fleet("rollout", "--url", fleet.server.url("/bad.bundle"), "--devices", "dev-a,dev-b",
                           "--waves", "1,100%", "--sign", fleet.operator_key, "--timeout", "60", "--json")
        assert proc.returncode == 1
        *outcomes, summary = lines(proc)
        assert [(o["device"], o["wave"], o["ok"]) for o in outcomes] == [("dev-a", 1, False)]
        assert "golden" in outcomes[0]["message"]
        assert summary["summary"]["status"] == "stopped" and summary["summary"]["untouched"] == ["dev-b"]
        assert "rollout stopped in wave 1" in proc.stderr
        time.sleep(0.5)  # a command sent to dev-b would have reached the collector by now
        assert [m.topic for m in commands.on("edge/")] == ["edge/dev-a/cmd/update"]
        assert [e for e in fleet.devices["dev-a"].events() if e["kind"] == "update_failed"]
        assert not [e for e in fleet.devices["dev-b"].events() if e["kind"].startswith("update")]
        assert fleet.devices["dev-b"].served_version() is None

        data = good.read_bytes()
        proc = fleet.fleet("rollout", "--url", fleet.server.url("/good.bundle"), "--group", "lobby",
                           "--sha256", hashlib.sha256(data).hexdigest(), "--size", str(len(data)),
                           "--waves", "1,100%", "--sign", fleet.operator_key, "--timeout", "60")
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout.splitlines()
        assert out[0].startswith("wave 1 dev-a: ok: ppocr-cls v2 active")
        assert out[1].startswith("wave 2 dev-b: ok: ppocr-cls v2 active")
        assert out[2] == "rollout completed: 2 updated, 0 failed, 0 untouched, 0 skipped (offline), 0 in no wave"
        assert all(serve.served_version() == 2 for serve in fleet.devices.values())
        assert [m.topic for m in commands.on("edge/")][1:] == ["edge/dev-a/cmd/update", "edge/dev-b/cmd/update"]
    finally:
        commands.close()

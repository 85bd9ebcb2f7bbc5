"""Issue 8 §5: the state the fleet sees (retained status, replies, events) is the state the device has.

A real ``edge-runtime serve`` against a real mosquitto; v1 and v2 of ppocr-cls cached, v2 active.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import cli
from daemon_helpers import Serve, pack_onnx, wait_for, write_config
from mqtt_broker import Broker, mosquitto_binary
from test_mqtt_daemon import DEVICE, TOP, Operator, _retained, broker, device, mqtt_config, wait_online  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")
MODEL = "ppocr-cls"
Zoo = Callable[[str], Path]


def _status(broker: Broker) -> dict[str, Any]:  # noqa: F811
    text = _retained(broker, f"edge/{DEVICE}/status")
    return json.loads(text) if text else {}


def _retained_version(broker: Broker, version: int, what: str) -> dict[str, Any]:  # noqa: F811
    return wait_for(lambda: (s := _status(broker)).get("versions") == {MODEL: version} and s, 20, what)


def test_online_status_says_why_it_was_published(device: Serve, broker: Broker) -> None:  # noqa: F811
    first = _retained_version(broker, 2, "the first online status")
    assert first["state"] == "online" and first.get("reason") == "started", first
    # The broker restarts without persistence: the retained status it serves now is the device's republish.
    broker.kill()
    broker.start()
    again = wait_for(lambda: (s := _status(broker)).get("reason") == "reconnected" and s, 30,
                     "the online status republished with reason reconnected")
    assert again["state"] == "online" and again["versions"] == {MODEL: 2}, again


def test_retained_status_follows_cli_rollback_with_sighup_and_reload(device: Serve, broker: Broker) -> None:  # noqa: F811
    _retained_version(broker, 2, "the first online status")
    # CLI rollback + SIGHUP (systemctl reload): the retained status must follow, not wait for an OTA.
    cli("models", "rollback", MODEL, "--config", device.config)
    assert device.proc is not None
    device.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: device.served_version() == 1, 20, "v1 serving after SIGHUP")
    after = _retained_version(broker, 1, "retained status v1 after SIGHUP")
    assert after.get("reason") == "version change", after
    # CLI activate + the MQTT reload command.
    cli("models", "activate", MODEL, "2", "--config", device.config)
    op = Operator(broker)
    try:
        reply = op.command("reload")
        assert reply["ok"] and reply["data"]["changed"] == [MODEL], reply
        _retained_version(broker, 2, "retained status v2 after reload")
    finally:
        op.close()
    reloaded = device.events("reloaded")
    assert [(e["version"], e["previous"]) for e in reloaded] == [(1, 2), (2, 1)], reloaded
    assert not device.events("rolled_back"), "operator changes are not reported as failures"


def test_rollback_of_a_pinned_model_is_refused_naming_the_pin(device: Serve, broker: Broker) -> None:  # noqa: F811
    op = Operator(broker)
    try:
        pin = op.command("pin", {"model": MODEL, "version": 1})
        assert pin["ok"] and pin["data"]["switched"], pin
        _retained_version(broker, 1, "retained status v1 after the pin")
        refused = op.command("rollback", {"model": MODEL})
        assert not refused["ok"] and "pinned to v1" in refused["message"], refused
        status = op.command("status")["data"]
        assert status["versions"] == {MODEL: 1} and status["pinned"] == {MODEL: 1}, status
        listed = json.loads(cli("models", "list", "--json", "--config", device.config).stdout)
        assert [(m["active"], m["pinned"]) for m in listed] == [(1, 1)], listed
        assert device.served_version() == 1
        # The CLI keeps the same precedence.
        cli_refused = cli("models", "rollback", MODEL, "--config", device.config, check=False)
        assert cli_refused.returncode != 0 and "pinned to v1" in cli_refused.stderr, cli_refused
        # After unpin the rollback runs and is an operator action, not a failure.
        assert op.command("unpin", {"model": MODEL})["ok"]
        back = op.command("rollback", {"model": MODEL, "version": 2})
        assert back["ok"] and back["data"]["version"] == 2 and back["data"]["pinned"] is None, back
        _retained_version(broker, 2, "retained status v2 after the rollback")
    finally:
        op.close()
    pinned = device.events("pinned")
    assert [(e["version"], e["previous"], e["switched"]) for e in pinned] == [(1, 2, True)], pinned
    assert [e["version"] for e in device.events("unpinned")] == [1]
    rollbacks = device.events("operator_rollback")
    assert [(e["version"], e["previous"]) for e in rollbacks] == [(2, 1)], rollbacks
    assert all("failed_version" not in e for e in pinned + rollbacks)
    assert not device.events("rolled_back"), "no automatic fallback happened"


def test_operator_changes_are_not_reported_as_failures(device: Serve, broker: Broker) -> None:  # noqa: F811
    # The automatic side (rolled_back with failed_version) is checked through the real daemon by
    # test_daemon.py::test_crash_loop_during_probation_reverts.
    op = Operator(broker)
    try:
        back = op.command("rollback", {"model": MODEL, "version": 1})
        assert back["ok"] and back["data"]["version"] == 1, back
        pin = op.command("pin", {"model": MODEL, "version": 2})  # a pin to the newer version
        assert pin["ok"] and pin["data"]["switched"], pin
        _retained_version(broker, 2, "retained status v2 after the pin")
    finally:
        op.close()
    rollbacks = wait_for(lambda: device.events("operator_rollback"), 10, "an operator_rollback event")
    assert [(e["version"], e["previous"]) for e in rollbacks] == [(1, 2)], rollbacks
    pinned = wait_for(lambda: device.events("pinned"), 10, "a pinned event")
    assert [(e["version"], e["previous"], e["switched"]) for e in pinned] == [(2, 1, True)], pinned
    assert all("failed_version" not in e for e in rollbacks + pinned), rollbacks + pinned
    assert not device.events("rolled_back"), "an operator's rollback and pin are not automatic fallbacks"


def test_update_of_a_pinned_model_installs_without_activating(tmp_path: Path, keys: dict[str, Path], zoo: Zoo,
                                                               broker: Broker) -> None:  # noqa: F811
    from http_fault_server import FaultServer, Route

    extra = mqtt_config(broker) + "[ota]\nallow_http = true\nretries = 0\n"
    config, state, port = write_config(tmp_path / "device", keys["trust_dir"], extra=extra, top=TOP)
    cli("models", "install", pack_onnx(tmp_path / "v1.bundle", zoo("ppocr_cls"), 1, keys["a"], tmp_path),
        "--config", config)
    v2 = pack_onnx(tmp_path / "v2.bundle", zoo("ppocr_cls"), 2, keys["a"], tmp_path).read_bytes()
    serve = Serve(config, state, port).start()
    op = Operator(broker)
    try:
        serve.wait_ready()
        wait_online(broker)
        assert op.command("pin", {"model": MODEL, "version": 1})["ok"]
        with FaultServer({"/v2.bundle": Route(body=v2)}) as server:
            update = op.command("update", {"url": server.url("/v2.bundle")}, timeout=60.0)
        assert update["ok"] and update["data"]["active"] is False, update
        assert "pinned to v1" in update["message"], update
        assert serve.served_version() == 1
        listed = json.loads(cli("models", "list", "--json", "--config", config).stdout)
        assert [(m["active"], m["pinned"]) for m in listed] == [(1, 1)], listed
        refused = cli("models", "activate", MODEL, "2", "--config", config, check=False)
        assert refused.returncode != 0 and "pinned to v1" in refused.stderr, refused
        assert op.command("status")["data"]["versions"] == {MODEL: 1}
        assert _status(broker).get("versions") == {MODEL: 1}
    finally:
        op.close()
        serve.kill9()
    assert not serve.events("activated") and serve.events("update_installed")

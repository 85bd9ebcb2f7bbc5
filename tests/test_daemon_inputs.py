"""Issue 8 §6/§7 through a real `edge-runtime serve`: one daemon per state dir, each result written once,
a /metrics page that `promtool check metrics` accepts, and an answer for every MQTT input."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import paho.mqtt.client as mqtt
import pytest
from cli_helpers import Device, cli
from daemon_helpers import REPO, Serve, free_port, wait_for, write_config
from mqtt_broker import Broker, mosquitto_binary
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_cli import pack_face
from test_mqtt_daemon import DEVICE, TOP, Watcher, _retained, mqtt_config

from edge_runtime.pipelines.sources.mqtt_input import REFUSAL_ANSWERS_PER_SECOND

Zoo = Callable[[str], Path]


def _face_device(tmp_path: Path, keys: dict[str, Path], zoo: Zoo, inbox: Path) -> tuple[Path, Path, int]:
    """A config with the face model installed and one folder pipeline ``inbox`` on ``inbox``."""
    inbox.mkdir(exist_ok=True)
    extra = (f'[[pipelines]]\nmodel = "face"\nname = "inbox"\n[pipelines.source]\ntype = "folder"\n'
             f'path = "{inbox}"\npoll_seconds = 0.1\n')
    config, state, port = write_config(tmp_path / "device", keys["trust_dir"], extra=extra)
    dev = Device(tmp_path, config, state, keys)
    cli("models", "install", pack_face(dev, zoo, 1), "--config", config)
    return config, state, port


def test_second_daemon_on_one_state_dir_refuses_naming_the_first(tmp_path: Path, keys: dict[str, Path],
                                                                  zoo: Zoo) -> None:
    config, state, port = _face_device(tmp_path, keys, zoo, tmp_path / "inbox")
    first = Serve(config, state, port).start()
    try:
        first.wait_ready(60)
        assert first.proc is not None
        lock = state / "daemon.lock"
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600
        # Same state dir, another API port: refused at once, one line naming the first daemon.
        other = tmp_path / "other.toml"
        other.write_text(config.read_text().replace(f":{port}", f":{free_port()}"))
        second = subprocess.run([sys.executable, "-m", "edge_runtime", "serve", "--config", str(other)],
                                capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
        assert second.returncode != 0
        assert f"another edge-runtime daemon (pid {first.proc.pid}) already runs on state dir {state}" \
            in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        # The CLI still changes the cache next to the running daemon (its own short state lock).
        listed = json.loads(cli("models", "list", "--json", "--config", config).stdout)
        assert [m["name"] for m in listed] == ["face"]
        # kill -9 frees the lock: the next daemon starts.
        first.kill9()
        again = Serve(config, state, port).start()
        try:
            again.wait_ready(60)
        finally:
            again.terminate()
    finally:
        if first.proc and first.proc.poll() is None:
            first.kill9()


def test_each_result_is_written_once_and_metrics_pass_promtool(tmp_path: Path, keys: dict[str, Path],
                                                               zoo: Zoo) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: tools/test.sh installs it (apt-get install prometheus)"
    inbox = tmp_path / "inbox"
    config, state, port = _face_device(tmp_path, keys, zoo, inbox)
    serve = Serve(config, state, port).start()
    try:
        serve.wait_ready(60)
        # Before any input: the pipeline's counters exist at 0 (alerts and rate() see the first increment).
        status, text = serve.get("/metrics")
        page = text.decode()
        for sample in ('edge_frames_dropped_total{pipeline="inbox"} 0', 'edge_source_errors_total{pipeline="inbox"} 0',
                       'edge_inference_errors_total{model="face"} 0'):
            assert sample in page.splitlines(), f"{sample!r} missing from\n{page}"
        shutil.copy(zoo("grace_hopper"), inbox / "one.jpg")
        wait_for(lambda: '"one.jpg"' in serve.stdout(), 60, "the result on stdout")
        status, text = serve.get("/metrics")
        assert status == 200 and "edge_inference_latency_seconds_bucket" in text.decode()
        checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60,
                                 check=False)
        assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), \
            (checked.stdout + checked.stderr).decode()
    finally:
        assert serve.terminate() == 0
    results = [line for line in serve.stdout().splitlines() if '"one.jpg"' in line]
    assert len(results) == 1 and json.loads(results[0])["key"] == "one.jpg"
    assert json.loads(results[0])["result"]["result_id"]  # ground truth for it can come later (monitoring)
    assert '"one.jpg"' not in serve.stderr()  # not a second copy on stderr (both reach the journal)
    assert os.path.exists(state / "daemon.lock")


# ---------------------------------------------------------------------------------------------- MQTT input answers


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[Broker]:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto not installed")  # as the other broker tests: tools/test.sh installs it
    with Broker(tmp_path / "broker") as b:
        yield b


def _publish(sender: mqtt.Client, payload: bytes, *, response: str | None = None,
             correlation: bytes | None = None) -> None:
    props = Properties(PacketTypes.PUBLISH)
    if response is not None:
        props.ResponseTopic = response
    if correlation is not None:
        props.CorrelationData = correlation
    sender.publish(f"edge/{DEVICE}/input/face", payload, qos=1, properties=props).wait_for_publish(5)


def test_every_mqtt_input_is_answered_at_its_response_topic(tmp_path: Path, keys: dict[str, Path], zoo: Zoo,
                                                            broker: Broker) -> None:
    extra = mqtt_config(broker, "max_input_bytes = 4096\n") + (
        '[[pipelines]]\nmodel = "face"\nresults = "none"\n[pipelines.source]\ntype = "mqtt"\n')
    config, state, port = write_config(tmp_path / "device", keys["trust_dir"], extra=extra, top=TOP)
    cli("models", "install", pack_face(Device(tmp_path, config, state, keys), zoo, 1), "--config", config)
    serve = Serve(config, state, port).start()
    watcher = Watcher(broker, "answers/#", f"edge/{DEVICE}/results/#")
    # A small JPEG (under the 4 KiB cap, so that a flood of oversized ones stays within the link's queue).
    small = cv2.resize(cv2.imread(str(zoo("grace_hopper"))), (48, 56))
    image = cv2.imencode(".jpg", small)[1].tobytes()
    assert len(image) < 4096
    try:
        serve.wait_ready(60)
        wait_for(lambda: '"state": "online"' in _retained(broker, f"edge/{DEVICE}/status"), 20, "device online")
        sender = broker.client("camera-7")
        # A good image: its result at the Response Topic, with the Correlation Data echoed byte for byte.
        _publish(sender, image, response="answers/cam7", correlation=b"\x00\xffframe-1")
        (good,) = wait_for(lambda: watcher.on("answers/cam7"), 30, "the result at the response topic")
        body = json.loads(good.payload)
        assert body["ok"] is True and body["result"]["top"] and body["model"] == "face", body
        assert good.properties.CorrelationData == b"\x00\xffframe-1"
        # A bad payload: an error answer there too, naming what is wrong.
        _publish(sender, b"this is not an image", response="answers/cam7", correlation=b"bad-1")
        bad = wait_for(lambda: watcher.on("answers/cam7")[1:], 30, "the error at the response topic")[0]
        body = json.loads(bad.payload)
        assert body["ok"] is False and body["correlation_id"] == "bad-1" and body["error"], body
        assert bad.properties.CorrelationData == b"bad-1"
        # Without a Response Topic the answer goes to the results topic, as before.
        _publish(sender, b"still not an image", correlation=b"bad-2")
        (plain,) = wait_for(lambda: watcher.on(f"edge/{DEVICE}/results/face"), 30, "the error on the results topic")
        assert json.loads(plain.payload)["correlation_id"] == "bad-2" and not json.loads(plain.payload)["ok"]
        assert len(watcher.on("answers/cam7")) == 2  # nothing answered twice, nothing crossed over
        # Over the cap: refused and answered, but a flood of refusals gets a bounded number of answers.
        _publish(sender, b"x" * 4097, response="answers/big", correlation=b"big-0")
        (big,) = wait_for(lambda: watcher.on("answers/big"), 30, "the refusal answer")
        assert "exceeds the 4096-byte cap" in json.loads(big.payload)["error"]
        flood = Properties(PacketTypes.PUBLISH)
        flood.ResponseTopic = "answers/big"  # an attacker's way to make the device amplify
        for _ in range(60):
            sender.publish(f"edge/{DEVICE}/input/face", b"x" * 4097, qos=0, properties=flood)

        def refused() -> float:
            text = serve.get("/metrics")[1].decode()
            return sum(float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith("edge_source_errors_total{"))

        wait_for(lambda: refused() >= 63, 30, "every refusal counted")  # 2 bad payloads + 61 oversized
        answered = len(watcher.on("answers/big")) - 1
        assert answered <= 4 * REFUSAL_ANSWERS_PER_SECOND, answered
        sender.disconnect()
    finally:
        watcher.close()
        serve.kill9()

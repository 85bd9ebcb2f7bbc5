"""Monitoring end to end: a real daemon serving a bundle with a reference, ground truth over the API and a
real mosquitto, a shadow run from the config, and a real Prometheus server answering every dashboard panel."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from cli_helpers import REPO, cli
from daemon_helpers import Serve, free_port, wait_for, write_config
from monitoring_helpers import crops, darkened, pack_with_reference, text_lines, write_images
from mqtt_broker import Broker

Zoo = Callable[[str], Path]
ALERTS = REPO / "tools" / "monitoring"


def _png(img: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", img)
    assert ok
    return data.tobytes()


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: tools/test.sh installs it (apt-get install prometheus)"
    checked = subprocess.run([promtool, "check", "rules", "edge-runtime-alerts.yml"], cwd=ALERTS,
                             capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode == 0 and "SUCCESS: 6 rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", "alerts-test.yml"], cwd=ALERTS, capture_output=True,
                            text=True, timeout=60, check=False)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker") as b:
        yield b


class Prometheus:
    def __init__(self, tmp: Path, target: str) -> None:
        binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        assert Path(binary).exists(), "prometheus is missing: tools/test.sh installs it (apt-get install prometheus)"
        self.port = free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        conf = tmp / "prometheus.yml"
        conf.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n"
                        f"  - job_name: edge\n    static_configs:\n      - targets: ['{target}']\n"
                        f"rule_files:\n  - {ALERTS / 'edge-runtime-alerts.yml'}\n")
        log = open(tmp / "prometheus.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([binary, f"--config.file={conf}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"], stdout=log, stderr=log)
        log.close()
        self.log = tmp / "prometheus.log"

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as reply:
            doc = json.loads(reply.read())
        assert doc["status"] == "success", doc
        return list(doc["data"]["result"])

    def up(self) -> bool:
        try:
            return any(r["value"][1] == "1" for r in self.query("up"))
        except OSError:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def test_daemon_monitors_drift_truth_and_shadow_and_prometheus_answers_every_panel(
        tmp_path: Path, keys: dict[str, Path], zoo: Zoo, broker: Broker) -> None:
    photo = zoo("grace_hopper")
    ref_dir = write_images(crops(photo, 200, seed=51), tmp_path / "reference")
    v1 = pack_with_reference(tmp_path, zoo("ppocr_cls"), keys["a"], ref_dir, baseline="accuracy = 0.9")
    v2 = pack_with_reference(tmp_path, zoo("ppocr_cls"), keys["a"], ref_dir, version=2)
    extra = (f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {broker.port}\nreconnect_min_seconds = 0.05\n'
             "[monitoring]\nwindow = 40\ncheck_every = 10\naccuracy_window = 40\naccuracy_min_samples = 20\n"
             '[monitoring.shadow]\nmodel = "cls"\nversion = 2\nshare = 0.5\n')
    config, state, port = write_config(tmp_path / "device", keys["trust_dir"], extra=extra,
                                       top='device_id = "dev1"\n')
    cli("models", "install", v1, "--config", config)
    cli("models", "install", v2, "--no-activate", "--config", config)
    serve = Serve(config, state, port).start()
    prometheus = None
    try:
        serve.wait_ready(60)
        wait_for(lambda: serve.events("shadow_started"), 30, "the configured shadow run to start")
        ids: list[tuple[str, int]] = []
        for img in crops(photo, 60, seed=52):
            status, body = serve.request("POST", "/v2/models/cls/infer", _png(img), {"Content-Type": "image/png"})
            assert status == 200, body
            reply = json.loads(body)
            ids.append((reply["results"]["result_id"], reply["results"]["top"][0]["index"]))
        assert len({rid for rid, _ in ids}) == 60
        assert not serve.events("drift")
        # Ground truth: the first half over the API, the rest over MQTT; a third of it wrong.
        api_half, mqtt_half = ids[:30], ids[30:]
        truths = [{"result_id": rid, "label": index if n % 3 else 1 - index}
                  for n, (rid, index) in enumerate(api_half)]
        status, body = serve.request("POST", "/v2/models/cls/truth", json.dumps(truths).encode(),
                                     {"Content-Type": "application/json"})
        assert status == 200 and sum(t["matched"] for t in json.loads(body)["truths"]) == 30, body
        status, body = serve.request("POST", "/v2/models/cls/truth", b'{"result_id": 5}',
                                     {"Content-Type": "application/json"})
        assert status == 400 and "result_id" in json.loads(body)["error"]
        client = broker.client("labeller")
        for n, (rid, index) in enumerate(mqtt_half):
            label = index if n % 3 else 1 - index
            client.publish("edge/dev1/truth/cls", json.dumps({"result_id": rid, "label": label}),
                           qos=1).wait_for_publish()
        client.publish("edge/dev1/truth/cls", b"not json", qos=1).wait_for_publish()  # logged, nothing lost

        def metrics() -> str:
            return serve.get("/metrics")[1].decode()

        wait_for(lambda: "edge_truth_matched_total 60" in metrics(), 30, "the MQTT truths to be matched")
        page = metrics()
        assert 'edge_accuracy{model="cls",version="1",metric="accuracy"}' in page
        assert 'edge_accuracy_threshold{model="cls",version="1",metric="accuracy"} 0.85' in page
        wait_for(lambda: serve.events("accuracy"), 10, "the accuracy event (2/3 correct, baseline 0.9)")
        # Darkened inputs: drift within one window.
        for img in crops(photo, 40, seed=53):
            serve.request("POST", "/v2/models/cls/infer", _png(darkened(img, np.random.default_rng())),
                          {"Content-Type": "image/png"})
        drift = wait_for(lambda: serve.events("drift"), 10, "a drift event")[0]
        assert drift["model"] == "cls" and drift["version"] == 1 and drift["window"] == 40
        assert 'edge_drift_active{model="cls",feature="' + drift["feature"] + '"} 1' in metrics()
        wait_for(lambda: 'edge_shadow_agreement{model="cls",candidate="2"} 1.0' in metrics(), 10,
                 "the shadow's agreement (the same model: 1)")

        prometheus = Prometheus(tmp_path / "prom", f"127.0.0.1:{port}")
        wait_for(prometheus.up, 60, "Prometheus to scrape the daemon", 0.5)
        dashboard = json.loads((ALERTS / "grafana-dashboard.json").read_text())
        exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
        assert len(exprs) >= 12

        def answered() -> list[str]:
            return [e for e in exprs if not prometheus.query(e)]  # type: ignore[union-attr]

        try:
            wait_for(lambda: not answered(), 30, "every panel's query to have data", 1.0)
        except AssertionError:
            raise AssertionError(f"dashboard queries without data: {answered()}") from None
    finally:
        if prometheus is not None:
            prometheus.stop()
        assert serve.terminate() == 0
    events = [e["kind"] for e in serve.events()]
    assert "shadow_stopped" in events
    assert "monitoring failed" not in serve.stderr()


def test_fleet_shadow_command_promotes_a_candidate_that_agrees(tmp_path: Path, keys: dict[str, Path], zoo: Zoo,
                                                               broker: Broker) -> None:
    from test_mqtt_daemon import Operator

    photo = zoo("grace_hopper")
    ref_dir = write_images(crops(photo, 60, seed=61), tmp_path / "reference")
    v1 = pack_with_reference(tmp_path, zoo("ppocr_cls"), keys["a"], ref_dir)
    v2 = pack_with_reference(tmp_path, zoo("ppocr_cls"), keys["a"], ref_dir, version=2)
    extra = f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {broker.port}\nreconnect_min_seconds = 0.05\n'
    config, state, port = write_config(tmp_path / "device", keys["trust_dir"], extra=extra,
                                       top='device_id = "dev2"\n')
    cli("models", "install", v1, "--config", config)
    cli("models", "install", v2, "--no-activate", "--config", config)
    serve = Serve(config, state, port).start()
    operator = Operator(broker)
    try:
        serve.wait_ready(60)
        target = "edge/dev2"
        refused = operator.command("shadow", {"model": "cls", "version": 7, "share": 0.5}, target=target)
        assert not refused["ok"] and "v7 is not in the cache" in refused["message"]
        idle = operator.command("shadow", {"model": "cls", "share": 0}, target=target)
        assert idle["ok"] and "no shadow was running" in idle["message"]
        started = operator.command("shadow", {"model": "cls", "version": 2, "share": 1.0, "promote_after": 10,
                                              "min_agreement": 0.9}, target=target)
        assert started["ok"] and started["data"]["shadow"]["candidate"] == 2, started
        for img in crops(photo, 100, seed=62):  # paced: a shadow at the lowest priority drops what it cannot take
            status, body = serve.request("POST", "/v2/models/cls/infer", _png(img), {"Content-Type": "image/png"})
            assert status == 200
            if serve.events("shadow_passed"):
                break
            time.sleep(0.05)
        passed = wait_for(lambda: serve.events("shadow_passed"), 30, "the shadow run to pass")[0]
        assert passed["samples"] == 10 and passed["agreement"] == 1.0
        wait_for(lambda: serve.events("activated"), 60, "the candidate to be activated")
        status, body = serve.request("POST", "/v2/models/cls/infer", _png(crops(photo, 1, seed=63)[0]),
                                     {"Content-Type": "image/png"})
        assert json.loads(body)["model_version"] == "2"
        again = operator.command("shadow", {"model": "cls", "version": 2, "share": 0.5}, target=target)
        assert not again["ok"] and "is the active version" in again["message"]
    finally:
        operator.close()
        assert serve.terminate() == 0


def test_accuracy_below_baseline_rolls_back_when_the_config_allows_it(tmp_path: Path, keys: dict[str, Path],
                                                                      zoo: Zoo) -> None:
    ref_dir = write_images(text_lines(60, seed=71)[0], tmp_path / "reference")
    v1 = pack_with_reference(tmp_path, zoo("ppocr_cls"), keys["a"], ref_dir, baseline="accuracy = 0.95")
    v2 = pack_with_reference(tmp_path, zoo("ppocr_cls"), keys["a"], ref_dir, version=2, baseline="accuracy = 0.95")
    extra = ("[monitoring]\naccuracy_window = 40\naccuracy_min_samples = 20\nrollback_on_accuracy = true\n"
             "[activation]\nprobation_inferences = 0\nprobation_seconds = 0.0\n")
    config, state, port = write_config(tmp_path / "device", keys["trust_dir"], extra=extra)
    cli("models", "install", v1, "--config", config)
    cli("models", "install", v2, "--config", config)
    serve = Serve(config, state, port).start()
    try:
        serve.wait_ready(60)
        images, labels = text_lines(40, seed=72)
        truths = []
        for img, label in zip(images, labels, strict=True):
            status, body = serve.request("POST", "/v2/models/cls/infer", _png(img), {"Content-Type": "image/png"})
            reply = json.loads(body)
            assert status == 200 and reply["model_version"] == "2"
            truths.append({"result_id": reply["results"]["result_id"], "label": label})
        # The real labels first: the model is right on rendered text, no event.
        status, body = serve.request("POST", "/v2/models/cls/truth", json.dumps(truths[:20]).encode())
        assert status == 200 and all(t["correct"] for t in json.loads(body)["truths"]), body
        assert not serve.events("accuracy")
        # Then a labelling that disagrees (the field changed under the model): below 0.95 - 0.05.
        wrong = [{**t, "label": 1 - t["label"]} for t in truths[20:]]
        status, body = serve.request("POST", "/v2/models/cls/truth", json.dumps(wrong).encode())
        assert status == 200
        event = wait_for(lambda: serve.events("accuracy"), 10, "the accuracy event")[0]
        assert event["version"] == 2 and event["rollback"] is True and event["threshold"] == 0.9
        rolled = wait_for(lambda: serve.events("rolled_back"), 30, "the rollback")[0]
        assert rolled["version"] == 1 and rolled["failed_version"] == 2 and "field accuracy" in rolled["reason"]
        wait_for(lambda: json.loads(serve.request("POST", "/v2/models/cls/infer", _png(images[0]),
                                                  {"Content-Type": "image/png"})[1])["model_version"] == "1",
                 10, "v1 to serve")
    finally:
        assert serve.terminate() == 0

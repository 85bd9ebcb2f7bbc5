"""The daemon as a user runs it: real `edge-runtime serve` processes, real HTTP, real models."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from daemon_helpers import (
    Channel,
    Serve,
    bad_probation_model,
    pack_onnx,
    ppocr_input,
    wait_for,
    write_config,
)
from http_fault_server import FaultServer

from edge_runtime.bundle.manifest import Gates

Zoo = Callable[[str], Path]
FAST = """
[activation]
probation_inferences = 10
probation_seconds = 30.0
max_boot_attempts = 2
[ota]
channel_url = "{url}"
allow_http = true
poll_seconds = 0.3
retries = 2
backoff_max_seconds = 0.2
"""


@pytest.fixture()
def ota_server() -> Iterator[FaultServer]:
    with FaultServer({}) as server:
        yield server


@pytest.fixture()
def device(tmp_path: Path, keys: dict[str, Path], zoo: Zoo, ota_server: FaultServer) -> Iterator[tuple[Serve, Channel]]:
    """A serving daemon with ppocr-cls v1 (installed via OTA) and a channel to update it."""
    channel = Channel(ota_server, keys["a"])
    channel.publish({"ppocr-cls": pack_onnx(tmp_path / "v1.bundle", zoo("ppocr_cls"), 1, keys["a"], tmp_path)})
    config, state, port = write_config(tmp_path / "device", keys["trust_dir"], extra=FAST.format(url=channel.url))
    serve = Serve(config, state, port).start()
    try:
        wait_for(lambda: serve.served_version() == 1, 60, "v1 via OTA", 0.2)
        yield serve, channel
    finally:
        if serve.proc and serve.proc.poll() is None:
            serve.kill9()


class Load:
    """Continuous API requests in a thread; every reply is recorded."""

    def __init__(self, serve: Serve, batch: int = 1) -> None:
        self.serve, self.batch = serve, batch
        self.statuses: list[int] = []
        self.versions: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        x = ppocr_input(self.batch)
        while not self.stop.is_set():
            try:
                status, reply = self.serve.infer("ppocr-cls", x)
            except (OSError, ValueError):
                status, reply = -1, {}  # the daemon is going away (SIGTERM tests)
            self.statuses.append(status)
            if status == 200:
                self.versions.append(int(reply["model_version"]))

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def test_serve_folder_api_metrics(tmp_path: Path, keys: dict[str, Path], zoo: Zoo) -> None:
    from cli_helpers import cli
    from prometheus_client.parser import text_string_to_metric_families
    from test_cli import pack_face

    from edge_runtime.runtime.preprocess import decode_image

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    extra = (f'[[pipelines]]\nmodel = "face"\n[pipelines.source]\ntype = "folder"\npath = "{inbox}"\n'
             "poll_seconds = 0.1\n")
    config, state, port = write_config(tmp_path / "device", keys["trust_dir"], extra=extra)
    from cli_helpers import Device

    dev = Device(tmp_path, config, state, keys)
    cli("models", "install", pack_face(dev, zoo, 1), "--config", config)
    serve = Serve(config, state, port).start()
    try:
        serve.wait_ready()
        image = decode_image(zoo("grace_hopper").read_bytes(), 1 << 26, 1 << 26)
        for i in range(3):
            cv2.imwrite(str(inbox / f"img{i}.jpg"), np.roll(image, 10 * i, axis=1))
        results = wait_for(lambda: [json.loads(line) for line in serve.stdout().splitlines()
                                    if line.startswith("{")] if serve.stdout().count("\n") >= 3 else None,
                           30, "3 folder results")
        assert sorted(r["key"] for r in results) == ["img0.jpg", "img1.jpg", "img2.jpg"]
        assert all(r["model"] == "face" and r["version"] == 1 and r["result"]["top"][0]["score"] > 0.8
                   for r in results)
        status, body = serve.request("POST", "/v2/models/face/infer", zoo("grace_hopper").read_bytes(),
                                     {"Content-Type": "image/jpeg"})
        assert status == 200 and json.loads(body)["results"]["top"][0]["score"] > 0.8
        status, text = serve.get("/metrics")
        families = {f.name: f for f in text_string_to_metric_families(text.decode())}
        count = [s.value for s in families["edge_inferences"].samples if s.labels.get("model") == "face"]
        assert status == 200 and count and count[0] >= 4
        assert any(s.labels.get("model") == "face" and s.value == 1 for s in families["edge_model_version"].samples)

        # SIGTERM while 40 files are being processed and the API is busy: exit 0, whole lines only.
        for i in range(3, 43):
            cv2.imwrite(str(inbox / f"img{i}.jpg"), np.roll(image, 3 * i, axis=0))
        stop = threading.Event()

        def api_load() -> None:
            while not stop.is_set():
                try:
                    serve.request("POST", "/v2/models/face/infer", zoo("grace_hopper").read_bytes(),
                                  {"Content-Type": "image/jpeg"})
                except OSError:
                    return

        loader = threading.Thread(target=api_load, daemon=True)
        loader.start()
        wait_for(lambda: serve.stdout().count("\n") >= 8, 30, "processing under load")
        assert serve.terminate() == 0
        stop.set()
        loader.join(10)
        first_run = [json.loads(line) for line in serve.stdout().splitlines()]  # raises on a partial line
        # Restart: the rest is processed, nothing twice (progress survives the stop).
        serve.start()
        wait_for(lambda: serve.stdout().count("\n") >= 43, 60, "all 43 files")
        keys_seen = [json.loads(line)["key"] for line in serve.stdout().splitlines()]
        assert len(first_run) < 43
        assert sorted(keys_seen) == sorted(f"img{i}.jpg" for i in range(43))
        assert serve.terminate() == 0
    finally:
        if serve.proc and serve.proc.poll() is None:
            serve.kill9()


def test_ota_good_update_swaps_with_no_failed_request(device: tuple[Serve, Channel], tmp_path: Path,
                                                     keys: dict[str, Path], zoo: Zoo) -> None:
    serve, channel = device
    with Load(serve) as load:
        wait_for(lambda: len(load.statuses) > 5, 10, "load to start")
        channel.publish({"ppocr-cls": pack_onnx(tmp_path / "v2.bundle", zoo("ppocr_cls"), 2, keys["a"], tmp_path)})
        wait_for(lambda: load.versions and load.versions[-1] == 2, 60, "v2 to serve")
        wait_for(lambda: [e for e in serve.events("committed") if e["version"] == 2], 60, "v2 probation to commit")
    assert load.statuses and set(load.statuses) == {200}, f"failed requests during the swap: {set(load.statuses)}"
    assert 1 in load.versions and 2 in load.versions
    assert load.versions == sorted(load.versions)  # never back to v1 once v2 served


@pytest.mark.parametrize("defect", ["golden", "latency", "probation errors"])
def test_ota_bad_update_keeps_previous(device: tuple[Serve, Channel], tmp_path: Path, keys: dict[str, Path],
                                       zoo: Zoo, defect: str) -> None:
    serve, channel = device
    bundle = tmp_path / "v2.bundle"
    if defect == "golden":
        wrong = tmp_path / "wrong.npy"
        np.save(wrong, np.full((1, 2), 7.0, np.float32))
        pack_onnx(bundle, zoo("ppocr_cls"), 2, keys["a"], tmp_path, golden_expected=wrong)
        kind, why = "gate_failed", "golden"
    elif defect == "latency":
        pack_onnx(bundle, zoo("ppocr_cls"), 2, keys["a"], tmp_path, gates=Gates(latency_ms_p95=0.0001))
        kind, why = "gate_failed", "latency"
    else:
        model = bad_probation_model(tmp_path / "breaker.onnx")
        from edge_runtime.bundle.manifest import TensorSpec

        io = ((TensorSpec("x", (None, 3, None, None), "float32", "NCHW"),), (TensorSpec("y", (1, 2), "float32"),))
        pack_onnx(bundle, model, 2, keys["a"], tmp_path, io=io)
        kind, why = "rolled_back", "error rate"
    with Load(serve, batch=2) as load:
        channel.publish({"ppocr-cls": bundle})
        event = wait_for(lambda: serve.events(kind), 60, f"{kind} event")[-1]
        wait_for(lambda: load.versions and load.versions[-1] == 1, 30, "v1 serving again")
    assert why in event["reason"], event
    assert event["version"] in (1, 2)
    assert serve.served_version() == 1
    listed = json.loads(_models_list(serve))
    assert listed[0]["active"] == 1


def _models_list(serve: Serve) -> str:
    from cli_helpers import cli

    return cli("models", "list", "--json", "--config", serve.config).stdout


def test_crash_loop_during_probation_reverts(device: tuple[Serve, Channel], tmp_path: Path, keys: dict[str, Path],
                                             zoo: Zoo) -> None:
    serve, channel = device
    channel.publish({"ppocr-cls": pack_onnx(tmp_path / "v2.bundle", zoo("ppocr_cls"), 2, keys["a"], tmp_path)})
    wait_for(lambda: serve.events("probation_started") and serve.served_version() == 2, 60, "v2 on probation")
    # The process "crashes" (kill -9) during probation, again at every restart.
    for _ in range(3):
        serve.kill9()
        serve.start()
        wait_for(lambda: serve.served_version() is not None, 60, "restart serving")
    wait_for(lambda: serve.served_version() == 1, 30, "revert to v1")
    event = serve.events("rolled_back")[-1]
    assert "crash loop" in event["reason"] and event["failed_version"] == 2


def test_kill9_during_ota_install_always_leaves_one_complete_version(
        tmp_path: Path, keys: dict[str, Path], zoo: Zoo, ota_server: FaultServer) -> None:
    from edge_runtime.cache.versions import ModelCache

    cycles = 50
    model = zoo("ppocr_cls")
    bundles = [pack_onnx(tmp_path / f"v{v}.bundle", model, v, keys["a"], tmp_path) for v in range(1, cycles + 2)]
    channel = Channel(ota_server, keys["a"])
    channel.publish({"ppocr-cls": bundles[0]})
    config, state, port = write_config(tmp_path / "device", keys["trust_dir"], extra=FAST.format(url=channel.url))
    serve = Serve(config, state, port).start()
    rng = np.random.default_rng(1234)
    try:
        wait_for(lambda: serve.served_version() == 1, 60, "v1")
        for cycle in range(1, cycles + 1):
            channel.publish({"ppocr-cls": bundles[cycle]})
            threading.Event().wait(float(rng.uniform(0.0, 0.9)))
            serve.kill9()
            serve.start()
            version = wait_for(lambda: serve.served_version(), 60, f"serving after kill -9 #{cycle}")
            cache = ModelCache(state)
            active = cache.active_version("ppocr-cls")
            assert active == version, (cycle, active, version)
            cache.verify_version("ppocr-cls", active)
    finally:
        if serve.proc and serve.proc.poll() is None:
            serve.kill9()


def test_a_configured_model_with_no_version_is_named_and_the_rest_serves(tmp_path: Path, keys: dict[str, Path],
                                                                          zoo: Zoo) -> None:
    from cli_helpers import cli

    pipeline = f'[[pipelines]]\nmodel = "face"\n[pipelines.source]\ntype = "folder"\npath = "{tmp_path / "inbox"}"\n'
    config, state, port = write_config(tmp_path / "device", keys["trust_dir"], extra=pipeline)
    cli("models", "install", pack_onnx(tmp_path / "v1.bundle", zoo("ppocr_cls"), 1, keys["a"], tmp_path),
        "--config", config)
    serve = Serve(config, state, port).start()
    try:
        started = wait_for(lambda: serve.events("started"), 30, "the started event")[-1]
        assert started["reason"] == "serving ppocr-cls v1; waiting for face"
        assert "model 'face' has no usable installed version" in serve.stderr()
        assert serve.served_version() == 1
        status, body = serve.get("/v2/models/face/ready")
        assert status != 200, body
        assert serve.terminate() == 0
    finally:
        if serve.proc and serve.proc.poll() is None:
            serve.kill9()


def test_systemd_unit_security_rating() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    import subprocess

    unit = Path(__file__).resolve().parent.parent / "systemd" / "edge-runtime.service"
    out = subprocess.run([analyze, "security", "--offline=true", str(unit)], capture_output=True, text=True,
                         check=False)
    line = [x for x in out.stdout.splitlines() if "Overall exposure level" in x]
    assert line, out.stdout + out.stderr
    score = float(line[0].split(":")[1].split()[0])
    assert score <= 2.0, line[0]
    text = unit.read_text()
    for directive in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StateDirectory=",
                      "ConfigurationDirectory=", "LoadCredential="):
        assert directive in text


def test_demo_runs_and_stops_cleanly(tmp_path: Path) -> None:
    from cli_helpers import cli

    pictures = tmp_path / "pictures"
    out = cli("demo", "--dir", tmp_path / "demo", "--listen", "127.0.0.1:0", "--exit-after", "3",
              "--pictures", pictures, timeout=300)
    assert f"every result is drawn into {pictures}" in out.stdout
    lines = [line for line in out.stdout.splitlines() if "best score" in line]
    assert len(lines) == 3
    scores = {line.split()[0]: float(line.split("best score")[1].split()[0]) for line in lines}
    assert scores["grace_hopper.jpg"] > 0.8
    assert "faces 1," in next(line for line in lines if line.startswith("grace_hopper.jpg "))
    drawn = cv2.imread(str(pictures / "grace_hopper.jpg"))
    assert drawn is not None and drawn.shape == (600, 512, 3)
    assert f"picture: {pictures / 'grace_hopper.jpg'}" in out.stdout


def test_sd_notify_ready_after_first_inference_watchdog_and_stopping(tmp_path: Path, keys: dict[str, Path],
                                                                     zoo: Zoo) -> None:
    import os
    import socket as sock_mod

    from cli_helpers import cli

    config, state, port = write_config(tmp_path / "device", keys["trust_dir"])
    cli("models", "install", pack_onnx(tmp_path / "v1.bundle", zoo("ppocr_cls"), 1, keys["a"], tmp_path),
        "--config", config)
    notify = tmp_path / "notify.sock"
    listener = sock_mod.socket(sock_mod.AF_UNIX, sock_mod.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(0.2)
    messages: list[str] = []
    env = {"NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "600000"}
    serve = Serve(config, state, port)
    old = dict(os.environ)
    os.environ.update(env)
    try:
        serve.start()
    finally:
        os.environ.clear()
        os.environ.update(old)

    def receive_until(pred: Callable[[], bool], timeout: float) -> None:
        def step() -> bool:
            with contextlib.suppress(TimeoutError):
                messages.append(listener.recv(4096).decode())
            return pred()

        wait_for(step, timeout, "sd_notify messages", 0.0)

    try:
        receive_until(lambda: any("READY=1" in m for m in messages), 30)
        ready_at = next(i for i, m in enumerate(messages) if "READY=1" in m)
        assert "STATUS=serving ppocr-cls v1" in messages[ready_at]
        receive_until(lambda: sum("WATCHDOG=1" in m for m in messages[ready_at:]) >= 3, 10)
        assert serve.terminate() == 0
        receive_until(lambda: any("STOPPING=1" in m for m in messages), 10)
    finally:
        listener.close()
        if serve.proc and serve.proc.poll() is None:
            serve.kill9()

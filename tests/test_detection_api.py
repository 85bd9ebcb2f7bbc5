"""Detectors and segmenters over the HTTP API: JSON boxes from a raw image, the mask on request,
and /metrics counting detections per frame and their scores (checked by promtool)."""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from cli_helpers import cli
from prometheus_client.parser import text_string_to_metric_families
from test_detection_oracles import readme_spec

from edge_runtime.api.server import ApiServer
from edge_runtime.bundle.signing import generate_keypair
from edge_runtime.config.model import ApiConfig, Config
from edge_runtime.runtime.service import InferenceService
from edge_runtime.telemetry.metrics import Metrics
from edge_runtime.update.store import ModelStore

Zoo = Callable[[str], Path]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, zoo: Zoo) -> Iterator[ApiServer]:
    root = tmp_path_factory.mktemp("det-api")
    generate_keypair(root / "pub.key")
    (root / "trust").mkdir()
    (root / "trust" / "pub.pub").write_bytes((root / "pub.key.pub").read_bytes())
    store = ModelStore(Config(state_dir=root / "state", trust_dir=root / "trust"))
    service = InferenceService(Metrics())
    loaded = []
    for name, key, heading in (("face", "face_detection", "### Face detector"),
                               ("text", "ppocr_det", "### Text segmentation")):
        (root / f"{name}.toml").write_text(readme_spec(heading))
        cli("bundle", "pack", "--model", zoo(key), "--name", name, "--version", 1, "--key", root / "pub.key",
            "--spec", root / f"{name}.toml", "-o", root / f"{name}.bundle")
        store.install(root / f"{name}.bundle")
        loaded.append(store.load(name))
        service.add_slot(name).swap(loaded[-1])
    srv = ApiServer(ApiConfig(listen="127.0.0.1:0"), service, service.metrics)
    srv.start()
    yield srv
    srv.stop()
    for model in loaded:
        model.close()


def post(server: ApiServer, path: str, body: bytes, content_type: str = "image/jpeg") -> tuple[int, dict]:
    host, port = server.address[:2]  # type: ignore[misc]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("POST", path, body, {"Content-Type": content_type})
    reply = conn.getresponse()
    doc = json.loads(reply.read())
    conn.close()
    return reply.status, doc


def get_text(server: ApiServer, path: str) -> str:
    host, port = server.address[:2]  # type: ignore[misc]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", path)
    text = conn.getresponse().read().decode()
    conn.close()
    return text


def test_raw_image_gives_boxes_in_its_pixels(server: ApiServer, zoo: Zoo) -> None:
    status, doc = post(server, "/v2/models/face/infer", zoo("grace_hopper").read_bytes())
    assert status == 200
    (face,) = doc["results"]["detections"]
    assert face["score"] > 0.8 and doc["results"]["image_size"] == [512, 600]
    assert len(face["keypoints"]) == 6


def test_mask_comes_back_only_when_asked(server: ApiServer, tmp_path: Path) -> None:
    page = np.full((500, 900, 3), 255, np.uint8)
    cv2.putText(page, "hello edge", (30, 260), cv2.FONT_HERSHEY_SIMPLEX, 3.0, (0, 0, 0), 8)
    png = cv2.imencode(".png", page)[1].tobytes()
    status, plain = post(server, "/v2/models/text/infer", png, "image/png")
    assert status == 200 and "mask_png" not in plain["results"]["segmentation"]
    status, doc = post(server, "/v2/models/text/infer?mask=png", png, "image/png")
    body = doc["results"]["segmentation"]
    mask = cv2.imdecode(np.frombuffer(base64.b64decode(body["mask_png"]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert status == 200 and mask.shape == (500, 900) and body["size"] == [900, 500]
    assert body["classes"] == plain["results"]["segmentation"]["classes"]
    assert int((mask > 0).sum()) == next(c["pixels"] for c in body["classes"] if c["class"] == 1)
    for query, why in (("mask=jpeg", "the only mask format is png"), ("colour=1", "unknown query parameter")):
        status, err = post(server, f"/v2/models/text/infer?{query}", png, "image/png")
        assert status == 400 and why in err["error"] and "\n" not in err["error"]


def test_metrics_count_detections_per_frame_and_scores(server: ApiServer, zoo: Zoo) -> None:
    before = _families(get_text(server, "/metrics"))
    blank = cv2.imencode(".png", np.full((300, 300, 3), 200, np.uint8))[1].tobytes()
    post(server, "/v2/models/face/infer", zoo("grace_hopper").read_bytes())
    post(server, "/v2/models/face/infer", blank, "image/png")
    text = get_text(server, "/metrics")
    after = _families(text)
    def grew(name: str) -> float:
        return after[(name, "face")] - before.get((name, "face"), 0)

    frames, faces = grew("edge_detections_per_frame_count"), grew("edge_detections_per_frame_sum")
    assert (frames, faces) == (2, 1)
    high = after[("edge_detection_score_count", "face")] - after[("edge_detection_score_bucket:0.8", "face")]
    assert high >= 1  # grace_hopper's face scores above 0.8
    assert ("edge_detections_per_frame_count", "text") not in after  # a segmenter finds no boxes
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: tools/test.sh installs it (apt-get install prometheus)"
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60,
                             check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _families(text: str) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name + (f":{sample.labels['le']}" if "le" in sample.labels else "")
            out[(name, sample.labels.get("model", ""))] = sample.value
    return out


def test_tensor_requests_get_decoded_results_only_when_asked(server: ApiServer, zoo: Zoo) -> None:
    from cli_helpers import face_tensor

    meta = json.loads(get_text(server, "/v2/models/face"))
    x = face_tensor(zoo("grace_hopper"))
    request = {"inputs": [{"name": meta["inputs"][0]["name"], "shape": list(x.shape), "datatype": "FP32",
                           "data": x.ravel().tolist()}]}
    status, raw = post(server, "/v2/models/face/infer", json.dumps(request).encode(), "application/json")
    assert status == 200 and "results" not in raw and {o["name"] for o in raw["outputs"]} == {
        "regressors", "classificators"}
    status, asked = post(server, "/v2/models/face/infer",
                         json.dumps({**request, "parameters": {"postprocess": True}}).encode(), "application/json")
    assert status == 200 and asked["outputs"] == raw["outputs"]
    ((face,),) = [r["detections"] for r in asked["results"]]
    assert face["score"] > 0.8 and asked["results"][0]["image_size"] == [128, 128]  # the input's pixels
    assert all(0 <= v <= 128 for v in face["box"])
    status, err = post(server, "/v2/models/face/infer",
                       json.dumps({**request, "parameters": {"postprocess": "yes"}}).encode(), "application/json")
    assert status == 400 and "postprocess" in err["error"]

"""Shadow runs on real models: an int8 copy made with `quantize` agrees, a different model does not,
and the active model's replies never wait for the candidate."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cli_helpers import PPOCR_SPEC, cli
from daemon_helpers import wait_for
from monitoring_helpers import crops, load_bundle, text_lines, write_images
from onnx import numpy_helper

from edge_runtime.config.monitoring import MonitoringConfig
from edge_runtime.monitoring.monitor import Monitor
from edge_runtime.monitoring.shadow import ShadowPlan
from edge_runtime.runtime.loaded_model import LoadedModel
from edge_runtime.runtime.service import InferenceService
from edge_runtime.telemetry.events import EventBus
from edge_runtime.telemetry.metrics import Metrics

Zoo = Callable[[str], Path]


def retrained(model: Path, out: Path) -> Path:
    """Another classifier of the same shape: the final layer's weights drawn anew (a different model)."""
    graph = onnx.load(str(model))
    for node in graph.graph.node:
        if node.op_type == "Constant" and "fc_0.w_0" in node.output:
            weights = numpy_helper.to_array(node.attribute[0].t)
            fresh = np.random.default_rng(0).normal(0, weights.std() * 3, weights.shape).astype(weights.dtype)
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(fresh, node.attribute[0].t.name))
    onnx.save(graph, str(out))
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, zoo: Zoo) -> dict[int, Path]:
    """v1 the fp32 ppocr classifier, v2 its int8 copy from `edge-runtime quantize`, v3 a different model."""
    from edge_runtime.bundle.signing import generate_keypair

    tmp = tmp_path_factory.mktemp("shadow")
    generate_keypair(tmp / "key")
    spec = tmp / "spec.toml"
    spec.write_text(PPOCR_SPEC)
    calibration = write_images(text_lines(32, seed=40)[0], tmp / "calibration")
    int8 = tmp / "int8.onnx"
    cli("quantize", "--model", zoo("ppocr_cls"), "--calibrate", calibration, "--spec", spec, "-o", int8)
    files = {1: zoo("ppocr_cls"), 2: int8, 3: retrained(zoo("ppocr_cls"), tmp / "other.onnx")}
    out = {}
    for version, model in files.items():
        out[version] = tmp / f"v{version}.bundle"
        cli("bundle", "pack", "--model", model, "--name", "cls", "--version", str(version), "--key", tmp / "key",
            "--spec", spec, "-o", out[version])
    out[0] = tmp / "key"
    return out


def _serve(bundles: dict[int, Path], tmp: Path) -> tuple[InferenceService, Monitor, EventBus, list[dict[str, Any]]]:
    events = EventBus()
    seen: list[dict[str, Any]] = []
    events.subscribe(seen.append)
    loads = iter(range(1000))

    def loader(name: str, version: int) -> LoadedModel:
        return load_bundle(bundles[version], bundles[0], tmp / f"load-{next(loads)}")

    promoted: list[tuple[str, int]] = []
    monitor = Monitor(MonitoringConfig(), events, loader=loader, promote=lambda n, v: promoted.append((n, v)))
    service = InferenceService(Metrics())
    service.monitor(monitor.observe)
    service.add_slot("cls").swap(loader("cls", 1))
    monitor.promoted = promoted  # type: ignore[attr-defined]
    return service, monitor, events, seen


# On rendered text lines the classifier is sure (mean top score 0.98) and the int8 copy agrees on
# 0.99-1.0 of them; a model with other weights agrees on about half (as often as chance, 2 classes).
@pytest.mark.parametrize(("version", "low", "high"), [(2, 0.97, 1.0), (3, 0.0, 0.7)])
def test_shadow_agreement_of_an_int8_copy_and_of_a_different_model(bundles: dict[int, Path], tmp_path: Path,
                                                                   zoo: Zoo, version: int, low: float,
                                                                   high: float) -> None:
    service, monitor, _, seen = _serve(bundles, tmp_path)
    images = text_lines(200, seed=41)[0]
    monitor.start_shadow(ShadowPlan("cls", version, share=0.5, queue=64, promote_after=100, min_agreement=0.95))
    for img in images:
        served, prediction = service.predict_image("cls", img)
        assert served == 1 and prediction.results[0]["result_id"]
        time.sleep(0.002)  # a camera's pace: the shadow keeps up, nothing is dropped
    ended = wait_for(lambda: [e for e in seen if e["kind"] in ("shadow_passed", "shadow_failed")], 30,
                     "the shadow run to end")[0]
    assert ended["samples"] == 100 and ended["dropped"] == 0 and ended["errors"] == 0
    assert low <= ended["agreement"] <= high, ended
    assert ended["active_p95_ms"] > 0 and ended["shadow_p95_ms"] > 0
    assert (ended["distance"] < 0.05) if version == 2 else (ended["distance"] > 0.3), ended
    passed = version == 2
    assert ended["kind"] == ("shadow_passed" if passed else "shadow_failed")
    assert monitor.promoted == ([("cls", version)] if passed else [])  # type: ignore[attr-defined]
    lines = "\n".join(monitor.prometheus_lines(lambda s: s))
    assert f'edge_shadow_samples_total{{model="cls",candidate="{version}"}} 100' in lines
    service.slots["cls"].close()


def test_a_slow_shadow_drops_inputs_and_never_delays_the_active_reply(bundles: dict[int, Path], tmp_path: Path,
                                                                       zoo: Zoo) -> None:
    service, monitor, _, seen = _serve(bundles, tmp_path)
    monitor.start_shadow(ShadowPlan("cls", 2, share=1.0, queue=2))
    run = monitor._shadows["cls"]
    gate = threading.Event()
    real = run.candidate.predict_image

    def stuck(image: Any, **kw: Any) -> Any:  # the fault: a candidate that hangs
        gate.wait(30)
        return real(image, **kw)

    run.candidate.predict_image = stuck  # type: ignore[method-assign]
    images = crops(zoo("grace_hopper"), 50, seed=42)
    t0 = time.perf_counter()
    for img in images:
        service.predict_image("cls", img)
    elapsed = time.perf_counter() - t0
    figures = monitor.snapshot()["shadow"]["cls"]
    assert figures["offered"] == 50 and figures["dropped"] >= 47  # one in the worker, two queued
    assert elapsed < 10, "the active model waited for the shadow"
    gate.set()
    stopped = monitor.stop_shadow("cls", "test over")
    assert stopped is not None and stopped["outcome"] == "stopped"
    assert [e["kind"] for e in seen].count("shadow_stopped") == 1
    service.slots["cls"].close()


def test_shadow_of_the_active_version_is_refused(bundles: dict[int, Path], tmp_path: Path, zoo: Zoo) -> None:
    from edge_runtime.errors import InputError

    service, monitor, _, _ = _serve(bundles, tmp_path)
    service.predict_image("cls", crops(zoo("grace_hopper"), 1, seed=43)[0])
    with pytest.raises(InputError, match="is the active version"):
        monitor.start_shadow(ShadowPlan("cls", 1, share=0.1))
    service.slots["cls"].close()

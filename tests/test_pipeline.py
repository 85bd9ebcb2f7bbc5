"""Pipelines end to end: real bundles installed through the CLI, real LiteRT, real files and video."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from cli_helpers import Device, face_tensor, make_device
from daemon_helpers import wait_for
from test_cli import pack_face

from edge_runtime.bundle.signing import generate_keypair
from edge_runtime.config.model import Limits, PipelineConfig, SourceConfig, load_config
from edge_runtime.errors import InferenceError
from edge_runtime.pipelines.pipeline import Pipeline
from edge_runtime.pipelines.sources.base import Item, Source, SourceContext
from edge_runtime.pipelines.sources.factory import build_source
from edge_runtime.pipelines.sources.folder import state_db_path
from edge_runtime.runtime.backends.base import Backend
from edge_runtime.runtime.decode_budget import shared_budget
from edge_runtime.runtime.loaded_model import LoadedModel
from edge_runtime.runtime.service import InferenceService
from edge_runtime.telemetry.events import EventBus
from edge_runtime.telemetry.metrics import Metrics
from edge_runtime.update.store import ModelStore


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory, zoo: Callable[[str], Path]) -> Device:
    """A device with face v1 packed, signed and installed through the CLI (once per module)."""
    root = tmp_path_factory.mktemp("pipeline-device")
    trust = root / "trust"
    trust.mkdir()
    generate_keypair(root / "a")
    (trust / "a.pub").write_bytes((root / "a.pub").read_bytes())
    dev = make_device(root / "dev", {"trust_dir": trust, "a": root / "a"})
    dev.cli("models", "install", pack_face(dev, zoo, 1))
    return dev


@pytest.fixture()
def face(device: Device) -> Iterator[LoadedModel]:
    model = ModelStore(load_config(device.config)).load("face")
    yield model
    model.close()


@pytest.fixture()
def hopper(zoo: Callable[[str], Path]) -> np.ndarray:
    image = cv2.imread(str(zoo("grace_hopper")))
    assert image is not None
    return image


class DepthMetrics(Metrics):
    """Real metrics that also remember the largest queue depth ever reported."""

    def __init__(self) -> None:
        super().__init__()
        self.max_depth = 0

    def queue_depth(self, pipeline: str, depth: int) -> None:
        self.max_depth = max(self.max_depth, depth)
        super().queue_depth(pipeline, depth)


class Rig:
    """Metrics, events, a service serving face v1, and a pipeline factory writing under ``tmp_path``."""

    def __init__(self, tmp_path: Path, face: LoadedModel | None) -> None:
        self.tmp_path = tmp_path
        self.state = tmp_path / "state"
        self.metrics = DepthMetrics()
        self.service = InferenceService(self.metrics)
        slot = self.service.add_slot("face")
        if face is not None:
            slot.swap(face)
        self.events: list[dict[str, Any]] = []
        self.bus = EventBus(tmp_path / "events.jsonl")
        self.bus.subscribe(self.events.append)
        self.results: list[dict[str, Any]] = []

    def pipeline(self, source: SourceConfig, *, limits: Limits | None = None, results: str = "log") -> Pipeline:
        config = PipelineConfig(model="face", name="cam", results=results, source=source)
        src = build_source(source, state_dir=self.state, pipeline_name=config.label, limits=limits or Limits(),
                           metrics=self.metrics, events=self.bus, stop_event=threading.Event())
        return Pipeline(config, src, self.service, self.metrics, self.bus, self.results.append)

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind]

    def counter(self, name: str) -> int:
        value: int = self.metrics.snapshot()[name].get("cam", 0)
        return value


def stop_and_check(pipeline: Pipeline, timeout: float = 3.0) -> None:
    t0 = time.monotonic()
    assert pipeline.stop(timeout)
    assert time.monotonic() - t0 < timeout
    assert not pipeline.alive
    assert not [t for t in threading.enumerate() if t.name in ("source-cam", "infer-cam")]


def folder(inbox: Path) -> SourceConfig:
    return SourceConfig(type="folder", path=inbox, poll_seconds=0.02, queue=2)


def score(record: dict[str, Any]) -> float:
    value: float = record["result"]["top"][0]["score"]
    return value


# ---------------------------------------------------------------------------------------------- folder


def test_folder_pipeline_processes_every_file_once_in_order_and_resumes_after_restart(
        tmp_path: Path, face: LoadedModel, device: Device, hopper: np.ndarray, zoo: Callable[[str], Path],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    base = time.time() - 60
    variants = [np.roll(hopper, 12 * i, axis=1) for i in range(4)] + [cv2.flip(hopper, 1)]
    names = ["5.jpg", "4.png", "3.jpeg", "2.jpg", "1.png", "0.npy"]
    for i, (name, image) in enumerate(zip(names, variants, strict=False)):
        assert cv2.imwrite(str(inbox / name), image)
        os.utime(inbox / name, (base + i, base + i))
    np.save(inbox / "0.npy", face_tensor(zoo("grace_hopper"))[0])
    os.utime(inbox / "0.npy", (base + 5, base + 5))
    (inbox / "passwd.jpg").symlink_to("/etc/passwd")

    rig = Rig(tmp_path, face)
    pipeline = rig.pipeline(folder(inbox))
    pipeline.start()
    assert pipeline.alive
    wait_for(lambda: len(rig.results) >= 6, what="six results")
    stop_and_check(pipeline)
    assert [r["key"] for r in rig.results] == names
    for record in rig.results:
        assert (record["pipeline"], record["model"], record["version"]) == ("cam", "face", 1)
        assert score(record) > 0.8, record
        assert record["latency_ms"]["total"] > 0 and abs(record["ts"] - time.time()) < 60
    # The record goes to on_result only (the daemon prints it once on stdout): never a second copy in the log.
    assert not [r for r in caplog.records if '"latency_ms"' in r.getMessage()]
    assert rig.counter("source_errors") == 0 and rig.metrics.max_depth <= 2
    assert rig.metrics.model_summary("face")["inferences"] == 6

    # Restart with new objects and the same state dir: nothing old runs again, a new file does.
    again = Rig(tmp_path, ModelStore(load_config(device.config)).load("face"))
    pipeline = again.pipeline(folder(inbox))
    pipeline.start()
    assert cv2.imwrite(str(inbox / "6.jpg"), np.roll(hopper, 30, axis=0))
    wait_for(lambda: len(again.results) >= 1, what="the new file")
    assert cv2.imwrite(str(inbox / "7.jpg"), np.roll(hopper, 40, axis=0))
    wait_for(lambda: len(again.results) >= 2, what="another new file")
    stop_and_check(pipeline)
    again.service.slots["face"].close()
    assert [r["key"] for r in again.results] == ["6.jpg", "7.jpg"]


def test_corrupt_and_oversized_files_are_reported_and_skipped(tmp_path: Path, face: LoadedModel,
                                                              hopper: np.ndarray) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    base = time.time() - 60
    (inbox / "a-corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(100))
    noise = np.random.default_rng(1).integers(0, 255, (300, 300, 3), np.uint8)
    assert cv2.imwrite(str(inbox / "b-huge.png"), noise)
    assert cv2.imwrite(str(inbox / "c-good.jpg"), hopper)
    for i, name in enumerate(("a-corrupt.jpg", "b-huge.png", "c-good.jpg")):
        os.utime(inbox / name, (base + i, base + i))
    assert (inbox / "b-huge.png").stat().st_size > 150_000 > (inbox / "c-good.jpg").stat().st_size

    rig = Rig(tmp_path, face)
    pipeline = rig.pipeline(folder(inbox), limits=Limits(max_image_bytes=150_000))
    pipeline.start()
    wait_for(lambda: len(rig.results) >= 1, what="the good file")
    assert pipeline.alive
    stop_and_check(pipeline)
    assert [r["key"] for r in rig.results] == ["c-good.jpg"] and score(rig.results[0]) > 0.8
    assert rig.counter("source_errors") == 2
    reasons = {e["key"]: e["reason"] for e in rig.kinds("source_error")}
    assert set(reasons) == {"a-corrupt.jpg", "b-huge.png"}
    assert "corrupt JPEG" in reasons["a-corrupt.jpg"] and "150000-byte cap" in reasons["b-huge.png"]
    with sqlite3.connect(state_db_path(rig.state, "cam")) as conn:
        recorded = dict(conn.execute("SELECT name, error FROM processed").fetchall())
    assert recorded["c-good.jpg"] is None and recorded["a-corrupt.jpg"] and recorded["b-huge.png"]


def test_lossless_pipeline_waits_for_its_model_then_processes(tmp_path: Path, face: LoadedModel,
                                                               hopper: np.ndarray) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    assert cv2.imwrite(str(inbox / "early.jpg"), hopper)
    rig = Rig(tmp_path, None)  # the slot exists, nothing is loaded yet
    pipeline = rig.pipeline(folder(inbox))
    pipeline.start()
    wait_for(lambda: bool(rig.kinds("model_unavailable")), what="the model_unavailable event")
    assert not rig.results and pipeline.alive
    rig.service.slots["face"].swap(face)
    wait_for(lambda: len(rig.results) == 1, what="the held file once the model is loaded")
    stop_and_check(pipeline)
    assert rig.results[0]["key"] == "early.jpg" and score(rig.results[0]) > 0.8
    assert len(rig.kinds("model_unavailable")) == 1 and len(rig.kinds("model_available")) == 1


def test_lossless_pipeline_waits_for_a_full_decode_budget_then_processes(tmp_path: Path, face: LoadedModel,
                                                                        hopper: np.ndarray) -> None:
    # API traffic can hold the process-wide decode budget; a folder file must wait for it, not fail.
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    assert cv2.imwrite(str(inbox / "early.jpg"), hopper)
    rig = Rig(tmp_path, face)
    budget = shared_budget(face.limits.max_decode_bytes)
    wait, budget.wait_seconds = budget.wait_seconds, 0.1
    try:
        with budget.reserve(budget.capacity, "the test's hold"):
            pipeline = rig.pipeline(folder(inbox))
            pipeline.start()
            time.sleep(1.0)  # several 0.1 s waits time out meanwhile
            assert not rig.results and pipeline.alive
        wait_for(lambda: len(rig.results) == 1, what="the held file once the budget is free")
    finally:
        budget.wait_seconds = wait
    stop_and_check(pipeline)
    assert rig.results[0]["key"] == "early.jpg" and score(rig.results[0]) > 0.8


class FlakyBackend(Backend):
    """The real backend, whose first ``failures`` calls fail like a crashing runtime."""

    def __init__(self, real: Backend, failures: int) -> None:
        self.real, self.failures = real, failures
        self.format, self.inputs, self.outputs = real.format, real.inputs, real.outputs

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.failures > 0:
            self.failures -= 1
            raise InferenceError("runtime failed: simulated")
        return self.real.infer(feeds)

    def close(self) -> None:
        self.real.close()


def test_inference_errors_are_counted_reported_once_and_do_not_kill_the_worker(
        tmp_path: Path, face: LoadedModel, hopper: np.ndarray) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    base = time.time() - 60
    for i in range(5):
        assert cv2.imwrite(str(inbox / f"{i}.jpg"), np.roll(hopper, 8 * i, axis=1))
        os.utime(inbox / f"{i}.jpg", (base + i, base + i))
    face.backend = FlakyBackend(face.backend, failures=3)
    rig = Rig(tmp_path, face)
    pipeline = rig.pipeline(folder(inbox))
    pipeline.start()
    wait_for(lambda: len(rig.results) >= 2, what="results after the failures")
    assert pipeline.alive
    stop_and_check(pipeline)
    assert [r["key"] for r in rig.results] == ["3.jpg", "4.jpg"]
    assert rig.metrics.model_summary("face")["errors"] == 3
    (error,) = rig.kinds("inference_error")
    assert error["key"] == "0.jpg" and "simulated" in error["reason"]
    (recovered,) = rig.kinds("inference_recovered")
    assert recovered["failures"] == 3


def test_an_idle_pipeline_uses_almost_no_cpu(tmp_path: Path, face: LoadedModel) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rig = Rig(tmp_path, face)
    pipeline = rig.pipeline(SourceConfig(type="folder", path=inbox, poll_seconds=0.05))
    pipeline.start()
    cpu0, t0 = time.process_time(), time.monotonic()
    time.sleep(0.5)  # measuring idleness needs a span of time with nothing to wait for
    cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
    stop_and_check(pipeline)
    assert cpu < 0.2 * wall, f"{cpu:.3f} s CPU in {wall:.3f} s idle: a busy loop?"


class BrokenSource(Source):
    """Yields one item, then raises: a bug in a source."""

    def items(self) -> Iterator[Item]:
        yield "one", np.zeros((8, 8, 3), np.uint8)
        raise RuntimeError("source bug")


def test_a_crashing_source_makes_the_pipeline_not_alive(tmp_path: Path, face: LoadedModel) -> None:
    rig = Rig(tmp_path, face)
    config = PipelineConfig(model="face", name="cam")
    source = BrokenSource(SourceContext("cam", rig.metrics, rig.bus, threading.Event()), "broken")
    pipeline = Pipeline(config, source, rig.service, rig.metrics, rig.bus, rig.results.append)
    pipeline.start()
    wait_for(lambda: not pipeline.alive, what="the pipeline to report not alive")
    (failed,) = rig.kinds("pipeline_failed")
    assert "source bug" in failed["reason"]
    stop_and_check(pipeline)


# ---------------------------------------------------------------------------------------------- capture


@pytest.fixture()
def video(tmp_path: Path, hopper: np.ndarray) -> Path:
    """20 MJPG frames of Grace Hopper, shifted a little each frame."""
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (512, 600))
    assert writer.isOpened()
    for i in range(20):
        writer.write(np.roll(hopper, 6 * i, axis=1))
    writer.release()
    return path


def test_video_pipeline_accounts_for_every_frame_and_finishes_cleanly(
        tmp_path: Path, face: LoadedModel, video: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_runtime.results")
    rig = Rig(tmp_path, face)
    pipeline = rig.pipeline(SourceConfig(type="video", path=video, queue=1), results="none")
    pipeline.start()
    wait_for(lambda: pipeline.finished, what="the video to be consumed")
    assert pipeline.alive  # a video that ended is not a dead pipeline
    stop_and_check(pipeline)
    assert rig.results and len(rig.results) + rig.counter("drops") == 20  # each frame: processed or dropped
    assert all(score(r) > 0.8 and r["version"] == 1 for r in rig.results)
    keys = [int(r["key"].split(":")[1]) for r in rig.results]
    assert keys == sorted(keys) and keys[-1] == 20  # in order, and the latest frame is never the one dropped
    assert len(rig.kinds("source_ended")) == 1
    assert not [r for r in caplog.records if r.name == "edge_runtime.results"]  # results = "none"


def test_slow_inference_drops_oldest_frames_and_bounds_the_queue(tmp_path: Path, face: LoadedModel,
                                                                 video: Path) -> None:
    rig = Rig(tmp_path, face)
    rig.service.observe(lambda *_: time.sleep(0.03))  # a slow device
    pipeline = rig.pipeline(SourceConfig(type="video", path=video, loop=True, queue=3))
    pipeline.start()
    wait_for(lambda: len(rig.results) >= 8, what="eight results")
    stop_and_check(pipeline)
    assert rig.counter("drops") > len(rig.results)
    assert 0 < rig.metrics.max_depth <= 3
    assert rig.metrics.snapshot()["queue_depth"]["cam"] == 0


def test_stop_finishes_the_item_in_flight_within_the_timeout(tmp_path: Path, face: LoadedModel,
                                                             video: Path) -> None:
    rig = Rig(tmp_path, face)
    in_flight = threading.Event()

    def slow(*_: Any) -> None:
        in_flight.set()
        time.sleep(0.3)

    rig.service.observe(slow)
    pipeline = rig.pipeline(SourceConfig(type="video", path=video, loop=True, queue=2))
    pipeline.start()
    assert in_flight.wait(10)
    before = len(rig.results)
    stop_and_check(pipeline, timeout=2.0)
    assert len(rig.results) == before + 1  # the item in flight was finished, nothing new was started

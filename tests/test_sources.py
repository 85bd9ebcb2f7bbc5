"""Sources on real files and real OpenCV: the folder (once, in order, across restarts) and captures."""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from daemon_helpers import wait_for

from edge_runtime._util.retry_policy import redact_url
from edge_runtime.config.model import Limits, SourceConfig
from edge_runtime.errors import ConfigError
from edge_runtime.pipelines.sources.base import NoSource, Source, SourceContext
from edge_runtime.pipelines.sources.capture import CaptureSource, backoff_delay
from edge_runtime.pipelines.sources.factory import build_source
from edge_runtime.pipelines.sources.folder import FolderSource, state_db_path
from edge_runtime.telemetry.events import EventBus
from edge_runtime.telemetry.metrics import Metrics

POLL = 0.02



class Harness:
    """A source context whose metrics and events the test can read."""

    def __init__(self, tmp_path: Path, pipeline: str = "p") -> None:
        self.metrics = Metrics()
        self.events: list[dict[str, Any]] = []
        self.bus = EventBus(tmp_path / "events.jsonl")
        self.bus.subscribe(self.events.append)
        self.stop = threading.Event()
        self.pipeline = pipeline
        self.ctx = SourceContext(pipeline=pipeline, metrics=self.metrics, events=self.bus, stop_event=self.stop)

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind]

    def source_errors(self) -> int:
        errors: int = self.metrics.snapshot()["source_errors"].get(self.pipeline, 0)
        return errors


class Collector:
    """Drains ``source.items()`` on a thread (acking each item), like a pipeline with no model."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.items: list[tuple[str, Any]] = []
        self.times: list[float] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for key, payload in self.source.items():
            self.times.append(time.monotonic())
            self.items.append((key, payload))
            self.source.ack(key)

    def keys(self) -> list[str]:
        return [k for k, _ in self.items]

    def stop(self, harness: Harness, within: float = 1.0) -> None:
        t0 = time.monotonic()
        harness.stop.set()
        self.thread.join(within + 1)
        assert not self.thread.is_alive() and time.monotonic() - t0 < within, "source did not stop promptly"
        self.source.close()


@pytest.fixture()
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


@pytest.fixture()
def hopper(zoo: Callable[[str], Path]) -> np.ndarray:
    image = cv2.imread(str(zoo("grace_hopper")))
    assert image is not None
    return image


def write_image(path: Path, image: np.ndarray, mtime: float | None = None) -> bytes:
    assert cv2.imwrite(str(path), image)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path.read_bytes()


def folder_source(harness: Harness, inbox: Path, state: Path, max_bytes: int = 1 << 20) -> FolderSource:
    return FolderSource(inbox, harness.ctx, db_path=state_db_path(state, harness.pipeline), max_bytes=max_bytes,
                        poll_seconds=POLL)


# ---------------------------------------------------------------------------------------------- folder


def test_folder_yields_each_file_once_in_mtime_order_and_survives_restart(
        tmp_path: Path, hopper: np.ndarray) -> None:
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    base = time.time() - 100
    # Names sort the other way round from mtimes: the order must follow mtime.
    names = ["e.jpg", "d.png", "c.jpeg", "b.JPG", "a.npy"]
    expected: dict[str, bytes] = {}
    for i, name in enumerate(names[:4]):
        expected[name] = write_image(inbox / name, np.roll(hopper, 10 * i, axis=1), base + i)
    np.save(inbox / "a.npy", np.zeros((4, 4), np.float32))
    os.utime(inbox / "a.npy", (base + 4, base + 4))
    expected["a.npy"] = (inbox / "a.npy").read_bytes()
    # Everything below must be ignored: dotfiles, other extensions, partial names, dirs, links, FIFOs, empty files.
    write_image(inbox / ".hidden.jpg", hopper)
    (inbox / "notes.txt").write_text("x")
    (inbox / "upload.jpg.part").write_bytes(expected["e.jpg"])
    (inbox / "dir.jpg").mkdir()
    (inbox / "passwd.jpg").symlink_to("/etc/passwd")
    (inbox / "inside.jpg").symlink_to(inbox / "e.jpg")
    os.mkfifo(inbox / "fifo.jpg")
    (inbox / "empty.png").touch()

    harness = Harness(tmp_path)
    collector = Collector(folder_source(harness, inbox, state))
    wait_for(lambda: len(collector.items) >= 5, what="five files")
    later = write_image(inbox / "z-later.png", hopper)  # a later file proves earlier ones are not re-yielded
    wait_for(lambda: len(collector.items) >= 6, what="the later file")
    collector.stop(harness)
    assert collector.keys() == [*names, "z-later.png"]
    assert [p for _, p in collector.items] == [*(expected[n] for n in names), later]
    assert harness.source_errors() == 0 and not harness.events

    db = state_db_path(state, "p")
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert {r[0] for r in conn.execute("SELECT name FROM processed")} == {*names, "z-later.png"}

    # Restart: new objects, same state dir. Only the file added since is yielded.
    harness2 = Harness(tmp_path)
    again = Collector(folder_source(harness2, inbox, state))
    write_image(inbox / "new.png", np.roll(hopper, 50, axis=0))
    wait_for(lambda: len(again.items) >= 1, what="the new file after restart")
    write_image(inbox / "newer.png", np.roll(hopper, 60, axis=0))
    wait_for(lambda: len(again.items) >= 2, what="a second new file")
    again.stop(harness2)
    assert again.keys() == ["new.png", "newer.png"]


def test_folder_does_not_read_a_file_still_being_written(harness: Harness, tmp_path: Path,
                                                         hopper: np.ndarray) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    data = cv2.imencode(".jpg", hopper)[1].tobytes()
    source = folder_source(harness, inbox, tmp_path / "state")
    with open(inbox / "growing.jpg", "wb") as fh:
        fh.write(data[: len(data) // 3])
        fh.flush()
        assert source.scan() == []  # first sighting: not known to be stable
        fh.write(data[len(data) // 3 : 2 * len(data) // 3])
        fh.flush()
        assert source.scan() == []  # it grew between scans
        fh.write(data[2 * len(data) // 3 :])
    assert source.scan() == []  # grew again (the last chunk)
    assert source.scan() == ["growing.jpg"]  # unchanged across two scans: ready
    key, payload = next(source.items())
    assert key == "growing.jpg" and payload == data
    source.close()


def test_folder_reports_oversized_file_once_and_never_retries_it(tmp_path: Path, hopper: np.ndarray) -> None:
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    now = time.time()
    big = np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)
    write_image(inbox / "big.png", big, now - 10)  # noise does not compress: > 100 kB
    small = write_image(inbox / "small.jpg", cv2.resize(hopper, (64, 64)), now - 5)
    assert (inbox / "big.png").stat().st_size > 100_000 > len(small)

    harness = Harness(tmp_path)
    collector = Collector(folder_source(harness, inbox, state, max_bytes=100_000))
    wait_for(lambda: len(collector.items) >= 1, what="the small file")
    collector.stop(harness)
    assert collector.keys() == ["small.jpg"]
    assert harness.source_errors() == 1
    (event,) = harness.kinds("source_error")
    assert event["key"] == "big.png" and "exceeds the 100000-byte cap" in event["reason"]
    with sqlite3.connect(state_db_path(state, "p")) as conn:
        errors = dict(conn.execute("SELECT name, error FROM processed").fetchall())
    assert errors["small.jpg"] is None and "cap" in errors["big.png"]

    harness2 = Harness(tmp_path)
    again = Collector(folder_source(harness2, inbox, state, max_bytes=100_000))
    write_image(inbox / "next.jpg", cv2.resize(hopper, (32, 32)))
    wait_for(lambda: len(again.items) >= 1, what="the next file")
    again.stop(harness2)
    assert again.keys() == ["next.jpg"] and harness2.source_errors() == 0


def test_folder_prunes_vanished_files_and_reprocesses_replaced_content(
        harness: Harness, tmp_path: Path, hopper: np.ndarray) -> None:
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    write_image(inbox / "one.jpg", hopper, time.time() - 10)
    write_image(inbox / "two.jpg", hopper, time.time() - 9)
    source = folder_source(harness, inbox, state)
    assert source.scan() == [] and source.scan() == ["one.jpg", "two.jpg"]
    items = source.items()
    for _ in range(2):
        key, _payload = next(items)
        source.ack(key)
    db = state_db_path(state, "p")

    def rows() -> set[str]:
        with sqlite3.connect(db) as conn:
            return {r[0] for r in conn.execute("SELECT name FROM processed")}

    assert rows() == {"one.jpg", "two.jpg"}
    (inbox / "one.jpg").unlink()
    write_image(inbox / "two.jpg", np.roll(hopper, 5, axis=1), time.time())  # new content, same name
    assert source.scan() == []
    assert rows() == {"two.jpg"}  # the vanished file's entry is gone
    assert source.scan() == ["two.jpg"]
    source.close()


def test_folder_missing_is_one_outage_until_it_appears(harness: Harness, tmp_path: Path,
                                                       hopper: np.ndarray) -> None:
    inbox = tmp_path / "not-yet"
    collector = Collector(folder_source(harness, inbox, tmp_path / "state"))
    wait_for(lambda: harness.source_errors() >= 3, what="repeated scan failures")
    assert len(harness.kinds("source_failed")) == 1 and not collector.items
    inbox.mkdir()
    write_image(inbox / "late.jpg", hopper)
    wait_for(lambda: len(collector.items) == 1, what="the file once the folder exists")
    collector.stop(harness)
    assert len(harness.kinds("source_failed")) == 1 and len(harness.kinds("source_recovered")) == 1


def test_folder_corrupt_state_db_is_set_aside(harness: Harness, tmp_path: Path) -> None:
    db = state_db_path(tmp_path / "state", "p")
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not a database" * 100)
    source = FolderSource(tmp_path, harness.ctx, db_path=db, max_bytes=1000)
    assert source.scan() == []
    source.close()
    (event,) = harness.kinds("source_state_reset")
    assert "corrupt" in event["reason"]
    assert [p.name for p in db.parent.iterdir() if ".corrupt-" in p.name]


def test_build_source_by_type(harness: Harness, tmp_path: Path) -> None:
    common: dict[str, Any] = {"state_dir": tmp_path, "limits": Limits(), "metrics": harness.metrics,
                              "events": harness.bus, "stop_event": harness.stop}
    with pytest.raises(ConfigError, match="unknown source type 'kinect'"):
        build_source(SourceConfig(type="kinect"), pipeline_name="p", **common)
    with pytest.raises(ConfigError, match=r"source\.path is required"):
        build_source(SourceConfig(type="folder"), pipeline_name="p", **common)
    none = build_source(SourceConfig(), pipeline_name="p", **common)
    assert isinstance(none, NoSource) and list(none.items()) == []
    folder = build_source(SourceConfig(type="folder", path=tmp_path), pipeline_name="../../evil", **common)
    assert isinstance(folder, FolderSource) and not folder.lossy
    assert folder.db_path.parent == tmp_path / "sources" and folder.db_path.name.startswith("_.._evil-")
    folder.close()
    camera = build_source(SourceConfig(type="camera", camera=3), pipeline_name="p", **common)
    assert isinstance(camera, CaptureSource) and camera.lossy and camera.label == "camera:3"


# ---------------------------------------------------------------------------------------------- capture


@pytest.fixture()
def video(tmp_path: Path, hopper: np.ndarray) -> Path:
    """20 MJPG frames of Grace Hopper, shifted a little each frame."""
    path = tmp_path / "clip.avi"
    small = cv2.resize(hopper, (256, 300))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (256, 300))
    assert writer.isOpened()
    for i in range(20):
        writer.write(np.roll(small, 4 * i, axis=1))
    writer.release()
    return path


def test_video_frames_flow_and_end_cleanly(harness: Harness, video: Path) -> None:
    source = CaptureSource(str(video), harness.ctx, live=False)
    collector = Collector(source)
    collector.thread.join(10)
    assert not collector.thread.is_alive(), "a video without loop must end the source"
    assert collector.keys() == [f"frame:{i}" for i in range(1, 21)]
    assert all(f.shape == (300, 256, 3) and f.dtype == np.uint8 for _, f in collector.items)
    assert not np.array_equal(collector.items[0][1], collector.items[5][1])
    (ended,) = harness.kinds("source_ended")
    assert ended["frames"] == 20 and ended["pipeline"] == "p"
    assert harness.source_errors() == 0


def test_video_loop_restarts_and_fps_caps_the_rate(harness: Harness, video: Path) -> None:
    source = CaptureSource(str(video), harness.ctx, live=False, loop=True)
    collector = Collector(source)
    wait_for(lambda: len(collector.items) > 45, what="frames past two loops")
    collector.stop(harness)
    assert not harness.kinds("source_ended") and harness.source_errors() == 0

    paced = Harness(video.parent)
    collector = Collector(CaptureSource(str(video), paced.ctx, live=False, loop=True, fps=25.0))
    wait_for(lambda: len(collector.items) >= 10, what="ten paced frames")
    collector.stop(paced)
    span = collector.times[9] - collector.times[0]
    assert span >= 9 / 25.0 * 0.9, f"10 frames in {span:.3f} s: faster than 25 fps"


@pytest.mark.parametrize(("config", "label"), [
    (SourceConfig(type="camera", camera=63, reconnect_max_seconds=0.1), "camera:63"),
    (SourceConfig(type="rtsp", url="rtsp://user:secret@127.0.0.1:1/x?token=secret", reconnect_max_seconds=0.1),
     "rtsp://***@127.0.0.1:1/x?***"),
])
def test_unavailable_capture_is_retried_reported_once_and_never_leaks_secrets(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
        config: SourceConfig, label: str) -> None:
    caplog.set_level(logging.DEBUG)
    harness = Harness(tmp_path)
    source = build_source(config, state_dir=tmp_path, pipeline_name="p", limits=Limits(), metrics=harness.metrics,
                          events=harness.bus, stop_event=harness.stop)
    assert source.label == label
    collector = Collector(source)
    wait_for(lambda: harness.source_errors() >= 4, what="several failed attempts")
    collector.stop(harness, within=1.0)
    assert not collector.items
    (failed,) = harness.kinds("source_failed")
    assert failed["source"] == label and "cannot open" in failed["reason"]
    out, err = capfd.readouterr()
    logged = caplog.text + out + err + json.dumps(harness.events) + (tmp_path / "events.jsonl").read_text()
    assert "secret" not in logged and "user" not in logged


class FakeCapture:
    """A capture that yields ``frames`` frames then fails a read (``frames`` None: never fails)."""

    def __init__(self, opened: bool, frames: int | None, image: np.ndarray) -> None:
        self.opened, self.left, self.image = opened, frames, image
        self.released = False

    def isOpened(self) -> bool:
        return self.opened

    def read(self) -> tuple[bool, np.ndarray | None]:
        time.sleep(0.002)  # a camera blocks until its next frame
        if self.left is not None:
            if self.left <= 0:
                return False, None
            self.left -= 1
        return True, self.image.copy()

    def grab(self) -> bool:
        return self.read()[0]

    def retrieve(self) -> tuple[bool, np.ndarray | None]:
        return True, self.image.copy()

    def release(self) -> None:
        self.released = True


def test_camera_unplugged_mid_stream_reconnects_and_frames_flow_again(harness: Harness,
                                                                       hopper: np.ndarray) -> None:
    script = iter([FakeCapture(True, 3, hopper), FakeCapture(False, None, hopper), FakeCapture(True, None, hopper)])
    opened: list[FakeCapture] = []

    def factory(target: str | int) -> FakeCapture:
        assert target == 0
        capture = next(script)
        opened.append(capture)
        return capture

    source = CaptureSource(0, harness.ctx, live=True, reconnect_max_seconds=0.2, factory=factory)
    collector = Collector(source)
    wait_for(lambda: len(collector.items) >= 10, what="frames after reconnecting")
    collector.stop(harness)
    assert len(opened) == 3 and all(c.released for c in opened)
    assert harness.source_errors() == 2  # the failed read, then the failed open
    assert len(harness.kinds("source_failed")) == 1
    (recovered,) = harness.kinds("source_recovered")
    assert recovered["attempts"] == 2
    keys = collector.keys()
    assert keys == [f"frame:{i}" for i in range(1, len(keys) + 1)]  # numbering continues across reconnects


def test_reconnect_backoff_grows_and_is_capped(harness: Harness) -> None:
    calls: list[float] = []

    class Refusing(FakeCapture):
        def __init__(self) -> None:
            super().__init__(False, None, np.zeros((1, 1, 3), np.uint8))
            calls.append(time.monotonic())

    source = CaptureSource("rtsp://cam/x", harness.ctx, live=True, reconnect_max_seconds=0.4,
                           factory=lambda _t: Refusing(), rng=random.Random(7))
    collector = Collector(source)
    wait_for(lambda: len(calls) >= 5, what="five attempts")
    collector.stop(harness)
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    expected = [min(0.4, 0.25 * 2**i) for i in range(len(gaps))]
    assert all(g >= e / 2 * 0.95 for g, e in zip(gaps, expected, strict=True)), gaps
    assert all(g <= 0.4 + 0.3 for g in gaps), gaps
    assert len(harness.kinds("source_failed")) == 1 and harness.source_errors() >= 5


@pytest.mark.parametrize(("attempt", "cap", "low", "high"), [
    (0, 30.0, 0.125, 0.25),
    (1, 30.0, 0.25, 0.5),
    (4, 30.0, 2.0, 4.0),
    (10, 30.0, 15.0, 30.0),
    (500, 30.0, 15.0, 30.0),
    (3, 0.1, 0.05, 0.1),
])
def test_backoff_delay_bounds(attempt: int, cap: float, low: float, high: float) -> None:
    rng = random.Random(1)
    delays = [backoff_delay(attempt, cap, rng) for _ in range(200)]
    assert all(low <= d <= high for d in delays)
    assert max(delays) - min(delays) > (high - low) / 2  # jittered, not constant


@pytest.mark.parametrize(("url", "shown"), [
    ("rtsp://user:secret@10.0.0.5:554/stream", "rtsp://***@10.0.0.5:554/stream"),
    ("rtsp://10.0.0.5/stream", "rtsp://10.0.0.5/stream"),
    ("rtsp://u:p@ss/w@rd@cam/x", "rtsp://***@cam/x"),
    ("https://cam.local/mjpg?user=admin&pwd=secret", "https://cam.local/mjpg?***"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_stop_interrupts_a_long_backoff(harness: Harness) -> None:
    source = CaptureSource(5, harness.ctx, live=True, reconnect_max_seconds=3600,
                           factory=lambda _t: FakeCapture(False, None, np.zeros((1, 1, 3), np.uint8)),
                           rng=random.Random(0))
    items: Iterator[Any] = source.items()
    thread = threading.Thread(target=lambda: list(items), daemon=True)
    thread.start()
    wait_for(lambda: harness.source_errors() >= 3, what="backoff to grow")  # the next wait is >= 1 s
    t0 = time.monotonic()
    harness.stop.set()
    thread.join(2)
    assert not thread.is_alive() and time.monotonic() - t0 < 0.5

"""Liveness means progress: real `edge-runtime serve` with a real sd_notify socket, stuck and healthy sources.

A ``video`` source whose path is a FIFO nobody writes blocks for ever in
OpenCV's open. The daemon must report it, restart it, and once it cannot
recover stop sending WATCHDOG=1; a healthy pipeline keeps the pings coming.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from cli_helpers import Device, cli
from daemon_helpers import REPO, Serve, wait_for, write_config
from http_fault_server import FaultServer, Route
from test_cli import pack_face

from edge_runtime._util.progress import Heartbeat, RestartBudget
from edge_runtime.config.liveness import LivenessConfig
from edge_runtime.config.model import Config, OtaConfig
from edge_runtime.liveness import Liveness
from edge_runtime.runtime.service import InferenceService
from edge_runtime.telemetry.events import EventBus
from edge_runtime.telemetry.metrics import Metrics
from edge_runtime.update.activation import Activator
from edge_runtime.update.ota import OtaUpdater
from edge_runtime.update.store import ModelStore

Zoo = Callable[[str], Path]
Starter = Callable[..., "tuple[Serve, NotifySocket]"]

# Fault injection into the real daemon (PYTHONPATH=<dir with this as sitecustomize.py>): once the file
# named by EDGE_TEST_STALL_API exists, the API's serving loop blocks in the next connection it accepts,
# as it would in a call that never returns.
STALL_API_SITECUSTOMIZE = """
import os, threading
from edge_runtime.api import intake as api_intake

_original = api_intake.Intake._accepted

def _accepted(self, sock, peer):
    if os.path.exists(os.environ["EDGE_TEST_STALL_API"]):
        threading.Event().wait()
    _original(self, sock, peer)

api_intake.Intake._accepted = _accepted
"""


class NotifySocket:
    """A bound sd_notify datagram socket; a thread records every message with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def index(self, text: str, after: int = 0) -> int | None:
        """Position of the first message at or after ``after`` that contains ``text``."""
        return next((i for i, (_, m) in enumerate(self.messages) if i >= after and text in m), None)

    def pings_since(self, i: int) -> int:
        return sum("WATCHDOG=1" in m for _, m in self.messages[i:])


@pytest.fixture()
def face_device(tmp_path: Path, keys: dict[str, Path], zoo: Zoo) -> Iterator[Starter]:
    """Start `serve` with face v1 installed, the given pipeline/liveness config and a notify socket."""
    started: list[tuple[Serve, NotifySocket]] = []

    def start(extra: str, env: dict[str, str] | None = None) -> tuple[Serve, NotifySocket]:
        config, state, port = write_config(tmp_path / "device", keys["trust_dir"], extra=extra)
        cli("models", "install", pack_face(Device(tmp_path, config, state, keys), zoo, 1), "--config", config)
        notify = NotifySocket(tmp_path / "notify.sock")
        serve = Serve(config, state, port)
        old = dict(os.environ)
        os.environ.update({"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "600000", **(env or {})})
        try:
            serve.start()
        finally:
            os.environ.clear()
            os.environ.update(old)
        started.append((serve, notify))
        wait_for(lambda: notify.index("READY=1") is not None, 60, "READY=1", 0.05)
        return serve, notify

    yield start
    for serve, notify in started:
        if serve.proc and serve.proc.poll() is None:
            serve.kill9()
        notify.close()


def video_pipeline(path: Path, *, stall: float, restarts: int, loop: bool = False) -> str:
    return (f"[liveness]\nstall_seconds = {stall}\nmax_restarts = {restarts}\nrestart_window_seconds = 600.0\n"
            f'[[pipelines]]\nmodel = "face"\n[pipelines.source]\ntype = "video"\npath = "{path}"\n'
            f"fps = 5.0\nloop = {'true' if loop else 'false'}\n")


def stalled(serve: Serve, action: str) -> list[dict[str, Any]]:
    return [e for e in serve.events("source_stalled") if e.get("action") == action]


def metric(serve: Serve, name: str, pipeline: str = "face") -> float | None:
    status, body = serve.get("/metrics")
    assert status == 200
    match = re.search(rf'^{name}{{pipeline="{pipeline}"}} (\S+)$', body.decode(), re.M)
    return float(match.group(1)) if match else None


@pytest.fixture()
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "camera.fifo"
    os.mkfifo(path)
    return path


@pytest.fixture()
def clip(tmp_path: Path, zoo: Zoo) -> Path:
    """20 MJPG frames of Grace Hopper."""
    image = cv2.resize(cv2.imread(str(zoo("grace_hopper"))), (256, 300))
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (256, 300))
    for i in range(20):
        writer.write(np.roll(image, 4 * i, axis=1))
    writer.release()
    return path


def test_a_source_stuck_on_a_fifo_is_restarted_then_the_watchdog_stops(face_device: Starter, fifo: Path) -> None:
    serve, notify = face_device(video_pipeline(fifo, stall=1.0, restarts=2))
    gave_up = wait_for(lambda: stalled(serve, "gave_up"), 30, "the daemon to give up on the stuck source")[0]
    restarted = stalled(serve, "restarted")
    assert [e["restarts"] for e in restarted] == [1, 2] and gave_up["restarts"] == 2
    assert all(e["pipeline"] == "face" and e["source"] == f"video:{fifo}" and e["stalled_s"] >= 1.0
               for e in [*restarted, gave_up])
    assert "2 restarts within 600 s used" in gave_up["reason"] and "no progress" in gave_up["reason"]

    unhealthy = wait_for(lambda: notify.index("STATUS=unhealthy"), 10, "STATUS=unhealthy")
    assert "video:" in notify.messages[unhealthy][1] and "made no progress" in notify.messages[unhealthy][1]
    assert notify.pings_since(0) >= 1  # it was fed before the stall
    # Withheld from then on: 3 s is five watchdog periods (WATCHDOG_USEC 0.6 s) without a ping.
    t0 = time.monotonic()
    wait_for(lambda: time.monotonic() - t0 > 3.0, 10, "3 s", 0.1)
    assert notify.pings_since(unhealthy) == 0
    assert "withholding the watchdog ping" in serve.stderr()
    assert (metric(serve, "edge_source_stalls_total") or 0) >= 3
    assert (metric(serve, "edge_pipeline_progress_age_seconds") or 0) > 1.0
    # SIGTERM is not held up by the threads stuck in open.
    t0 = time.monotonic()
    assert serve.terminate(15) == 0
    assert time.monotonic() - t0 < 10


def open_writer(fifo: Path) -> int | None:
    """A writer's fd on ``fifo`` once a reader is blocked opening it (that open then returns); else None."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        assert e.errno == errno.ENXIO  # no reader yet
        return None


def test_a_stuck_source_whose_camera_comes_back_recovers_and_the_pings_go_on(face_device: Starter, fifo: Path,
                                                                            clip: Path) -> None:
    serve, notify = face_device(video_pipeline(fifo, stall=1.0, restarts=5, loop=True))
    wait_for(lambda: stalled(serve, "restarted"), 30, "a restart of the stuck source")
    # The camera comes back: the path is now a real video, and the stuck open() gets an EOF. (OpenCV
    # serialises every capture open, so the fresh source waits for the stuck one to give up its lock.)
    fd = wait_for(lambda: open_writer(fifo), 10, "a reader on the FIFO")
    os.replace(clip, fifo)
    os.close(fd)
    wait_for(lambda: '"model": "face"' in serve.stdout(), 30, "results from the recovered source")
    seen = len(notify.messages)
    wait_for(lambda: notify.pings_since(seen) >= 5, 15, "WATCHDOG=1 after the recovery")
    assert not stalled(serve, "gave_up") and notify.index("STATUS=unhealthy") is None
    assert (metric(serve, "edge_pipeline_progress_age_seconds") or 99) < 1.0
    assert serve.terminate(15) == 0


def test_a_stuck_source_that_gets_unstuck_brings_the_watchdog_back(face_device: Starter, fifo: Path) -> None:
    serve, notify = face_device(video_pipeline(fifo, stall=1.0, restarts=0))
    wait_for(lambda: stalled(serve, "gave_up"), 30, "the daemon to give up (no restarts allowed)")
    unhealthy = wait_for(lambda: notify.index("STATUS=unhealthy"), 10, "STATUS=unhealthy")

    def feed_garbage() -> None:  # each reader opening the FIFO (OpenCV tries several backends) gets an EOF
        fd = open_writer(fifo)
        if fd is not None:
            os.write(fd, b"not a video")
            os.close(fd)

    back = wait_for(lambda: feed_garbage() or notify.index("STATUS=serving again", unhealthy), 15,
                    "STATUS=serving again once the stuck open() returned")
    wait_for(lambda: notify.pings_since(back) >= 1, 10, "WATCHDOG=1 once it makes progress again")
    assert wait_for(lambda: serve.events("stall_cleared"), 10, "stall_cleared")[0]["part"] == "source"
    # The retried open blocks on the FIFO again; SIGTERM does not wait for it (nor for the whole stop bound).
    t0 = time.monotonic()
    assert serve.terminate(15) == 0
    assert time.monotonic() - t0 < 10


def test_a_healthy_idle_pipeline_and_api_keep_the_watchdog_fed(face_device: Starter, tmp_path: Path,
                                                              zoo: Zoo) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    serve, notify = face_device(f'[liveness]\nstall_seconds = 1.0\n[[pipelines]]\nmodel = "face"\n'
                                f'[pipelines.source]\ntype = "folder"\npath = "{inbox}"\npoll_seconds = 3.0\n')
    ready = notify.index("READY=1")
    assert ready is not None
    # Idle for four stall bounds (a folder poll of 3 s is one long legitimate wait), then a file, then idle again.
    t0 = time.monotonic()
    wait_for(lambda: time.monotonic() - t0 > 4.0, 10, "4 s", 0.1)
    (inbox / "a.jpg").write_bytes(zoo("grace_hopper").read_bytes())
    wait_for(lambda: '"key": "a.jpg"' in serve.stdout(), 30, "the file's result")
    assert notify.pings_since(ready) >= 8
    assert not serve.events("source_stalled") and not serve.events("worker_stalled")
    assert notify.index("STATUS=unhealthy") is None
    assert (metric(serve, "edge_pipeline_progress_age_seconds") or 99) < 1.0
    status, body = serve.get("/metrics")
    assert status == 200
    age = re.search(r"^edge_api_progress_age_seconds (\S+)$", body.decode(), re.M)
    assert age and float(age.group(1)) < 1.0


def test_a_stuck_api_serving_loop_stops_the_watchdog(face_device: Starter, tmp_path: Path) -> None:
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(STALL_API_SITECUSTOMIZE)
    trigger = tmp_path / "stall-api"
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    # REPO first: sitecustomize runs before `-m` puts the cwd on sys.path, and must patch the code serve runs.
    path = os.pathsep.join(filter(None, [str(REPO), str(inject), os.environ.get("PYTHONPATH")]))
    serve, notify = face_device(f'[liveness]\nstall_seconds = 1.0\n[[pipelines]]\nmodel = "face"\n'
                                f'[pipelines.source]\ntype = "folder"\npath = "{inbox}"\n',
                                {"PYTHONPATH": path, "EDGE_TEST_STALL_API": str(trigger)})
    assert serve.get("/v2/health/live")[0] == 200  # the injection is inert until triggered
    wait_for(lambda: notify.pings_since(0) >= 2, 10, "WATCHDOG=1 while the API turns")
    trigger.touch()
    with socket.create_connection(("127.0.0.1", serve.port), timeout=5):  # accepted, then the loop blocks
        unhealthy = wait_for(lambda: notify.index("STATUS=unhealthy"), 15, "STATUS=unhealthy")
    assert "the API serving loop made no progress" in notify.messages[unhealthy][1]
    t0 = time.monotonic()
    wait_for(lambda: time.monotonic() - t0 > 3.0, 10, "3 s", 0.1)
    assert notify.pings_since(unhealthy) == 0
    assert "withholding the watchdog ping" in serve.stderr()
    assert not serve.events("source_stalled")  # the pipelines are fine: only the API loop is stuck
    t0 = time.monotonic()
    assert serve.terminate(15) == 0  # SIGTERM is not held up by the blocked serving loop
    assert time.monotonic() - t0 < 10
    assert "API serving loop is blocked" in serve.stderr()


# ---------------------------------------------------------------------------------------------- units


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_heartbeat_age_follows_the_clock() -> None:
    clock = FakeClock()
    beat = Heartbeat(clock)
    clock.now += 2.5
    assert beat.age() == 2.5
    beat.beat()
    assert beat.age() == 0.0 and beat.last == 102.5
    clock.now -= 1.0  # never negative
    assert beat.age() == 0.0


def test_restart_budget_allows_n_per_window_and_refills() -> None:
    clock = FakeClock()
    budget = RestartBudget(2, 60.0, clock)
    assert budget.take()
    clock.now += 30.0
    assert budget.take() and not budget.take()
    assert budget.used() == 2
    clock.now += 29.0
    assert not budget.take()
    clock.now += 1.0  # the first restart left the window, the second has not
    assert budget.take() and not budget.take()
    assert not RestartBudget(0, 60.0, clock).take()


def test_an_ota_poller_stuck_in_a_fetch_is_not_alive_until_it_moves_again(tmp_path: Path) -> None:
    """OTA's liveness is its poll thread's heartbeat (no more constant True): a fetch that hangs past
    stuck_seconds withholds the watchdog, and the verdict clears once the poller moves on."""
    now = [1000.0]  # the heartbeat's clock; the fetch itself runs on real time against a real server
    config = Config(state_dir=tmp_path / "state", trust_dir=tmp_path / "trust")
    config.state_dir.mkdir(mode=0o700)
    bus, metrics = EventBus(tmp_path / "events.jsonl"), Metrics()
    store = ModelStore(config)
    activator = Activator(store, InferenceService(metrics), bus, config.activation)
    route = Route(body=b"x" * 40, fault="drip", drip_seconds=0.05, drip_headers=True)  # about 3 s for the channel
    with FaultServer({"/channel.json": route}) as server:
        ota = OtaUpdater(OtaConfig(channel_url=server.url("/channel.json"), allow_http=True, retries=0,
                                   poll_seconds=3600), store, activator, bus, clock=lambda: now[0])
        ota.start()
        try:
            wait_for(lambda: server.seen("/channel.json"), what="the first poll")
            assert ota.alive  # inside a fetch, within its bound
            now[0] += ota.stuck_seconds + 1
            assert not ota.alive
            assert Liveness(LivenessConfig(), bus, metrics).check([], None, [ota]) == "OtaUpdater is not alive"
            # The dripped document ends and is refused (not a channel): the poller beats and waits again.
            wait_for(lambda: ota.alive, timeout=20, what="the poller to move on")
        finally:
            ota.stop()
    assert ota.alive  # stopping counts as alive: the supervisor is stopping too

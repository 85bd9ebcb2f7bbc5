"""Capture source: a video file, a camera index or an RTSP/HTTP stream, through OpenCV.

Frames are yielded as BGR arrays keyed ``frame:<n>`` (n counts every frame
this source yielded, across reconnects and loops). With ``fps`` > 0 the rate is
capped: a video file is paced, a live source keeps grabbing (cheap, no decode)
and decodes only the frames it yields, so what it yields is current.

Failures never end a live source: a capture that does not open or a read that
fails (camera unplugged, stream dropped) is counted in ``metrics.source_error``
on every attempt, reported with one ``source_failed`` event per outage, and
retried with capped exponential backoff and jitter; the first frame after that
emits ``source_recovered``. A video file that ends stops the source cleanly
(``source_ended``) unless ``loop`` is set, in which case it is reopened.

Credentials in a stream URL are secrets: only :func:`redact_url`'s form
appears in logs, events and errors, and OpenCV/FFmpeg's own logging (which may
print URLs) is turned down unless the operator set its variables.

The capture is opened through a factory (default :func:`open_capture`, the
real ``cv2.VideoCapture``) so tests can inject faults.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import cv2
import numpy as np
from numpy.typing import NDArray

from edge_runtime._util.retry_policy import equal_jitter, redact_url
from edge_runtime.config.model import SourceConfig
from edge_runtime.errors import ConfigError
from edge_runtime.pipelines.sources.base import Item, Source, SourceContext

__all__ = ["BACKOFF_BASE_SECONDS", "Capture", "CaptureFactory", "CaptureSource", "backoff_delay", "open_capture"]

BACKOFF_BASE_SECONDS = 0.25
NETWORK_TIMEOUT_MS = 5000  # bounds a blocking open/read on a dead stream (and so how long stop() can wait)

_log = logging.getLogger(__name__)


class Capture(Protocol):
    """The part of ``cv2.VideoCapture`` a capture source uses."""

    def isOpened(self) -> bool: ...

    def read(self) -> tuple[bool, Any]: ...

    def grab(self) -> bool: ...

    def retrieve(self) -> tuple[bool, Any]: ...

    def release(self) -> None: ...


CaptureFactory = Callable[[str | int], Capture]


def _quiet_opencv() -> None:
    # FFmpeg may print a stream's URL (credentials included) to stderr; an
    # operator who sets these variables to debug keeps what they asked for.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET, read by OpenCV at every open
    if "OPENCV_LOG_LEVEL" not in os.environ:
        # Errors only: no warning for every failed camera probe on every retry.
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def open_capture(target: str | int) -> Capture:
    """The real capture: ``cv2.VideoCapture`` (FFmpeg with open/read timeouts for URLs)."""
    _quiet_opencv()
    if isinstance(target, str) and "://" in target:
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                  NETWORK_TIMEOUT_MS]
        capture: Capture = cv2.VideoCapture(target, cv2.CAP_FFMPEG, params)
    else:
        capture = cv2.VideoCapture(target)
    return capture


def backoff_delay(attempt: int, cap: float, rng: random.Random) -> float:
    """Seconds before retry number ``attempt`` (0-based): doubling from 0.25 s, capped, equal jitter."""
    return equal_jitter(attempt, BACKOFF_BASE_SECONDS, cap, rng)


class CaptureSource(Source):
    """Frames from a video file (``live`` False) or a camera/stream (``live`` True); lossy."""

    lossy = True

    def __init__(self, target: str | int, ctx: SourceContext, *, live: bool, label: str | None = None,
                 fps: float = 0.0, loop: bool = False, reconnect_max_seconds: float = 30.0,
                 factory: CaptureFactory = open_capture, rng: random.Random | None = None) -> None:
        """Nothing is opened until :meth:`items` runs.

        ``label`` names the source in logs and events (default: the redacted target).
        """
        if label is None:
            label = f"camera:{target}" if isinstance(target, int) else redact_url(target)
        super().__init__(ctx, label)
        self._target = target
        self.live = live
        self.interval = 1.0 / fps if fps > 0 else 0.0
        self.loop = loop
        self.reconnect_max_seconds = reconnect_max_seconds
        self._factory = factory
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret

    @classmethod
    def from_config(cls, config: SourceConfig, ctx: SourceContext,
                    factory: CaptureFactory = open_capture) -> CaptureSource:
        """The source for ``config.type`` video / camera / rtsp.

        Raises:
            ConfigError: a type this module does not serve, or its path/url is missing.
        """
        common: dict[str, Any] = {"fps": config.fps, "loop": config.loop,
                                  "reconnect_max_seconds": config.reconnect_max_seconds, "factory": factory}
        if config.type == "video":
            if config.path is None:
                raise ConfigError(f"pipeline {ctx.pipeline!r}: source.path is required for a video source")
            return cls(str(config.path), ctx, live=False, label=f"video:{config.path}", **common)
        if config.type == "camera":
            return cls(config.camera, ctx, live=True, **common)
        if config.type == "rtsp":
            if not config.url:
                raise ConfigError(f"pipeline {ctx.pipeline!r}: source.url is required for an rtsp source")
            return cls(config.url, ctx, live=True, **common)
        raise ConfigError(f"pipeline {ctx.pipeline!r}: {config.type!r} is not a capture source type")

    # ------------------------------------------------------------------ iteration

    def items(self) -> Iterator[Item]:
        """Yield frames until stopped (or, for a video without ``loop``, its end)."""
        frame_no = 0
        attempt = 0
        while not self.stop_event.is_set():
            capture = self._open()
            got = 0
            if capture is not None:
                try:
                    due = time.monotonic()
                    while not self.stop_event.is_set():
                        frame = self._next_frame(capture, due)
                        if frame is None:
                            break
                        if got == 0:
                            self._recovered()
                            attempt = 0
                        due = max(due + self.interval, time.monotonic())  # after a stall: no burst
                        got += 1
                        frame_no += 1
                        yield f"frame:{frame_no}", frame
                finally:
                    capture.release()
                if self.stop_event.is_set():
                    return
                if not self.live and got:
                    if self.loop:
                        continue  # reopen: rewinding by position is unreliable across codecs
                    _log.info("%s: end of video after %d frames", self.label, got)
                    self.ctx.events.emit("source_ended", reason=f"{self.label}: end of video ({got} frames)",
                                         pipeline=self.ctx.pipeline, source=self.label, frames=got)
                    return
                self._failed("read failed (device unplugged or stream dropped)" if self.live
                             else "opened but yielded no frames (not a video?)")
            if self._wait(backoff_delay(attempt, self.reconnect_max_seconds, self._rng)):
                return
            attempt += 1

    # ------------------------------------------------------------------ internals

    def _open(self) -> Capture | None:
        """An opened capture, or None after reporting the failure."""
        try:
            capture = self._factory(self._target)
            if capture.isOpened():
                return capture
            capture.release()
            self._failed("cannot open the camera" if isinstance(self._target, int) else "cannot open")
        except Exception as e:  # OpenCV (or an injected capture) raising: a failure to retry, not a crash
            self._failed(f"cannot open: {self._scrub(str(e))}")
        return None

    def _next_frame(self, capture: Capture, due: float) -> NDArray[Any] | None:
        """The next frame at or after ``due`` (paced), or None when the read failed or we are stopping."""
        try:
            if self.interval and not self.live:
                if self._wait(due - time.monotonic()):
                    return None
            elif self.interval:
                # Keep the device's buffer drained so the frame we decode is the newest one.
                while True:
                    if not capture.grab():
                        return None
                    self.progress.beat()  # each grab returned: not stuck, however long the interval
                    if time.monotonic() >= due or self.stop_event.is_set():
                        break
                ok, frame = capture.retrieve()
                return frame if ok and isinstance(frame, np.ndarray) and frame.size else None
            ok, frame = capture.read()
        except Exception as e:  # a foreign capture failing mid-read is an outage, not a crash
            _log.debug("%s: read raised: %s", self.label, self._scrub(str(e)))
            return None
        return frame if ok and isinstance(frame, np.ndarray) and frame.size else None

    def _scrub(self, text: str) -> str:
        """``text`` with the raw target (and any credentials in it) replaced by the label."""
        if isinstance(self._target, str):
            text = text.replace(self._target, self.label)
            userinfo = self._target.partition("://")[2].rpartition("@")[0]
            if userinfo:
                text = text.replace(userinfo, "***")
        return text

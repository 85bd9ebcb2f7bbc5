"""The local inference API: Open Inference Protocol (KServe v2) paths over HTTP/1.1.

:class:`ApiServer` listens on TCP (``api.listen = "HOST:PORT"``, port 0 picks
a free one) or on a unix socket (``"unix:/PATH"``) and runs every model
through :class:`~edge_runtime.runtime.service.InferenceService`, so API inferences
count in the metrics, readiness and probation like any other::

    GET  /v2/health/live | /v2/health/ready     {"live": true} / {"ready": ...} (503 until a good inference)
    GET  /v2                                    server metadata
    GET  /v2/models/<name>[/versions/<v>]       model metadata
    GET  /v2/models/<name>[/versions/<v>]/ready
    POST /v2/models/<name>[/versions/<v>]/infer JSON or binary tensors (api_codec), or a raw
                                                JPEG/PNG/.npy body -> the model's pre/post-processing
    GET  /metrics                               Prometheus text

HTTP/1.1 with keep-alive. Slow clients cannot starve it: one intake thread
(:mod:`edge_runtime.api.intake`) holds every connection while it waits and
receives each request whole, against deadlines, before a worker thread answers
it; with ``api.max_connections`` open, the slowest is evicted to make room.
Bodies need a Content-Length of at most ``api.max_request_bytes`` (413/411
before reading), at most ``api.max_concurrency`` inferences run at once (more
get 503 with Retry-After). Errors are ``{"error": "<one line>"}``; request
bodies are never logged; the access log is DEBUG.

This module binds, runs and stops the server and runs the worker threads;
requests are handled by :class:`~edge_runtime.api.handler.ApiRequestHandler`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import resource
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from edge_runtime._util.progress import Heartbeat
from edge_runtime.api.connection import Conn
from edge_runtime.api.handler import ApiRequestHandler, HandlerContext
from edge_runtime.api.intake import Intake
from edge_runtime.config.model import ApiConfig
from edge_runtime.errors import ConfigError
from edge_runtime.monitoring.monitor import Monitor
from edge_runtime.runtime.service import InferenceService
from edge_runtime.telemetry.metrics import Metrics

__all__ = ["ApiServer"]

log = logging.getLogger(__name__)

_BACKLOG = 1024  # the kernel caps it at net.core.somaxconn
_SPARE_FDS = 64  # descriptors kept for everything else the daemon opens (models, spool, MQTT)


class _Job:
    """One complete request for a worker: what ApiRequestHandler reads as its ``server``."""

    __slots__ = ("conn", "context", "intake", "request")

    def __init__(self, intake: Intake, conn: Conn, context: HandlerContext, request: bytes) -> None:
        self.intake, self.conn, self.context, self.request = intake, conn, context, request


class _Workers:
    """Threads that answer complete requests: started on demand, up to ``limit``; idle ones end after a minute.

    Nothing a worker does waits for a client's bytes (the intake received them),
    so a thread is busy only while a request is answered.
    """

    def __init__(self, limit: int, run: Callable[[_Job], None]) -> None:
        self._limit, self._run = limit, run
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = self._idle = 0

    def submit(self, job: _Job) -> None:
        with self._lock:
            start = self._idle == 0 and self._threads < self._limit
            if start:
                self._threads += 1
            else:
                self._idle -= 1  # this job takes an idle one (or waits for the next to finish)
        self._jobs.put(job)
        if start:
            threading.Thread(target=self._work, name="api-worker", daemon=True).start()

    def _work(self) -> None:
        job: _Job | None = None
        while True:
            if job is not None:
                self._run(job)
                with self._lock:
                    self._idle += 1
            try:
                job = self._jobs.get(timeout=60.0)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # nobody counts on this thread: end it
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue
            if job is None:
                return


def _raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards ``wanted`` (up to the hard limit); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    return int(soft) if soft != resource.RLIM_INFINITY else wanted


def _host_port(listen: str) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``"[V6]:PORT"`` -> (host without brackets, port). Raises ValueError for a bad port."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead daemon; refuse anything else at ``path``."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"api.listen: {path} exists and is not a socket; refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink()  # nobody listens: stale
            return
        except OSError as e:
            raise ConfigError(f"api.listen: cannot check {path}: {e.strerror or e}") from e
    raise ConfigError(f"api.listen: another process is serving on {path}")


class ApiServer:
    """The inference API on ``config.listen``, serving ``service``'s models and ``metrics``.

    ``idle_timeout``: seconds a keep-alive connection may wait for its next
    request; ``request_timeout``: seconds for the head and body once it
    started (plus a second per 64 KiB of declared body); ``drain_timeout``: how
    long :meth:`stop` lets requests in flight finish. ``tcp_nodelay=False``
    exists only to measure the Nagle pitfall (tools/bench_api.py). At most
    ``max_connections`` (default ``api.max_connections``, lowered to what
    RLIMIT_NOFILE allows) are open; then the slowest is evicted.
    """

    def __init__(self, config: ApiConfig, service: InferenceService, metrics: Metrics, *,
                 idle_timeout: float = 30.0, request_timeout: float = 30.0, drain_timeout: float = 10.0,
                 tcp_nodelay: bool = True, max_connections: int = 0, monitor: Monitor | None = None) -> None:
        self.config = config
        self.drain_timeout = drain_timeout
        self.max_connections = max_connections or config.max_connections
        self.idle_timeout, self.request_timeout, self.tcp_nodelay = idle_timeout, request_timeout, tcp_nodelay
        self._context = HandlerContext(config, service, metrics, monitor)
        self._intake: Intake | None = None
        self._thread: threading.Thread | None = None
        self._address: tuple[str, int] | None = None
        self._socket_path: Path | None = None
        self._socket_id: tuple[int, int] | None = None
        self._progress = Heartbeat()

    @property
    def progress(self) -> Heartbeat:
        """The intake loop's heartbeat: a loop blocked in a call stops it (edge_runtime.liveness)."""
        return self._intake.progress if self._intake is not None else self._progress

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Bind ``config.listen`` and serve from a daemon thread (no-op when started).

        A stale unix socket file (nobody listening) is removed first; any other
        file at that path is left alone. Raises RLIMIT_NOFILE's soft limit so
        ``max_connections`` sockets fit (lowering ``max_connections`` with a
        warning where the hard limit is lower).

        Raises:
            ConfigError: the address cannot be bound (in use, permission, bad
            host, missing directory) or another process serves the socket path.
        """
        if self._intake is not None:
            return
        listener = self._bind(self.config.listen)
        limit = _raise_fd_limit(2 * self.max_connections + _SPARE_FDS) - _SPARE_FDS  # lingering ones too
        connections = min(self.max_connections, max(16, limit // 2))
        if connections < self.max_connections:
            log.warning("API: RLIMIT_NOFILE allows %d connections, not %d (api.max_connections)",
                        connections, self.max_connections)
        self._context.stopping = False
        workers = _Workers(connections, self._answer)
        intake = Intake(listener, lambda conn, request: workers.submit(_Job(intake, conn, self._context, request)),
                        max_connections=connections, max_request_bytes=self.config.max_request_bytes,
                        idle_timeout=self.idle_timeout, request_timeout=self.request_timeout,
                        tcp_nodelay=self.tcp_nodelay)
        self._intake = intake
        self._thread = threading.Thread(target=intake.run, name="api-server", daemon=True)
        self._thread.start()
        log.debug("inference API listening on %s", self.url)

    def _bind(self, listen: str) -> socket.socket:
        try:
            if listen.startswith("unix:"):
                path = Path(listen[5:])
                _clear_stale_socket(path)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.bind(str(path))
                    path.chmod(0o660)  # before listen(): nobody can connect in between
                    sock.listen(_BACKLOG)
                except OSError:
                    sock.close()
                    raise
                st = path.lstat()
                self._socket_path, self._socket_id = path, (st.st_dev, st.st_ino)
                return sock
            host, port = _host_port(listen)
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart reuses the port at once
                sock.bind((host, port))
                sock.listen(_BACKLOG)
            except OSError:
                sock.close()
                raise
            bound = sock.getsockname()
            self._address = str(bound[0]), int(bound[1])
            return sock
        except (OSError, ValueError) as e:  # ValueError: a port that is no number (config not validated)
            raise ConfigError(f"api.listen {listen!r}: cannot listen: {getattr(e, 'strerror', None) or e}") from e

    def _answer(self, job: _Job) -> None:
        """A worker: answer ``job``'s request, then give its connection back to the intake."""
        conn, keep, unread = job.conn, False, True
        try:
            handler = ApiRequestHandler(conn.sock, conn.peer, job)  # type: ignore[arg-type]
            keep, unread = not handler.close_connection, handler.body_unread
        except OSError as e:  # the client went away mid-reply
            log.debug("API connection error: %s", e)
        except Exception:
            log.exception("API connection failed")
        job.intake.give_back(conn, keep and not self._context.stopping, unread)

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish, close everything (safe to call twice).

        Waits up to ``drain_timeout`` seconds for requests in flight (they answer
        with ``Connection: close``), then shuts every connection down, so idle
        keep-alive clients are not waited for; an intake loop blocked in a
        call is left behind (a daemon thread) after 2 s. Removes the unix
        socket file if it is still the one this server bound.
        """
        intake, thread = self._intake, self._thread
        if intake is None or thread is None:
            return
        self._context.stopping = True
        intake.stop_accepting()
        thread.join(2.0)  # a turning loop ends within a beat; no connection is accepted after this
        if thread.is_alive():
            log.warning("API serving loop is blocked (no progress for %.1f s); not waiting for it",
                        intake.progress.age())
            with contextlib.suppress(OSError):
                intake.listener.close()
        self._remove_socket_file()
        self._context.wait_idle(self.drain_timeout)
        for sock in intake.busy_sockets():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # a worker still writing gets an error and lets go
        self._progress = intake.progress
        self._intake = self._thread = None

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ state

    @property
    def alive(self) -> bool:
        """True while the intake thread is accepting connections."""
        return self._thread is not None and self._thread.is_alive() and not self._context.stopping

    @property
    def address(self) -> tuple[str, int] | str:
        """(host, port) actually bound (the real port when configured with 0), or the socket path."""
        if self.config.listen.startswith("unix:"):
            return self.config.listen[5:]
        return self._address or _host_port(self.config.listen)

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` or ``http+unix://<percent-encoded path>``, for logs and clients."""
        address = self.address
        if isinstance(address, str):
            return "http+unix://" + quote(address, safe="")
        host, port = address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def _remove_socket_file(self) -> None:
        path, ident = self._socket_path, self._socket_id
        self._socket_path = self._socket_id = None
        if path is None:
            return
        with contextlib.suppress(OSError):
            st = path.lstat()
            if (st.st_dev, st.st_ino) == ident:  # not a socket another process has bound since
                path.unlink()

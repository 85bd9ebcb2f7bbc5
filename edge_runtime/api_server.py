"""The local inference API: Open Inference Protocol (KServe v2) paths over HTTP/1.1.

:class:`ApiServer` listens on TCP (``api.listen = "HOST:PORT"``, port 0 picks
a free one) or on a unix socket (``"unix:/PATH"``) and runs every model
through :class:`~edge_runtime.serving.InferenceService`, so API inferences
count in the metrics, readiness and probation like any other::

    GET  /v2/health/live | /v2/health/ready     {"live": true} / {"ready": ...} (503 until a good inference)
    GET  /v2                                    server metadata
    GET  /v2/models/<name>[/versions/<v>]       model metadata
    GET  /v2/models/<name>[/versions/<v>]/ready
    POST /v2/models/<name>[/versions/<v>]/infer JSON or binary tensors (api_codec), or a raw
                                                JPEG/PNG/.npy body -> the model's pre/post-processing
    GET  /metrics                               Prometheus text

Built on the stdlib ``http.server`` with keep-alive. Limits: bodies need a
Content-Length of at most ``api.max_request_bytes`` (413/411 before reading),
at most ``api.max_concurrency`` inferences run at once (more get 503 with
Retry-After), connections are capped, and each connection gets a deadline for
the next request line (idle keep-alive) and one for headers + body (slow
clients), so no client can pin threads forever. Errors are ``{"error": "<one
line>"}``; request bodies are never logged; the access log is DEBUG.

This module binds, runs and stops the server and caps connections; requests
are handled by :class:`~edge_runtime.api_handler.ApiRequestHandler`.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import socket
import socketserver
import stat
import sys
import threading
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

from .api_codec import encode_error
from .api_handler import ApiRequestHandler, HandlerContext
from .config import ApiConfig
from .errors import ConfigError
from .metrics import Metrics
from .progress import Heartbeat
from .serving import InferenceService

__all__ = ["ApiServer"]

log = logging.getLogger(__name__)

_BUSY = encode_error("too many connections; retry later")
_BUSY_RESPONSE = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(_BUSY)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode() + _BUSY


class _ServerMixin(socketserver.ThreadingMixIn):
    """Connection bookkeeping shared by the TCP and unix servers."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 64
    api: ApiServer
    context: HandlerContext  # read by ApiRequestHandler

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.api._connection_opened(request):
            with contextlib.suppress(OSError):
                request.settimeout(0.5)
                request.sendall(_BUSY_RESPONSE)
            cast(socketserver.BaseServer, super()).shutdown_request(request)
            return
        super().process_request(request, client_address)

    def service_actions(self) -> None:
        self.api.progress.beat()  # serve_forever calls this every turn of its loop (poll_interval 0.1 s)

    def shutdown_request(self, request: Any) -> None:
        self.api._connection_closed(request)
        cast(socketserver.BaseServer, super()).shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # the client went away mid-request
            log.debug("API connection error: %s", error)
        else:
            log.exception("API connection failed")


class _TcpServer(_ServerMixin, http.server.HTTPServer):
    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # skip HTTPServer's getfqdn(): a DNS lookup at start-up
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _Tcp6Server(_TcpServer):
    address_family = socket.AF_INET6


class _UnixServer(_ServerMixin, socketserver.UnixStreamServer):
    def server_bind(self) -> None:
        super().server_bind()
        Path(str(self.server_address)).chmod(0o660)  # before listen(): nobody can connect in between


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
    request line; ``request_timeout``: seconds for the headers and body once
    it started; ``drain_timeout``: how long :meth:`stop` lets requests in
    flight finish. ``tcp_nodelay=False`` exists only to measure the Nagle
    pitfall (tools/bench_api.py). At most ``max_connections`` (default
    ``4 * max_concurrency + 16``) connections are open; more get a 503.
    """

    def __init__(self, config: ApiConfig, service: InferenceService, metrics: Metrics, *,
                 idle_timeout: float = 30.0, request_timeout: float = 30.0, drain_timeout: float = 10.0,
                 tcp_nodelay: bool = True, max_connections: int = 0) -> None:
        self.config = config
        self.drain_timeout = drain_timeout
        self.max_connections = max_connections or 4 * config.max_concurrency + 16
        self._context = HandlerContext(config, service, metrics, idle_timeout=idle_timeout,
                                       request_timeout=request_timeout, tcp_nodelay=tcp_nodelay)
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server: _TcpServer | _UnixServer | None = None
        self._thread: threading.Thread | None = None
        self._socket_path: Path | None = None
        self._socket_id: tuple[int, int] | None = None
        self.progress = Heartbeat()  # the serving loop's: a stuck accept loop stops it (edge_runtime.liveness)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Bind ``config.listen`` and serve from a daemon thread (no-op when started).

        A stale unix socket file (nobody listening) is removed first; any other
        file at that path is left alone.

        Raises:
            ConfigError: the address cannot be bound (in use, permission, bad
            host, missing directory) or another process serves the socket path.
        """
        if self._server is not None:
            return
        listen = self.config.listen
        self._context.stopping = False
        try:
            if listen.startswith("unix:"):
                path = Path(listen[5:])
                _clear_stale_socket(path)
                server: _TcpServer | _UnixServer = _UnixServer(str(path), ApiRequestHandler)
                st = path.lstat()
                self._socket_path, self._socket_id = path, (st.st_dev, st.st_ino)
            else:
                host, port = _host_port(listen)
                server = (_Tcp6Server if ":" in host else _TcpServer)((host, port), ApiRequestHandler)
        except (OSError, ValueError) as e:  # ValueError: a port that is no number (config not validated)
            raise ConfigError(f"api.listen {listen!r}: cannot listen: {getattr(e, 'strerror', None) or e}") from e
        server.api, server.context = self, self._context
        self._server = server
        self.progress.beat()
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="api-server", daemon=True)
        self._thread.start()
        log.debug("inference API listening on %s", self.url)

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish, close everything (safe to call twice).

        Waits up to ``drain_timeout`` seconds for requests in flight (they answer
        with ``Connection: close``), then shuts every connection down, so idle
        keep-alive clients are not waited for; a serving loop blocked in a
        call is left behind (a daemon thread) after 2 s. Removes the unix
        socket file if it is still the one this server bound.
        """
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._context.stopping = True
        # shutdown() waits for the serving loop to turn; a loop blocked in a call never does, so ask from
        # another thread and wait a bounded time (liveness has withheld the watchdog for it already).
        threading.Thread(target=server.shutdown, name="api-shutdown", daemon=True).start()
        thread.join(2.0)  # a turning loop ends within its poll_interval; no connection is accepted after this
        if thread.is_alive():
            log.warning("API serving loop is blocked (no progress for %.1f s); not waiting for it",
                        self.progress.age())
        server.server_close()
        self._remove_socket_file()
        self._context.wait_idle(self.drain_timeout)
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked reading it
        self._server = self._thread = None

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ state

    @property
    def alive(self) -> bool:
        """True while the server thread is accepting connections."""
        return self._thread is not None and self._thread.is_alive() and not self._context.stopping

    @property
    def address(self) -> tuple[str, int] | str:
        """(host, port) actually bound (the real port when configured with 0), or the socket path."""
        if self.config.listen.startswith("unix:"):
            return self.config.listen[5:]
        if self._server is not None:
            bound = cast("tuple[str, int]", self._server.server_address)
            return str(bound[0]), int(bound[1])
        return _host_port(self.config.listen)

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` or ``http+unix://<percent-encoded path>``, for logs and clients."""
        address = self.address
        if isinstance(address, str):
            return "http+unix://" + quote(address, safe="")
        host, port = address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    # ------------------------------------------------------------------ connections (server threads)

    def _connection_opened(self, conn: socket.socket) -> bool:
        """Track ``conn``; False (refuse it) when ``max_connections`` are open."""
        with self._lock:
            if len(self._connections) >= self.max_connections:
                return False
            self._connections.add(conn)
            return True

    def _connection_closed(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)

    def _remove_socket_file(self) -> None:
        path, ident = self._socket_path, self._socket_id
        self._socket_path = self._socket_id = None
        if path is None:
            return
        with contextlib.suppress(OSError):
            st = path.lstat()
            if (st.st_dev, st.st_ino) == ident:  # not a socket another process has bound since
                path.unlink()

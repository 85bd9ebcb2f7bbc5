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
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import io
import logging
import re
import socket
import socketserver
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, unquote, urlsplit

from . import __version__
from .api_codec import (
    decode_infer_request,
    dumps,
    encode_error,
    encode_infer_response,
    encode_model_metadata,
    encode_prediction,
    status_of,
)
from .config import ApiConfig
from .errors import CacheError, ConfigError, EdgeRuntimeError, InputError
from .loaded_model import LoadedModel
from .metrics import Metrics
from .preprocess import is_npy
from .serving import InferenceService

__all__ = ["ApiServer"]

log = logging.getLogger(__name__)
_access = logging.getLogger(__name__ + ".access")

_MODEL_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<tail>/ready|/infer)?")
_JSON = "application/json"
_BINARY = "application/octet-stream"
_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
_NPY_TYPES = frozenset({_BINARY, "application/x-npy"})
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png"})
_HEADER_LENGTH = "Inference-Header-Content-Length"
_BUFFER = 64 << 10
_MAX_LINE, _MAX_HEADERS = 65536, 100  # the stdlib's limits
_SERVER = f"edge-runtime/{__version__}"
_SERVER_METADATA = dumps({"name": "edge-runtime", "version": __version__, "extensions": ["binary_tensor_data"]})


class _Reply(Exception):
    """Stop handling a request and answer ``status`` with a one-line JSON error. Never leaves this module."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers


_RETRY = {"Retry-After": "1"}
_BUSY = encode_error("too many connections; retry later")
_BUSY_RESPONSE = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {_JSON}\r\nContent-Length: {len(_BUSY)}\r\n"
                  "Retry-After: 1\r\nConnection: close\r\n\r\n").encode() + _BUSY


class _DeadlineReader(io.RawIOBase):
    """Socket reads that raise TimeoutError once ``deadline`` (monotonic seconds) has passed.

    A plain socket timeout bounds each recv, so a client trickling one byte per
    timeout could hold a thread forever; a deadline bounds the whole request.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.deadline = 0.0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    api: ApiServer
    _reader: _DeadlineReader
    _pending_body = False  # a body not (yet) read: the connection cannot carry another request
    _expect_continue = False

    def setup(self) -> None:
        self.connection = self.request
        self.api = cast(_ServerMixin, self.server).api
        if self.api.tcp_nodelay and self.connection.family in (socket.AF_INET, socket.AF_INET6):
            # The stdlib's disable_nagle_algorithm, minus AF_UNIX (no TCP options there). Without it a
            # keep-alive client waits ~40 ms per request: Nagle holds our reply until its delayed ACK.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader, _BUFFER)
        self.wfile = self.connection.makefile("wb", _BUFFER)

    def handle_one_request(self) -> None:
        self._pending_body = self._expect_continue = False
        self.command, self.request_version = "", "HTTP/1.1"  # for error replies before the request line parsed
        self._reader.deadline = time.monotonic() + self.api.idle_timeout
        super().handle_one_request()

    def parse_request(self) -> bool:
        """The request line and headers by the stdlib's rules, without its email parser (~70 us a request)."""
        self._reader.deadline = time.monotonic() + self.api.request_timeout  # headers + body, from the request line
        self._pending_body = self.close_connection = True  # until the headers say otherwise
        raw: bytes = getattr(self, "raw_requestline", b"")  # set by handle_one_request (untyped in typeshed)
        self.requestline = str(raw, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3 or words[2] not in ("HTTP/1.1", "HTTP/1.0"):
            status = 505 if len(words) == 3 and words[2].startswith("HTTP/") else 400
            self.send_error(status, f"bad request line {self.requestline[:60]!r}")
            return False
        self.command, self.path, self.request_version = words
        headers = http.client.HTTPMessage()
        for _ in range(_MAX_HEADERS):
            line = self.rfile.readline(_MAX_LINE + 1)
            if len(line) > _MAX_LINE:
                self.send_error(431, "header line too long")
                return False
            if line in (b"\r\n", b"\n", b""):
                break
            name, colon, value = line.decode("iso-8859-1").partition(":")
            if not colon or not name or name != name.strip():  # includes obsolete line folding
                self.send_error(400, f"malformed header line {line[:40]!r}")
                return False
            headers[name] = value.strip()
        else:
            self.send_error(431, "too many headers")
            return False
        self.headers = headers
        connection = headers.get("Connection", "").lower()
        self.close_connection = connection == "close" or self.request_version == "HTTP/1.0"
        self._pending_body = "Transfer-Encoding" in headers or headers.get("Content-Length", "0").strip() != "0"
        # "100 Continue" only after the request passed its checks (_read_body).
        self._expect_continue = headers.get("Expect", "").lower() == "100-continue"
        return True

    # ------------------------------------------------------------------ responses

    def _send(self, status: int, body: bytes, content_type: str = _JSON, headers: dict[str, str] | None = None,
              ) -> None:
        """One response, written in one piece (a small one leaves in one segment)."""
        lines = [f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}", f"Server: {_SERVER}",
                 f"Date: {self.date_time_string()}", f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
        if self._pending_body or self.close_connection or self.api._stopping:
            lines.append("Connection: close")
            self.close_connection = True
        self.log_request(status)
        self.connection.settimeout(self.api.idle_timeout)
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("iso-8859-1") + (
            b"" if self.command == "HEAD" else body))
        self.wfile.flush()  # on the wire before the request counts as finished (stop() then closes sockets)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own rejections (request line too long, unknown method, ...) as JSON errors."""
        self.log_error("code %d, message %s", code, message)
        self._pending_body = True
        self._send(code, encode_error(message or self.responses.get(code, ("error",))[0]))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        _access.debug("%s %r %s", self._client(), self.requestline, code)

    def log_message(self, format: str, *args: Any) -> None:
        _access.debug("%s %s", self._client(), format % args)

    def _client(self) -> str:
        peer = self.client_address
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"  # AF_UNIX peers have no address

    # ------------------------------------------------------------------ routing

    def do_GET(self) -> None:
        self.api._request_started()
        try:
            self._route(unquote(urlsplit(self.path).path))
        except _Reply as r:
            self._send(r.status, encode_error(str(r)), headers=r.headers)
        except EdgeRuntimeError as e:
            status = status_of(e)
            self._send(status, encode_error(e.one_line()), headers=_RETRY if status == 503 else None)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
            raise  # the client went away: nobody to answer (handle_error logs it at DEBUG)
        except Exception:
            log.exception("API: %s %r failed", self.command, self.path[:200])
            self._send(500, encode_error("internal error (see the daemon log)"))
        finally:
            self.api._request_finished()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _route(self, path: str) -> None:
        fixed = _FIXED_PATHS.get(path)
        if fixed is not None:
            self._allow("GET")
            return fixed(self)
        match = _MODEL_PATH.fullmatch(path)
        if match is None:
            raise _Reply(404, f"no such endpoint: {path}")
        name, version, tail = match["name"], match["version"], match["tail"]
        if tail == "/infer":
            self._allow("POST")
            return self._infer(name, version)
        self._allow("GET")
        model = self._serving(name, version)
        if tail == "/ready":
            return self._send(200, dumps({"name": name, "ready": True}))
        return self._send(200, encode_model_metadata(model))

    def _allow(self, method: str) -> None:
        if self.command != method and not (method == "GET" and self.command == "HEAD"):
            raise _Reply(405, f"{self.command} is not allowed here; use {method}", headers={"Allow": method})

    def _live(self) -> None:
        self._send(200, b'{"live":true}')

    def _ready(self) -> None:
        ready = self.api.service.ready
        self._send(200 if ready else 503, dumps({"ready": ready}), headers=None if ready else _RETRY)

    def _server_metadata(self) -> None:
        self._send(200, _SERVER_METADATA)

    def _metrics(self) -> None:
        self._send(200, self.api.metrics.render_prometheus().encode(), _PROMETHEUS)

    def _serving(self, name: str, version: str | None) -> LoadedModel:
        """The model serving ``name`` (404: unknown name or another version; 503: not loaded yet)."""
        model = self.api.service.slot(name).model  # CacheError (404) for an unknown name
        if model is None:
            raise _Reply(503, f"model {name!r} is not loaded yet", headers=_RETRY)
        if version is not None and version != str(model.version):
            raise _Reply(404, f"model {name!r} serves version {model.version}, not {version}")
        return model

    # ------------------------------------------------------------------ inference

    def _infer(self, name: str, version: str | None) -> None:
        model = self._serving(name, version)
        length = self._content_length()
        if not self.api._inference_slots.acquire(blocking=False):
            raise _Reply(503, f"busy: {self.api.config.max_concurrency} inferences in flight (api.max_concurrency)",
                         headers=_RETRY)
        try:
            body = self._read_body(length)
            binary = _HEADER_LENGTH in self.headers
            content_type = self.headers.get_content_type()
            try:
                if not binary and (content_type in _IMAGE_TYPES or (content_type in _NPY_TYPES and is_npy(body))):
                    served, prediction = self.api.service.predict_bytes(name, body)
                    _check_version(name, version, served)
                    return self._send(200, encode_prediction(name, served, prediction))
                if content_type in _NPY_TYPES and not binary:
                    raise InputError(f"a {content_type} body must be a .npy tensor, or carry {_HEADER_LENGTH}")
                self._tensors(name, version, model, body)
            except CacheError as e:  # the slot was emptied (daemon stopping) after _serving looked
                raise _Reply(503, e.one_line(), headers=_RETRY) from None
        finally:
            self.api._inference_slots.release()

    def _tensors(self, name: str, version: str | None, model: LoadedModel, body: bytes) -> None:
        raw = self.headers.get(_HEADER_LENGTH)
        if raw is not None and not (raw.isascii() and raw.strip().isdigit()):
            raise InputError(f"{_HEADER_LENGTH} must be a byte count")
        request = decode_infer_request(body, None if raw is None else int(raw),
                                       {t.name: t for t in model.backend.inputs},
                                       [t.name for t in model.backend.outputs])
        served, outputs = self.api.service.infer(name, request.inputs)
        _check_version(name, version, served)
        reply, json_length = encode_infer_response(name, served, request, outputs)
        if json_length is None:
            return self._send(200, reply)
        self._send(200, reply, _BINARY, {_HEADER_LENGTH: str(json_length)})

    def _content_length(self) -> int:
        """The body's length, checked before any of it is read (411/413/400)."""
        if "Transfer-Encoding" in self.headers:
            raise _Reply(411, "chunked request bodies are not supported; send Content-Length")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise _Reply(411, "Content-Length is required")
        value = values[0].strip()
        if len(values) > 1 or not (value.isascii() and value.isdigit()):
            raise _Reply(400, "invalid Content-Length")
        length, cap = int(value), self.api.config.max_request_bytes
        if length > cap:
            raise _Reply(413, f"request body of {length} bytes exceeds the {cap}-byte limit (api.max_request_bytes)")
        return length

    def _read_body(self, length: int) -> bytes:
        if self._expect_continue:
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise _Reply(408, "request body not received in time") from None
        if len(body) != length:
            raise _Reply(400, "request body is shorter than its Content-Length")
        self._pending_body = False
        return body


_FIXED_PATHS: dict[str, Callable[[_Handler], None]] = {
    "/v2/health/live": _Handler._live,
    "/v2/health/ready": _Handler._ready,
    "/v2": _Handler._server_metadata,
    "/metrics": _Handler._metrics,
}


def _check_version(name: str, wanted: str | None, served: int) -> None:
    # A swap between the version check and the run: do not label another version's result as ``wanted``.
    if wanted is not None and wanted != str(served):
        raise _Reply(404, f"model {name!r} switched to version {served} during the request")


class _ServerMixin(socketserver.ThreadingMixIn):
    """Connection bookkeeping shared by the TCP and unix servers."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 64
    api: ApiServer

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.api._connection_opened(request):
            with contextlib.suppress(OSError):
                request.settimeout(0.5)
                request.sendall(_BUSY_RESPONSE)
            cast(socketserver.BaseServer, super()).shutdown_request(request)
            return
        super().process_request(request, client_address)

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
        self.service = service
        self.metrics = metrics
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.drain_timeout = drain_timeout
        self.tcp_nodelay = tcp_nodelay
        self.max_connections = max_connections or 4 * config.max_concurrency + 16
        self._inference_slots = threading.BoundedSemaphore(config.max_concurrency)
        self._stopping = False
        self._cond = threading.Condition()
        self._in_flight = 0
        self._connections: set[socket.socket] = set()
        self._server: _TcpServer | _UnixServer | None = None
        self._thread: threading.Thread | None = None
        self._socket_path: Path | None = None
        self._socket_id: tuple[int, int] | None = None

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
        self._stopping = False
        try:
            if listen.startswith("unix:"):
                path = Path(listen[5:])
                _clear_stale_socket(path)
                server: _TcpServer | _UnixServer = _UnixServer(str(path), _Handler)
                st = path.lstat()
                self._socket_path, self._socket_id = path, (st.st_dev, st.st_ino)
            else:
                host, _, port = listen.rpartition(":")
                host = host.strip("[]")
                server = (_Tcp6Server if ":" in host else _TcpServer)((host, int(port)), _Handler)
        except (OSError, ValueError) as e:  # ValueError: a port that is no number (config not validated)
            raise ConfigError(f"api.listen {listen!r}: cannot listen: {getattr(e, 'strerror', None) or e}") from e
        server.api = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="api-server", daemon=True)
        self._thread.start()
        log.debug("inference API listening on %s", self.url)

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish, close everything (safe to call twice).

        Waits up to ``drain_timeout`` seconds for requests in flight (they answer
        with ``Connection: close``), then shuts every connection down, so idle
        keep-alive clients are not waited for. Removes the unix socket file if
        it is still the one this server bound.
        """
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping = True
        server.shutdown()
        thread.join()
        server.server_close()
        self._remove_socket_file()
        with self._cond:
            self._cond.wait_for(lambda: self._in_flight == 0, timeout=self.drain_timeout)
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
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def address(self) -> tuple[str, int] | str:
        """(host, port) actually bound (the real port when configured with 0), or the socket path."""
        if self.config.listen.startswith("unix:"):
            return self.config.listen[5:]
        if self._server is not None:
            bound = cast("tuple[str, int]", self._server.server_address)
            return str(bound[0]), int(bound[1])
        host, _, port = self.config.listen.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` or ``http+unix://<percent-encoded path>``, for logs and clients."""
        address = self.address
        if isinstance(address, str):
            return "http+unix://" + quote(address, safe="")
        host, port = address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    # ------------------------------------------------------------------ bookkeeping (handler threads)

    def _request_started(self) -> None:
        with self._cond:
            self._in_flight += 1

    def _request_finished(self) -> None:
        with self._cond:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._cond.notify_all()

    def _connection_opened(self, conn: socket.socket) -> bool:
        """Track ``conn``; False (refuse it) when ``max_connections`` are open."""
        with self._cond:
            if len(self._connections) >= self.max_connections:
                return False
            self._connections.add(conn)
            return True

    def _connection_closed(self, conn: socket.socket) -> None:
        with self._cond:
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

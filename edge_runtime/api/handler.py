"""The inference API's request handler: HTTP/1.1 parsing, routing and the OIP endpoints.

:class:`ApiRequestHandler` answers one complete request that the intake
(:mod:`edge_runtime.api.intake`) received for an
:class:`~edge_runtime.api.server.ApiServer`, reading what it shares with its
server from a :class:`HandlerContext`: settings, the stopping flag, the
inference slots (``api.max_concurrency``) and the count of requests in flight.
Deadlines for slow clients are the intake's; bodies need a Content-Length within
``api.max_request_bytes``. Errors are ``{"error": "<one line>"}``; request
bodies are never logged; the access log is DEBUG.
"""

from __future__ import annotations

import http.client
import http.server
import io
import logging
import re
import threading
from collections.abc import Callable
from typing import Any, Protocol, cast
from urllib.parse import parse_qs, unquote, urlsplit

from edge_runtime import __version__
from edge_runtime.api.codec import (
    decode_infer_request,
    dumps,
    encode_error,
    encode_infer_response,
    encode_model_metadata,
    encode_prediction,
    status_of,
)
from edge_runtime.config.model import ApiConfig
from edge_runtime.errors import EdgeRuntimeError, InputError, ModelNotLoadedError
from edge_runtime.monitoring.monitor import MAX_TRUTH_BYTES, Monitor
from edge_runtime.runtime.loaded_model import LoadedModel
from edge_runtime.runtime.preprocess import is_npy
from edge_runtime.runtime.service import InferenceService
from edge_runtime.telemetry.metrics import Metrics

__all__ = ["ApiRequestHandler", "HandlerContext"]

# The API's logger names from before the handler had its own module (log configs name them).
log = logging.getLogger("edge_runtime.api.server")
_access = logging.getLogger("edge_runtime.api.server.access")

_MODEL_PATH = re.compile(
    r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<tail>/ready|/infer|/truth)?")
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


class HandlerContext:
    """What an ApiServer shares with its handler threads.

    Settings (``config``, ``service``, ``metrics``), ``stopping`` (answers then carry ``Connection: close``),
    the inference slots, and the count of requests in flight that
    :meth:`wait_idle` waits on.
    """

    def __init__(self, config: ApiConfig, service: InferenceService, metrics: Metrics,
                 monitor: Monitor | None = None) -> None:
        self.config = config
        self.service = service
        self.metrics = metrics
        self.monitor = monitor
        self.stopping = False
        self.inference_slots = threading.BoundedSemaphore(config.max_concurrency)
        self._cond = threading.Condition()
        self._in_flight = 0

    def request_started(self) -> None:
        with self._cond:
            self._in_flight += 1

    def request_finished(self) -> None:
        with self._cond:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._cond.notify_all()

    def wait_idle(self, timeout: float) -> None:
        """Return once no request is in flight, or after ``timeout`` seconds."""
        with self._cond:
            self._cond.wait_for(lambda: self._in_flight == 0, timeout=timeout)


class _Job(Protocol):
    """What a handler is given for one request (api_server's job): the context and the request's bytes."""

    context: HandlerContext
    request: bytes


class ApiRequestHandler(http.server.BaseHTTPRequestHandler):
    """One complete request of the inference API, received by the intake (api.intake); answers it and returns.

    The intake has received the head and the body (up to a Content-Length the
    handler accepts) before a worker runs this, so it never waits for the client.
    Afterwards :attr:`close_connection` says whether the connection may carry
    another request, and :attr:`body_unread` whether the client may still be
    sending a body that was refused before it was read (the intake lingers then).
    """

    protocol_version = "HTTP/1.1"  # keep-alive
    context: HandlerContext
    _pending_body = False  # a body not read: the connection cannot carry another request

    def setup(self) -> None:
        self.connection = self.request
        job = cast(_Job, self.server)
        self.context = job.context
        self.rfile = io.BytesIO(job.request)
        self.wfile = self.connection.makefile("wb", _BUFFER)

    def handle(self) -> None:
        self.handle_one_request()  # one request: the intake keeps the connection between requests

    @property
    def body_unread(self) -> bool:
        """True when the reply went out before the request's body was read."""
        return self._pending_body

    def handle_one_request(self) -> None:
        self._pending_body = False
        self.command, self.request_version = "", "HTTP/1.1"  # for error replies before the request line parsed
        super().handle_one_request()

    def parse_request(self) -> bool:
        """The request line and headers by the stdlib's rules, without its email parser (~70 us a request)."""
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
        return True

    # ------------------------------------------------------------------ responses

    def _send(self, status: int, body: bytes, content_type: str = _JSON, headers: dict[str, str] | None = None,
              ) -> None:
        """One response, written in one piece (a small one leaves in one segment)."""
        lines = [f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}", f"Server: {_SERVER}",
                 f"Date: {self.date_time_string()}", f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
        if self._pending_body or self.close_connection or self.context.stopping:
            lines.append("Connection: close")
            self.close_connection = True
        self.log_request(status)
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
        self.context.request_started()
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
            self.context.request_finished()

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
        if tail == "/truth":
            self._allow("POST")
            return self._truth(name, version)
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
        ready = self.context.service.ready
        self._send(200 if ready else 503, dumps({"ready": ready}), headers=None if ready else _RETRY)

    def _server_metadata(self) -> None:
        self._send(200, _SERVER_METADATA)

    def _metrics(self) -> None:
        self._send(200, self.context.metrics.render_prometheus().encode(), _PROMETHEUS)

    def _serving(self, name: str, version: str | None) -> LoadedModel:
        """The model serving ``name`` (404: unknown name or another version; 503: not loaded yet)."""
        model = self.context.service.slot(name).model  # ModelNotServedError (404) for an unknown name
        if model is None:
            raise ModelNotLoadedError(name, f"model {name!r} is not loaded yet")
        if version is not None and version != str(model.version):
            raise _Reply(404, f"model {name!r} serves version {model.version}, not {version}")
        return model

    # ------------------------------------------------------------------ inference

    def _infer(self, name: str, version: str | None) -> None:
        model = self._serving(name, version)
        body = self._read_body(self._content_length())  # already received: the slot waits for nobody
        if not self.context.inference_slots.acquire(blocking=False):
            raise _Reply(503, f"busy: {self.context.config.max_concurrency} inferences in flight (api.max_concurrency)",
                         headers=_RETRY)
        try:
            binary = _HEADER_LENGTH in self.headers
            content_type = self.headers.get_content_type()
            # A slot emptied after _serving looked (daemon stopping) raises ModelNotLoadedError: 503.
            if not binary and (content_type in _IMAGE_TYPES or (content_type in _NPY_TYPES and is_npy(body))):
                served, prediction = self.context.service.predict_bytes(name, body, with_mask=self._mask_asked())
                _check_version(name, version, served)
                response: tuple[bytes, str, dict[str, str]] = (encode_prediction(name, served, prediction),
                                                               _JSON, {})
            else:
                if content_type in _NPY_TYPES and not binary:
                    raise InputError(f"a {content_type} body must be a .npy tensor, or carry {_HEADER_LENGTH}")
                response = self._tensors(name, version, model, body)
        finally:
            self.context.inference_slots.release()
        # Written once the slot is free: a client that sends its next request the moment this
        # reply arrives must not be told the server is busy with this one.
        self._send(200, *response)

    def _mask_asked(self) -> bool:
        """``?mask=png`` on a raw image request: the segmentation mask comes back as base64 PNG."""
        query = parse_qs(urlsplit(self.path).query, keep_blank_values=True)
        unknown = sorted(set(query) - {"mask"})
        if unknown:
            raise InputError(f"unknown query parameter {unknown[0]!r} (only mask=png)")
        values = query.get("mask", [])
        if values and values != ["png"]:
            raise InputError(f"mask={values[0]!r}: the only mask format is png")
        return bool(values)

    def _tensors(self, name: str, version: str | None, model: LoadedModel, body: bytes,
                 ) -> tuple[bytes, str, dict[str, str]]:
        raw = self.headers.get(_HEADER_LENGTH)
        if raw is not None and not (raw.isascii() and raw.strip().isdigit()):
            raise InputError(f"{_HEADER_LENGTH} must be a byte count")
        request = decode_infer_request(body, None if raw is None else int(raw),
                                       {t.name: t for t in model.backend.inputs},
                                       [t.name for t in model.backend.outputs],
                                       max_tensor_bytes=model.limits.max_image_bytes)
        served, outputs = self.context.service.infer(name, request.inputs)
        _check_version(name, version, served)
        # Asked for: the bundle's own decoding of these outputs (a tensor has no source image: input pixels).
        results = model.postprocessor(model.dequantized(outputs), [None]) if request.postprocess else None
        reply, json_length = encode_infer_response(name, served, request, outputs, results)
        if json_length is None:
            return reply, _JSON, {}
        return reply, _BINARY, {_HEADER_LENGTH: str(json_length)}

    def _truth(self, name: str, version: str | None) -> None:
        """Ground truth for earlier results of ``name`` (``{"result_id", "label"|"boxes"}`` or a list of them)."""
        monitor = self.context.monitor
        if monitor is None:
            raise _Reply(404, "monitoring is off on this device ([monitoring] enabled = false)")
        self.context.service.slot(name)  # 404 for a model not served here
        if version is not None:
            raise _Reply(404, "truth is matched by result_id: post it to /v2/models/<name>/truth")
        length = self._content_length()
        if length > MAX_TRUTH_BYTES:
            raise _Reply(413, f"truth body of {length} bytes exceeds the {MAX_TRUTH_BYTES}-byte limit")
        outcomes = monitor.add_truth(self._read_body(length), model=name)
        self._send(200, dumps({"model": name, "truths": outcomes}))

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
        length, cap = int(value), self.context.config.max_request_bytes
        if length > cap:
            raise _Reply(413, f"request body of {length} bytes exceeds the {cap}-byte limit (api.max_request_bytes)")
        return length

    def _read_body(self, length: int) -> bytes:
        body = self.rfile.read(length)  # the intake received it (a checked Content-Length), or timed it out
        if len(body) != length:
            raise _Reply(400, "request body is shorter than its Content-Length")
        self._pending_body = False
        return body


_FIXED_PATHS: dict[str, Callable[[ApiRequestHandler], None]] = {
    "/v2/health/live": ApiRequestHandler._live,
    "/v2/health/ready": ApiRequestHandler._ready,
    "/v2": ApiRequestHandler._server_metadata,
    "/metrics": ApiRequestHandler._metrics,
}


def _check_version(name: str, wanted: str | None, served: int) -> None:
    # A swap between the version check and the run: do not label another version's result as ``wanted``.
    if wanted is not None and wanted != str(served):
        raise _Reply(404, f"model {name!r} switched to version {served} during the request")

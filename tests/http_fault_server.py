"""A real HTTP(S) server on loopback that misbehaves on purpose, path by path.

Used by the fetcher tests and, later, the daemon's OTA tests::

    routes = {"/b.bin": Route(body=data, fault="cut", cut_after=1000, times=1)}
    with FaultServer(routes) as srv:
        fetcher.fetch_to_file(srv.url("/b.bin"), dest, max_bytes=1 << 20)
    assert srv.seen("/b.bin")[1].headers["Range"] == "bytes=1000-"

Faults (``Route.fault``), applied to the first ``times`` requests of the path
(every request when ``times`` is None), normal service after that:

- ``none``: the body, honouring ``Range: bytes=N-`` (206 + Content-Range) and
  ``If-Range`` against the ETag (``ranges=False`` ignores Range: always 200);
- ``cut``: announce the full length, send ``cut_after`` body bytes, hang up;
- ``drip``: one body byte every ``drip_seconds`` (``drip_headers``: the status
  line and headers too);
- ``lie_length``: announce ``claimed_length`` bytes, send the body, hang up;
- ``no_length``: no Content-Length: ``chunked``, else close-delimited;
- ``status``: answer ``status`` (500, 404, 429, ...) with a short body;
- ``redirect``: 302 to ``location`` (a path or an absolute URL).

``headers`` replace or add response headers of a normal (``none``) answer,
sent as latin-1 bytes the way a hostile server would (``Content-Length: ²``).

Unknown paths get 404. Routes can be swapped while the server runs
(``srv.routes[path] = Route(...)``). Every request is recorded in ``requests``.
:func:`make_tls` writes a throwaway CA and server certificate for ``tls=``.
"""

from __future__ import annotations

import hashlib
import re
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["FaultServer", "Route", "Seen", "TlsFiles", "make_tls"]

FAULTS = ("none", "cut", "drip", "lie_length", "no_length", "status", "redirect")
_RANGE_RE = re.compile(r"bytes=(\d+)-")


@dataclass
class Route:
    """How one path answers; see the module doc for the faults."""

    body: bytes = b""
    fault: str = "none"
    times: int | None = None
    cut_after: int = 0
    drip_seconds: float = 0.5
    drip_headers: bool = False
    status: int = 500
    location: str = ""
    claimed_length: int = 10 << 30
    chunked: bool = False
    ranges: bool = True
    headers: dict[str, str] = field(default_factory=dict)
    hits: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        assert self.fault in FAULTS, self.fault

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.body).hexdigest()[:16] + '"'


@dataclass(frozen=True)
class Seen:
    """One request as the server received it."""

    path: str
    headers: dict[str, str]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA a client should trust, and the server's chain and key."""

    ca: Path
    cert: Path
    key: Path


class FaultServer:
    """ThreadingHTTPServer on 127.0.0.1, an ephemeral port, in a daemon thread."""

    def __init__(self, routes: Mapping[str, Route] | None = None, *, tls: TlsFiles | None = None) -> None:
        self.routes: dict[str, Route] = dict(routes or {})
        self.requests: list[Seen] = []
        self.tls_failures = 0  # handshakes refused by the client (or broken)
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None
        if tls is not None:
            self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._context.load_cert_chain(tls.cert, tls.key)
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def scheme(self) -> str:
        return "https" if self._context else "http"

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def seen(self, path: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.requests if s.path == path]

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()  # ends drips still running in handler threads
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def _route(self, handler: _Handler) -> tuple[Route | None, bool]:
        """Record the request; return its route and whether the fault applies to it."""
        path = handler.path.split("?", 1)[0]
        with self._lock:
            self.requests.append(Seen(path, dict(handler.headers.items())))
            route = self.routes.get(path)
            if route is None:
                return None, False
            route.hits += 1
            return route, route.times is None or route.hits <= route.times


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: FaultServer

    def finish_request(self, request: Any, client_address: Any) -> None:
        context = self.owner._context
        if context is not None:
            # Handshake in the handler thread, so a stalled client cannot block accept().
            request.settimeout(10)
            try:
                request = context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                with self.owner._lock:
                    self.owner.tls_failures += 1
                return
            try:
                super().finish_request(request, client_address)
            finally:
                request.close()  # the caller shuts down only the raw socket it handed us
            return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client hanging up mid-fault is the point of most tests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        owner = self.server.owner
        route, faulty = owner._route(self)
        self.close_connection = True
        if route is None:
            return self._reply(404, b"not found\n")
        fault = route.fault if faulty else "none"
        if fault == "status":
            return self._reply(route.status, b"fault\n")
        if fault == "redirect":
            return self._reply(302, b"", {"Location": route.location})
        if fault == "lie_length":
            return self._reply(200, route.body, {"Content-Length": str(route.claimed_length)})
        if fault == "no_length":
            return self._send_unsized(route)
        status, body, headers = self._ranged(route)
        if fault == "cut":
            return self._reply(status, body[: route.cut_after], {**headers, "Content-Length": str(len(body))})
        if fault == "drip":
            return self._drip(route, status, body, headers)
        return self._reply(status, body, {**headers, **route.headers})

    def _ranged(self, route: Route) -> tuple[int, bytes, dict[str, str]]:
        body, size = route.body, len(route.body)
        headers = {"ETag": route.etag, "Accept-Ranges": "bytes" if route.ranges else "none"}
        m = _RANGE_RE.fullmatch(self.headers.get("Range", ""))
        if_range = self.headers.get("If-Range")
        if not route.ranges or m is None or (if_range is not None and if_range != route.etag):
            return 200, body, headers
        start = int(m[1])
        if start >= size:
            return 416, b"", {**headers, "Content-Range": f"bytes */{size}"}
        return 206, body[start:], {**headers, "Content-Range": f"bytes {start}-{size - 1}/{size}"}

    def _head(self, status: int, headers: Mapping[str, str]) -> bytes:
        lines = [f"HTTP/1.1 {status} {self.responses.get(status, ('?',))[0]}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _reply(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        headers = {"Content-Length": str(len(body)), **(headers or {})}
        self._write(self._head(status, headers) + body)

    def _send_unsized(self, route: Route) -> None:
        if not route.chunked:
            self._write(self._head(200, {}) + route.body)
            return
        out = bytearray(self._head(200, {"Transfer-Encoding": "chunked"}))
        for i in range(0, len(route.body), 4096):
            piece = route.body[i : i + 4096]
            out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        self._write(bytes(out + b"0\r\n\r\n"))

    def _drip(self, route: Route, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        head = self._head(status, {**headers, "Content-Length": str(len(body))})
        if not route.drip_headers and not self._write(head):
            return
        for byte in (head if route.drip_headers else b"") + body:
            if self.server.owner.stopping.wait(route.drip_seconds) or not self._write(bytes([byte])):
                return

    def _write(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:  # the client gave up: expected in most fault tests
            return False
        return True


def make_tls(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """Write a throwaway CA (ca.pem) and a server cert + key for ``hosts`` (see tls_helpers.make_pki)."""
    from tls_helpers import make_pki

    pki = make_pki(directory, hosts)
    return TlsFiles(pki.ca, pki.cert, pki.key)

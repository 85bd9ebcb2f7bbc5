"""The real :class:`~edge_runtime.update.fetcher.Fetcher` transport: one GET on http.client + ssl.

:class:`HttpFetcher` supplies ``_open``; caps, resume, retries and the
deadline are the policy of :class:`~edge_runtime.update.fetcher.Fetcher`. A watchdog
shuts the socket at the deadline, the one bound that also covers a server
dripping its status line and headers.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

from edge_runtime.config.model import OtaConfig
from edge_runtime.errors import ConfigError, FetchError
from edge_runtime.update.fetcher import Fetcher, Response

__all__ = ["HttpFetcher"]


class _Watchdog:
    """Shuts the socket down at the deadline: the one bound that also covers a server
    dripping its status line and headers, where http.client reads without asking us."""

    def __init__(self, sock: socket.socket, delay: float) -> None:
        self.fired = threading.Event()
        self._sock = sock
        self._timer = threading.Timer(max(delay, 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired.set()
        with contextlib.suppress(OSError):
            # The base-class call acts on the descriptor only, not on the SSL object
            # that the reading thread is inside; the blocked read then sees EOF.
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


class _HttpResponse:
    """:class:`Response` over http.client, owning the connection and its watchdog."""

    def __init__(
        self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, sock: socket.socket, guard: _Watchdog
    ) -> None:
        self.status = resp.status
        self.reason = resp.reason
        self._conn, self._resp, self._sock, self._guard = conn, resp, sock, guard

    def header(self, name: str) -> str | None:
        return self._resp.getheader(name)

    def read1(self, size: int, timeout: float) -> bytes:
        self._sock.settimeout(timeout)
        try:
            data = self._resp.read1(size)
        except http.client.HTTPException as e:  # IncompleteRead in a chunked body and kin
            raise ConnectionError(f"broken HTTP body ({type(e).__name__})") from e
        if self._guard.fired.is_set():
            raise TimeoutError("deadline reached")
        return data

    def close(self) -> None:
        self._guard.cancel()
        self._resp.close()
        self._conn.close()
        self._sock.close()


class HttpFetcher(Fetcher):
    """The real :class:`Fetcher` on http.client + ssl.

    TLS verification is always on with hostname checking;
    ``ca_file`` replaces the system trust store (pin the fleet's CA).
    Credentials in the URL (``user:pass@``) are sent as HTTP Basic auth and never logged.

    Raises:
        ConfigError: ``ca_file`` cannot be loaded.
    """

    def __init__(
        self, *, connect_timeout: float, read_timeout: float, deadline: float, retries: int,
        backoff_base: float = 1.0, backoff_max: float, ca_file: Path | None, allow_http: bool,
        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
        max_redirects: int = 3,
    ) -> None:
        super().__init__(connect_timeout=connect_timeout, read_timeout=read_timeout, deadline=deadline,
                         retries=retries, backoff_base=backoff_base, backoff_max=backoff_max,
                         allow_http=allow_http, clock=clock, sleep=sleep, max_redirects=max_redirects)
        try:
            self._tls = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
        except OSError as e:  # ssl.SSLError is an OSError too
            raise ConfigError(f"ota.ca_file {ca_file}: cannot load CA certificates: {e.strerror or e}") from e

    @classmethod
    def from_config(
        cls, config: OtaConfig, *, clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> HttpFetcher:
        """An HttpFetcher with the ``[ota]`` knobs.

        Raises:
            ConfigError: ``ota.ca_file`` cannot be loaded.
        """
        return cls(connect_timeout=config.connect_timeout_seconds, read_timeout=config.read_timeout_seconds,
                   deadline=config.deadline_seconds, retries=config.retries, backoff_max=config.backoff_max_seconds,
                   ca_file=config.ca_file, allow_http=config.allow_http, clock=clock, sleep=sleep)

    def _open(
        self, url: str, headers: Mapping[str, str], *, connect_timeout: float, read_timeout: float, deadline_at: float
    ) -> Response:
        parts = urlsplit(url)
        host = parts.hostname or ""
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(host, parts.port, timeout=connect_timeout, context=self._tls)
        else:
            conn = http.client.HTTPConnection(host, parts.port, timeout=connect_timeout)
        request_headers = dict(headers)
        if parts.username is not None:
            userpass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            request_headers["Authorization"] = "Basic " + base64.b64encode(userpass.encode()).decode()
        try:
            conn.connect()  # TCP and, for https, the TLS handshake with certificate checks
        except ssl.SSLCertVerificationError as e:
            conn.close()
            raise FetchError(f"TLS to {host}: certificate verify failed: {e.verify_message}") from e
        except BaseException:
            conn.close()
            raise
        sock = conn.sock
        if not isinstance(sock, socket.socket):
            raise ConnectionError("no socket after connect")
        guard = _Watchdog(sock, deadline_at - self._clock())
        try:
            sock.settimeout(read_timeout)
            conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                         headers=request_headers)
            resp = conn.getresponse()
        except BaseException as e:
            guard.cancel()
            conn.close()
            sock.close()
            if isinstance(e, http.client.HTTPException):  # a garbled status line or headers
                raise ConnectionError(f"bad HTTP response ({type(e).__name__})") from e
            raise
        return _HttpResponse(conn, resp, sock, guard)

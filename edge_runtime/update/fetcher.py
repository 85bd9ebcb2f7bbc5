"""HTTP(S) downloads with size caps, resume, retries and a hard deadline: the policy.

:class:`Fetcher` is the interface the OTA updater is given. Its public methods
are templates that own every policy; a subclass only supplies ``_open`` (send
one GET, hand back the response head as a :class:`Response`).
:class:`~edge_runtime.update.transport.HttpFetcher` is the real transport on
``http.client`` + ``ssl``; tests subclass :class:`Fetcher` to inject faults,
or run tests/http_fault_server.py.

Policies enforced by :class:`Fetcher`:

- URLs: ``https`` always; ``http`` only with ``allow_http``; at most
  ``max_redirects`` redirects per attempt, never from https to http.
- Caps: a Content-Length or Content-Range total over ``max_bytes`` (or not
  equal to ``expected_size``) is refused before the body is read and before the
  file exists; a body without a length is counted and cut off past the cap.
- Resume: after a cut connection the next attempt asks ``Range: bytes=N-``
  (with ``If-Range`` when the server gave a strong ETag) and checks the 206's
  Content-Range start; a 200 reply means the server starts over, so do we.
- Retries: network errors, 408, 429 and 5xx are retried ``retries`` times with
  capped exponential backoff and equal jitter; other 4xx are final.
- Deadline: the whole call, waits included, ends by ``deadline`` seconds; each
  read waits at most min(read_timeout, time left) and a watchdog shuts the
  socket at the deadline, so a server dripping bytes (or headers) cannot hang us.

Errors: :class:`FetchError` (status, network, timeout, deadline, scheme,
redirects, TLS), :class:`SizeLimitError` (caps), :class:`IntegrityError`
(size or sha256 mismatch). Every URL in a message or log line goes through
:func:`redact_url`.
"""

from __future__ import annotations

import abc
import logging
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol
from urllib.parse import urljoin, urlsplit

from edge_runtime import __version__
from edge_runtime._util.retry_policy import equal_jitter, redact_url
from edge_runtime._util.strict_text import parse_decimal
from edge_runtime.errors import FetchError, IntegrityError, SizeLimitError
from edge_runtime.update.download_sink import CHUNK_BYTES, FileSink, Sink

__all__ = ["Fetcher", "Response"]

# The logger name from before the policy had its own module (log configs name it).
log = logging.getLogger(__name__)

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRIED_4XX = frozenset({408, 429})
# [0-9], not \d: \d takes any script's digits, which int() then reads.
_CONTENT_RANGE_RE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class Response(Protocol):
    """One HTTP response as a transport hands it over: head read, body pending."""

    status: int
    reason: str

    def header(self, name: str) -> str | None:
        """The header's value (repeated headers joined by ', '), or None."""

    def read1(self, size: int, timeout: float) -> bytes:
        """Up to ``size`` body bytes, waiting at most ``timeout`` s; b'' at the end.

        Raises OSError on a network failure or timeout.
        """

    def close(self) -> None:
        """Release the connection."""


class _Retry(Exception):
    """A transient failure: the attempt may be repeated (resuming) after a backoff."""


class Fetcher(abc.ABC):
    """Downloads over HTTP(S) with caps, resume, retries and a deadline (see the module doc).

    Subclasses implement :meth:`_open`; everything else is policy kept here.
    ``clock`` and ``sleep`` are injectable so tests neither wait nor race.
    """

    def __init__(
        self, *, connect_timeout: float, read_timeout: float, deadline: float, retries: int,
        backoff_base: float = 1.0, backoff_max: float, allow_http: bool,
        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
        max_redirects: int = 3,
    ) -> None:
        if min(connect_timeout, read_timeout, deadline) <= 0 or min(retries, backoff_base, backoff_max) < 0:
            raise ValueError("timeouts and deadline must be > 0; retries and backoff >= 0")
        if max_redirects < 0:
            raise ValueError("max_redirects must be >= 0")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.deadline = deadline
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.allow_http = allow_http
        self.max_redirects = max_redirects
        self._clock = clock
        self._sleep = sleep

    def fetch_bytes(self, url: str, max_bytes: int) -> bytes:
        """GET ``url`` into memory (channel documents), at most ``max_bytes``.

        Raises:
            FetchError: refused URL, HTTP status, network failure after the
                retries, too many redirects, TLS failure, deadline.
            SizeLimitError: the body is, or is announced as, over ``max_bytes``.
        """
        sink = Sink()
        self._download(url, sink, max_bytes, None)
        return sink.value()

    def fetch_to_file(
        self, url: str, dest: Path, *, max_bytes: int, expected_size: int | None = None,
        expected_sha256: str | None = None,
    ) -> Path:
        """GET ``url`` into ``dest`` (0600, never through a symlink) and return ``dest``.

        Bytes already in ``dest`` are resumed from with a Range request. When the
        call gives up on a transient failure (retries spent, deadline) the
        partial file is kept so a later call resumes; on every other error it
        is removed. A file that already holds ``expected_size`` bytes hashing
        to ``expected_sha256`` is returned without a request.

        Raises:
            FetchError: as :meth:`fetch_bytes`, or ``dest`` cannot be written.
            SizeLimitError: over ``max_bytes``, or ``expected_size`` is.
            IntegrityError: size other than ``expected_size``, sha256 mismatch.
        """
        if expected_sha256 is not None and not _SHA256_RE.fullmatch(expected_sha256):
            raise ValueError("expected_sha256 must be 64 lowercase hex digits")
        where = f"GET {redact_url(url)}"
        if expected_size is not None and expected_size > max_bytes:
            raise SizeLimitError(f"{where}: expected size {expected_size} is over the {max_bytes}-byte cap")
        sink = FileSink(dest)
        try:
            if sink.offset and sink.offset == expected_size and sink.digest() == expected_sha256:
                sink.finish()
                return dest
            if sink.offset >= min(max_bytes, expected_size if expected_size is not None else max_bytes):
                sink.restart()  # nothing left to resume: too long, or complete but wrong
            self._download(url, sink, max_bytes, expected_size)
            if expected_size is not None and sink.offset != expected_size:
                raise IntegrityError(f"{where}: got {sink.offset} bytes, expected {expected_size}")
            if expected_sha256 is not None and sink.digest() != expected_sha256:
                raise IntegrityError(f"{where}: sha256 {sink.digest()} does not match the expected {expected_sha256}")
            sink.finish()
        except BaseException:
            sink.abort()
            raise
        return dest

    @abc.abstractmethod
    def _open(
        self, url: str, headers: Mapping[str, str], *, connect_timeout: float, read_timeout: float, deadline_at: float
    ) -> Response:
        """Send one GET for ``url`` and return once the response head is read.

        ``deadline_at`` is on the ``clock`` timeline. Raise OSError for a
        failure worth retrying, FetchError for one that is not.
        """

    def _download(self, url: str, sink: Sink, max_bytes: int, expected_size: int | None) -> None:
        self._check_url(url)
        deadline_at = self._clock() + self.deadline
        failures = 0
        while True:
            try:
                self._attempt(url, sink, max_bytes, expected_size, deadline_at)
                return
            except _Retry as e:
                failures += 1
                last = e
            where = f"GET {redact_url(url)}"
            cause = last.__cause__ or last
            now = self._clock()
            delay = self._backoff(failures)
            sink.keep = failures > self.retries or now + delay >= deadline_at
            if now >= deadline_at:
                raise FetchError(f"{where}: the {self.deadline:g} s deadline passed ({last})") from cause
            if failures > self.retries:
                raise FetchError(f"{where}: failed after {failures} attempt{'s' * (failures > 1)} ({last})") from cause
            if now + delay >= deadline_at:
                raise FetchError(
                    f"{where}: a retry in {delay:.1f} s would pass the {self.deadline:g} s deadline ({last})"
                ) from cause
            log.warning("%s: %s; attempt %d of %d, retrying in %.1f s",
                        where, last, failures, self.retries + 1, delay)
            self._sleep(delay)

    def _backoff(self, failures: int) -> float:
        return equal_jitter(failures - 1, self.backoff_base, self.backoff_max)

    def _attempt(
        self, url: str, sink: Sink, max_bytes: int, expected_size: int | None, deadline_at: float
    ) -> None:
        target = url
        for _ in range(self.max_redirects + 1):
            headers = {"User-Agent": f"edge-runtime/{__version__}", "Accept-Encoding": "identity"}
            if sink.offset:
                headers["Range"] = f"bytes={sink.offset}-"
                if sink.validator:
                    headers["If-Range"] = sink.validator
            left = self._time_left(deadline_at)
            try:
                resp = self._open(target, headers, connect_timeout=min(self.connect_timeout, left),
                                  read_timeout=min(self.read_timeout, left), deadline_at=deadline_at)
            except OSError as e:
                raise _Retry(_describe(e)) from e
            try:
                if resp.status not in _REDIRECTS:
                    self._receive(target, resp, sink, max_bytes, expected_size, deadline_at)
                    return
                location = resp.header("Location")
                if not location:
                    raise FetchError(f"GET {redact_url(target)}: HTTP {resp.status} without a Location")
                previous, target = target, urljoin(target, location.strip())
                self._check_url(target, came_from=previous)
                log.info("GET %s: HTTP %d, redirected to %s", redact_url(previous), resp.status, redact_url(target))
            finally:
                resp.close()
        raise FetchError(f"GET {redact_url(url)}: more than {self.max_redirects} redirects")

    def _receive(
        self, url: str, resp: Response, sink: Sink, max_bytes: int, expected_size: int | None, deadline_at: float
    ) -> None:
        where = f"GET {redact_url(url)}"
        status = resp.status
        if status in _RETRIED_4XX or 500 <= status <= 599:
            raise _Retry(f"HTTP {status} {resp.reason}".rstrip())
        if status == 416 and sink.offset:
            sink.restart()
            raise _Retry("HTTP 416: the server cannot resume; starting over")
        if status not in (200, 206):
            raise FetchError(f"{where}: HTTP {status} {resp.reason}".rstrip(), status=status)
        encoding = (resp.header("Content-Encoding") or "identity").strip().lower()
        if encoding != "identity":
            raise FetchError(f"{where}: unrequested Content-Encoding {encoding!r}")
        length = _content_length(resp, where)
        if status == 206:
            if not sink.offset:
                raise FetchError(f"{where}: HTTP 206 to a request without Range")
            start, total = _content_range(resp, where)
            if start != sink.offset:
                sink.restart()
                raise _Retry(f"server resumed at byte {start}, not {sink.offset}; starting over")
            end = sink.offset + length if length is not None else total
            announced = total if total is not None else end
        else:
            if sink.offset:
                sink.restart()  # a 200 to a Range request is the whole body again
            end = announced = length
        if announced is not None:
            if announced > max_bytes:
                raise SizeLimitError(f"{where}: server announces {announced} bytes, over the {max_bytes}-byte cap")
            if expected_size is not None and announced != expected_size:
                raise IntegrityError(f"{where}: server announces {announced} bytes, expected {expected_size}")
        etag = resp.header("ETag")
        sink.validator = etag if etag and not etag.startswith("W/") else None
        sink.open()
        while end is None or sink.offset < end:
            want = CHUNK_BYTES if end is None else min(CHUNK_BYTES, end - sink.offset)
            timeout = min(self.read_timeout, self._time_left(deadline_at))
            try:
                chunk = resp.read1(want, timeout)
            except OSError as e:
                raise _Retry(_describe(e)) from e
            if not chunk:
                if end is None:
                    return
                raise _Retry(f"connection closed at byte {sink.offset} of {end}")
            if sink.offset + len(chunk) > max_bytes:
                raise SizeLimitError(f"{where}: body is over the {max_bytes}-byte cap")
            if expected_size is not None and sink.offset + len(chunk) > expected_size:
                raise IntegrityError(f"{where}: body is longer than the expected {expected_size} bytes")
            sink.write(chunk)
        if announced is not None and sink.offset < announced:
            raise _Retry(f"server sent bytes up to {sink.offset} of {announced}")  # a short 206 range

    def _time_left(self, deadline_at: float) -> float:
        left = deadline_at - self._clock()
        if left <= 0:
            raise _Retry("deadline reached")
        return left

    def _check_url(self, url: str, came_from: str | None = None) -> None:
        where = redact_url(url)
        try:
            parts = urlsplit(url)
            _ = parts.port  # raises ValueError on a bad port
        except ValueError as e:
            raise FetchError(f"{where}: malformed URL") from e
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError(f"{where}: not an http(s) URL with a host")
        if any(c.isspace() or not c.isprintable() for c in url):
            raise FetchError(f"{where}: URL contains whitespace or control characters")
        if parts.scheme == "http":
            if came_from is not None and urlsplit(came_from).scheme == "https":
                raise FetchError(f"GET {redact_url(came_from)}: refusing a redirect from https to http ({where})")
            if not self.allow_http:
                raise FetchError(f"{where}: plain http is refused (use https, or set ota.allow_http)")


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _content_length(resp: Response, where: str) -> int | None:
    raw = resp.header("Content-Length")
    if raw is None:
        return None
    # 1*DIGIT with optional whitespace around (RFC 9110); str.isdigit() would pass '²' to int().
    return parse_decimal(raw.strip(" \t"), f"{where}: Content-Length", max_digits=19, error=FetchError)


def _content_range(resp: Response, where: str) -> tuple[int, int | None]:
    raw = resp.header("Content-Range") or ""
    m = _CONTENT_RANGE_RE.fullmatch(raw.strip(" \t"))
    if m is None or int(m[2]) < int(m[1]) or (m[3] != "*" and int(m[2]) >= int(m[3])):
        raise FetchError(f"{where}: HTTP 206 with an invalid Content-Range {raw[:60]!r}")
    return int(m[1]), None if m[3] == "*" else int(m[3])

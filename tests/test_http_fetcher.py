"""HttpFetcher against a real loopback server that misbehaves on purpose.

Every retry wait goes through an injected ``sleep`` that records and returns at
once, so the suite is fast; only the drip tests spend real time (~1.5 s each).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from http_fault_server import FaultServer, Route, TlsFiles, make_tls

from edge_runtime._util.retry_policy import redact_url
from edge_runtime.config.model import OtaConfig
from edge_runtime.errors import ConfigError, FetchError, IntegrityError, SizeLimitError
from edge_runtime.update.fetcher import Fetcher, Response
from edge_runtime.update.transport import HttpFetcher

BODY = os.urandom(300_000)
SHA = hashlib.sha256(BODY).hexdigest()


class Sleeps(list[float]):
    """An injectable ``sleep`` that records the delays asked for and does not wait."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture()
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture()
def make(sleeps: Sleeps) -> Callable[..., HttpFetcher]:
    """make(**overrides) -> an HttpFetcher with short timeouts, plain http allowed, no real waits."""

    def build(**overrides: Any) -> HttpFetcher:
        kwargs: dict[str, Any] = {
            "connect_timeout": 2.0, "read_timeout": 2.0, "deadline": 20.0, "retries": 3,
            "backoff_base": 0.1, "backoff_max": 1.0, "ca_file": None, "allow_http": True, "sleep": sleeps,
        }
        kwargs.update(overrides)
        return HttpFetcher(**kwargs)

    return build


@pytest.fixture()
def serve() -> Iterator[Callable[..., FaultServer]]:
    """serve(routes, tls=None) -> a started FaultServer, stopped after the test."""
    started: list[FaultServer] = []

    def start(routes: Mapping[str, Route], tls: TlsFiles | None = None) -> FaultServer:
        srv = FaultServer(routes, tls=tls)
        srv.__enter__()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.__exit__(None, None, None)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


def test_download_with_sha256(make: Callable[..., HttpFetcher], serve: Any, tmp_path: Path) -> None:
    srv = serve({"/b": Route(body=BODY)})
    dest = tmp_path / "b.bundle"
    got = make().fetch_to_file(srv.url("/b"), dest, max_bytes=len(BODY), expected_size=len(BODY),
                               expected_sha256=SHA)
    assert got == dest and dest.read_bytes() == BODY
    assert dest.stat().st_mode & 0o777 == 0o600
    assert [s.headers.get("Range") for s in srv.seen("/b")] == [None]


def test_fetch_bytes_and_its_cap(make: Callable[..., HttpFetcher], serve: Any) -> None:
    srv = serve({"/c": Route(body=b"x" * 1000)})
    assert make().fetch_bytes(srv.url("/c"), 1000) == b"x" * 1000
    with pytest.raises(SizeLimitError, match="1000 bytes, over the 999-byte cap"):
        make().fetch_bytes(srv.url("/c"), 999)


def test_cut_connection_resumes_with_range(
    make: Callable[..., HttpFetcher], serve: Any, sleeps: Sleeps, tmp_path: Path
) -> None:
    srv = serve({"/b": Route(body=BODY, fault="cut", cut_after=100_000, times=1)})
    dest = tmp_path / "b"
    make().fetch_to_file(srv.url("/b"), dest, max_bytes=len(BODY), expected_sha256=SHA)
    first, second = srv.seen("/b")
    assert "Range" not in first.headers
    assert second.headers["Range"] == "bytes=100000-"
    assert second.headers["If-Range"] == srv.routes["/b"].etag  # a changed file would come back whole
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == SHA
    assert len(sleeps) == 1


def test_server_ignoring_range_means_start_over(make: Callable[..., HttpFetcher], serve: Any, tmp_path: Path) -> None:
    srv = serve({"/b": Route(body=BODY, fault="cut", cut_after=100_000, times=1, ranges=False)})
    dest = tmp_path / "b"
    make().fetch_to_file(srv.url("/b"), dest, max_bytes=len(BODY), expected_sha256=SHA)
    assert srv.seen("/b")[1].headers["Range"] == "bytes=100000-"  # asked, got a 200, truncated
    assert dest.read_bytes() == BODY


def test_resumes_a_partial_file_left_by_an_earlier_call(
    make: Callable[..., HttpFetcher], serve: Any, tmp_path: Path
) -> None:
    srv = serve({"/b": Route(body=BODY)})
    dest = tmp_path / "b"
    dest.write_bytes(BODY[:12345])
    make().fetch_to_file(srv.url("/b"), dest, max_bytes=len(BODY), expected_size=len(BODY), expected_sha256=SHA)
    assert [s.headers.get("Range") for s in srv.seen("/b")] == ["bytes=12345-"]
    assert dest.read_bytes() == BODY
    # Complete and hash-valid already: no request at all.
    make().fetch_to_file(srv.url("/b"), dest, max_bytes=len(BODY), expected_size=len(BODY), expected_sha256=SHA)
    assert len(srv.seen("/b")) == 1


@pytest.mark.parametrize("drip_headers", [False, True], ids=["body", "headers"])
def test_drip_is_aborted_at_the_deadline(
    make: Callable[..., HttpFetcher], serve: Any, tmp_path: Path, drip_headers: bool
) -> None:
    srv = serve({"/b": Route(body=BODY, fault="drip", drip_seconds=0.05, drip_headers=drip_headers)})
    fetcher = make(deadline=1.5, read_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"1\.5 s deadline"):
        fetcher.fetch_to_file(srv.url("/b"), tmp_path / "b", max_bytes=len(BODY))
    elapsed = time.monotonic() - started
    assert 1.4 < elapsed < 1.5 + 1.0 + 0.5
    assert len(srv.seen("/b")) == 1


def test_drip_slower_than_the_read_timeout_is_retried_then_gives_up(
    make: Callable[..., HttpFetcher], serve: Any, tmp_path: Path
) -> None:
    srv = serve({"/b": Route(body=BODY, fault="drip", drip_seconds=5.0)})
    started = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        make(read_timeout=0.3, retries=2, deadline=10).fetch_to_file(srv.url("/b"), tmp_path / "b", max_bytes=10**6)
    assert time.monotonic() - started < 3
    assert len(srv.seen("/b")) == 3


def test_huge_content_length_is_refused_before_the_body(
    make: Callable[..., HttpFetcher], serve: Any, tmp_path: Path
) -> None:
    srv = serve({"/b": Route(body=b"tiny", fault="lie_length")})
    dest = tmp_path / "b"
    with pytest.raises(SizeLimitError, match="10737418240 bytes, over the 1048576-byte cap"):
        make().fetch_to_file(srv.url("/b"), dest, max_bytes=1 << 20)
    assert not dest.exists()
    assert len(srv.seen("/b")) == 1  # a cap is final, never retried


@pytest.mark.parametrize("chunked", [False, True], ids=["close-delimited", "chunked"])
def test_unsized_body_over_the_cap_is_cut_and_removed(
    make: Callable[..., HttpFetcher], serve: Any, tmp_path: Path, chunked: bool
) -> None:
    srv = serve({"/b": Route(body=BODY, fault="no_length", chunked=chunked)})
    dest = tmp_path / "b"
    with pytest.raises(SizeLimitError, match="over the 100000-byte cap"):
        make().fetch_to_file(srv.url("/b"), dest, max_bytes=100_000)
    assert not dest.exists()
    # Under the cap, the same unsized body is fine.
    make().fetch_to_file(srv.url("/b"), dest, max_bytes=len(BODY), expected_sha256=SHA)
    assert dest.read_bytes() == BODY


@pytest.mark.parametrize("status", [500, 503, 429, 408])
def test_transient_statuses_are_retried(
    make: Callable[..., HttpFetcher], serve: Any, sleeps: Sleeps, tmp_path: Path, status: int
) -> None:
    srv = serve({"/b": Route(body=BODY, fault="status", status=status, times=2)})
    make().fetch_to_file(srv.url("/b"), tmp_path / "b", max_bytes=len(BODY), expected_sha256=SHA)
    assert len(srv.seen("/b")) == 3
    assert len(sleeps) == 2


def test_backoff_grows_with_jitter_and_is_capped(
    make: Callable[..., HttpFetcher], serve: Any, sleeps: Sleeps, tmp_path: Path
) -> None:
    srv = serve({"/b": Route(fault="status", status=500)})
    dest = tmp_path / "b"
    with pytest.raises(FetchError, match=r"failed after 7 attempts \(HTTP 500 Internal Server Error\)"):
        make(retries=6, backoff_base=0.1, backoff_max=0.5).fetch_to_file(srv.url("/b"), dest, max_bytes=100)
    steps = [0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
    assert len(sleeps) == len(steps) and len(srv.seen("/b")) == 7
    for delay, step in zip(sleeps, steps, strict=True):
        assert step / 2 <= delay <= step
    assert sleeps[:3] == sorted(sleeps[:3])
    assert not dest.exists()  # nothing was ever received


def test_retry_that_would_pass_the_deadline_is_not_waited_for(
    make: Callable[..., HttpFetcher], serve: Any, sleeps: Sleeps, tmp_path: Path
) -> None:
    srv = serve({"/b": Route(fault="status", status=503)})
    with pytest.raises(FetchError, match="would pass the 5 s deadline"):
        make(deadline=5, backoff_base=60, backoff_max=60).fetch_to_file(srv.url("/b"), tmp_path / "b", max_bytes=10)
    assert sleeps == []


@pytest.mark.parametrize("status", [404, 403, 410])
def test_client_errors_are_final(
    make: Callable[..., HttpFetcher], serve: Any, sleeps: Sleeps, tmp_path: Path, status: int
) -> None:
    srv = serve({"/b": Route(fault="status", status=status)})
    dest = tmp_path / "b"
    with pytest.raises(FetchError, match=f"HTTP {status}"):
        make().fetch_to_file(srv.url("/b"), dest, max_bytes=100)
    assert len(srv.seen("/b")) == 1 and sleeps == []
    assert not dest.exists()


def test_connection_refused_is_retried(make: Callable[..., HttpFetcher], sleeps: Sleeps, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FetchError, match=r"failed after 3 attempts.*refused"):
        make(retries=2).fetch_bytes(f"http://127.0.0.1:{port}/x", 100)
    assert len(sleeps) == 2


def test_wrong_sha256_removes_the_file(make: Callable[..., HttpFetcher], serve: Any, tmp_path: Path) -> None:
    srv = serve({"/b": Route(body=BODY)})
    dest = tmp_path / "b"
    with pytest.raises(IntegrityError, match="does not match the expected 00000"):
        make().fetch_to_file(srv.url("/b"), dest, max_bytes=len(BODY), expected_sha256="0" * 64)
    assert not dest.exists()


def test_expected_size_mismatch_is_refused_before_reading(
    make: Callable[..., HttpFetcher], serve: Any, tmp_path: Path
) -> None:
    srv = serve({"/b": Route(body=BODY)})
    dest = tmp_path / "b"
    with pytest.raises(IntegrityError, match=f"announces {len(BODY)} bytes, expected {len(BODY) - 1}"):
        make().fetch_to_file(srv.url("/b"), dest, max_bytes=len(BODY), expected_size=len(BODY) - 1)
    assert not dest.exists() and len(srv.seen("/b")) == 1
    with pytest.raises(SizeLimitError, match="over the 1000-byte cap"):
        make().fetch_to_file(srv.url("/b"), dest, max_bytes=1000, expected_size=len(BODY))
    assert len(srv.seen("/b")) == 1  # refused without asking


def test_dest_symlink_is_not_followed(make: Callable[..., HttpFetcher], serve: Any, tmp_path: Path) -> None:
    srv = serve({"/b": Route(body=b"payload")})
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (tmp_path / "b").symlink_to(victim)
    with pytest.raises(FetchError, match="cannot open download file"):
        make().fetch_to_file(srv.url("/b"), tmp_path / "b", max_bytes=100)
    assert victim.read_bytes() == b"keep me"


def test_redirects_are_followed_up_to_the_limit(make: Callable[..., HttpFetcher], serve: Any) -> None:
    srv = serve({
        "/r1": Route(fault="redirect", location="/r2"),
        "/r2": Route(fault="redirect", location="/r3"),
        "/r3": Route(fault="redirect", location="/file"),
        "/file": Route(body=b"found"),
    })
    assert make(max_redirects=3).fetch_bytes(srv.url("/r1"), 100) == b"found"
    with pytest.raises(FetchError, match="more than 2 redirects"):
        make(max_redirects=2).fetch_bytes(srv.url("/r1"), 100)


def test_http_is_refused_unless_allowed(make: Callable[..., HttpFetcher], serve: Any) -> None:
    srv = serve({"/b": Route(body=b"x")})
    with pytest.raises(FetchError, match="plain http is refused"):
        make(allow_http=False).fetch_bytes(srv.url("/b"), 100)
    assert srv.requests == []


def test_tls_with_the_fleet_ca(make: Callable[..., HttpFetcher], serve: Any, tls: TlsFiles, tmp_path: Path) -> None:
    srv = serve({"/b": Route(body=BODY, fault="cut", cut_after=50_000, times=1)}, tls=tls)
    dest = tmp_path / "b"
    make(ca_file=tls.ca, allow_http=False).fetch_to_file(srv.url("/b"), dest, max_bytes=len(BODY),
                                                         expected_sha256=SHA)
    assert dest.read_bytes() == BODY
    assert srv.seen("/b")[1].headers["Range"] == "bytes=50000-"


def test_tls_untrusted_ca_is_refused_without_fallback(
    make: Callable[..., HttpFetcher], serve: Any, sleeps: Sleeps, tls: TlsFiles
) -> None:
    srv = serve({"/b": Route(body=b"secret")}, tls=tls)
    with pytest.raises(FetchError, match=r"TLS to 127\.0\.0\.1: certificate verify failed") as info:
        make(allow_http=True).fetch_bytes(srv.url("/b"), 100)  # default trust store
    assert "unable to get local issuer certificate" in str(info.value)
    until = time.monotonic() + 5
    while srv.tls_failures == 0 and time.monotonic() < until:  # the server thread logs it a moment later
        time.sleep(0.01)
    assert srv.requests == [] and srv.tls_failures == 1 and sleeps == []  # no plaintext, no retry


def test_tls_hostname_is_checked(
    make: Callable[..., HttpFetcher], serve: Any, tmp_path: Path
) -> None:
    only_localhost = make_tls(tmp_path, hosts=("localhost",))
    srv = serve({"/b": Route(body=b"x")}, tls=only_localhost)
    with pytest.raises(FetchError, match=r"TLS to 127\.0\.0\.1: certificate verify failed.*mismatch"):
        make(ca_file=only_localhost.ca).fetch_bytes(srv.url("/b"), 100)
    assert srv.requests == []


def test_no_redirect_from_https_to_http(make: Callable[..., HttpFetcher], serve: Any, tls: TlsFiles) -> None:
    plain = serve({"/b": Route(body=b"x")})
    secure = serve({"/b": Route(fault="redirect", location=plain.url("/b"))}, tls=tls)
    with pytest.raises(FetchError, match="refusing a redirect from https to http"):
        make(ca_file=tls.ca, allow_http=True).fetch_bytes(secure.url("/b"), 100)
    assert plain.requests == []


def test_bad_ca_file_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"ota\.ca_file"):
        HttpFetcher.from_config(OtaConfig(ca_file=bad))
    fetcher = HttpFetcher.from_config(OtaConfig(retries=7, deadline_seconds=99.0))
    assert (fetcher.retries, fetcher.deadline, fetcher.allow_http) == (7, 99.0, False)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pa55@host:8443/a/b.bundle?token=s3cr3t#frag", "https://***@host:8443/a/b.bundle?***"),
        ("https://host/a?X-Amz-Signature=s3cr3t", "https://host/a?***"),
        ("https://host/a#s3cr3t", "https://host/a#***"),
        ("https://tok@host/a", "https://***@host/a"),
        ("https://host/plain", "https://host/plain"),
        ("user:pa55@host/a", "<redacted URL>"),
        ("https://host/a\nFAKE LOG LINE", "https://host/a?FAKE LOG LINE"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_credentials_are_used_but_never_shown(
    make: Callable[..., HttpFetcher], serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    srv = serve({"/b": Route(fault="status", status=500)})
    url = f"http://user:pa55@127.0.0.1:{srv.port}/b?token=s3cr3t"
    with caplog.at_level(logging.DEBUG, logger="edge_runtime.update"), pytest.raises(FetchError) as info:
        make(retries=1).fetch_bytes(url, 100)
    assert srv.seen("/b")[0].headers["Authorization"] == "Basic dXNlcjpwYTU1"  # user:pa55
    shown = str(info.value) + caplog.text
    assert "***@127.0.0.1" in shown and "pa55" not in shown and "s3cr3t" not in shown


class _FakeResponse:
    """200 with a 10-byte Content-Length; each read costs ``per_read`` s on the fake clock."""

    status = 200
    reason = "OK"

    def __init__(self, net: _FakeNetwork) -> None:
        self.net = net

    def header(self, name: str) -> str | None:
        return {"Content-Length": "10"}.get(name)

    def read1(self, size: int, timeout: float) -> bytes:
        self.net.read_timeouts.append(timeout)
        if self.net.per_read > timeout:
            self.net.now += timeout
            raise TimeoutError
        self.net.now += self.net.per_read
        return b"x"

    def close(self) -> None:
        pass


class _FakeNetwork(Fetcher):
    """A Fetcher over a fake transport and a fake clock (the interface the daemon's tests use)."""

    def __init__(self, per_read: float, **kwargs: Any) -> None:
        self.now = 0.0
        self.per_read = per_read
        self.opened = 0
        self.read_timeouts: list[float] = []
        super().__init__(clock=lambda: self.now, sleep=self._sleep_on_clock, connect_timeout=1, allow_http=True,
                         backoff_base=1, backoff_max=1, **kwargs)

    def _sleep_on_clock(self, seconds: float) -> None:
        self.now += seconds

    def _open(
        self, url: str, headers: Mapping[str, str], *, connect_timeout: float, read_timeout: float, deadline_at: float
    ) -> Response:
        self.opened += 1
        return _FakeResponse(self)


def test_reads_time_out_and_retries_stop_at_the_deadline() -> None:
    net = _FakeNetwork(per_read=5.0, read_timeout=4, deadline=10, retries=100)
    with pytest.raises(FetchError, match=r"10 s deadline"):
        net.fetch_bytes("http://example.invalid/x", 100)
    assert net.now <= 10 and net.opened == 3
    assert net.read_timeouts[:2] == [4, 4] and net.read_timeouts[-1] < 4  # the last read only gets the time left


def test_a_slow_trickle_is_cut_at_the_deadline_between_reads() -> None:
    net = _FakeNetwork(per_read=0.75, read_timeout=4, deadline=3, retries=0)
    with pytest.raises(FetchError, match=r"3 s deadline passed"):
        net.fetch_bytes("http://example.invalid/x", 100)
    assert net.now == 3 and len(net.read_timeouts) == 4
    assert net.read_timeouts == [3, 2.25, 1.5, 0.75]


def test_partial_file_is_kept_after_giving_up_and_resumed_later(
    make: Callable[..., HttpFetcher], serve: Any, tmp_path: Path
) -> None:
    srv = serve({"/b": Route(body=BODY, fault="cut", cut_after=100_000)})
    dest = tmp_path / "b"
    with pytest.raises(FetchError, match="failed after 1 attempt "):
        make(retries=0).fetch_to_file(srv.url("/b"), dest, max_bytes=len(BODY), expected_sha256=SHA)
    assert dest.read_bytes() == BODY[:100_000]
    srv.routes["/b"] = Route(body=BODY)
    make().fetch_to_file(srv.url("/b"), dest, max_bytes=len(BODY), expected_sha256=SHA)
    assert srv.seen("/b")[-1].headers["Range"] == "bytes=100000-"
    assert dest.read_bytes() == BODY

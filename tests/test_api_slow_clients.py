"""Issue 9 §5: slow clients cannot starve the inference API, and a refused request still reads its reply.

Real ApiServers on loopback with the real models (test_api_server's fixtures),
real sockets for the slow clients; the last test attacks a real
``edge-runtime serve`` subprocess with tools/slowloris.py. Timings are never
asserted beyond a generous sanity bound (5 s) that only a starved server misses.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import test_api_server
from cli_helpers import Device, cli
from daemon_helpers import REPO, Serve, ppocr_input, wait_for, write_config
from test_api_server import INFER, Gate, connect, json_infer_body, ppocr_tensor, start, still_answers
from test_cli import pack_ppocr

from edge_runtime.runtime.service import InferenceService

models, service = test_api_server.models, test_api_server.service  # its fixtures: real models, loaded once here
SANITY_SECONDS = 5.0  # not a performance claim: a starved server answers 503 or never


@contextlib.contextmanager
def slow_sockets(address: tuple[str, int], heads: int, bodies: int) -> Iterator[list[socket.socket]]:
    """``heads`` connections that sent half a request head, ``bodies`` that sent a head and 1 byte of 1000."""
    socks = []
    try:
        for i in range(heads + bodies):
            sock = socket.create_connection(address, timeout=5)
            socks.append(sock)
            if i < heads:
                sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n")
            else:
                sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{".encode())
        yield socks
    finally:
        for sock in socks:
            sock.close()


def timed_ok(srv: object, method: str, path: str, body: bytes | None = None) -> float:
    """One request on a new connection: asserts a 200, returns its seconds."""
    t0 = time.monotonic()
    conn = connect(srv)  # type: ignore[arg-type]
    conn.request(method, path, body=body)
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status == 200, (method, path, response.status)
    return time.monotonic() - t0


def test_slow_clients_beyond_the_old_cap_starve_neither_health_nor_inference(service: InferenceService) -> None:
    # On main: the cap of 4 * max_concurrency + 16 = 32 connections is full, health and inference get 503;
    # and a head sent with its body dripping took an inference slot before the body was read.
    with start(service, max_concurrency=4) as srv, slow_sockets(srv.address, 90, 30):  # type: ignore[arg-type]
        body = json_infer_body(ppocr_tensor())
        for _ in range(5):
            assert timed_ok(srv, "GET", "/v2/health/live") < SANITY_SECONDS
            assert timed_ok(srv, "POST", INFER, body) < SANITY_SECONDS
        keep_alive = connect(srv)
        for _ in range(3):  # keep-alive still works beside them
            keep_alive.request("POST", INFER, body=body)
            response = keep_alive.getresponse()
            assert response.status == 200 and json.loads(response.read())["model_name"] == "ppocr-cls"
            assert not response.will_close


def test_pipelined_requests_on_one_connection_are_answered_in_order(service: InferenceService) -> None:
    # The intake keeps what arrived after a request for the next one: pipelining and keep-alive survive it.
    with start(service) as srv, socket.create_connection(srv.address, timeout=10) as sock:  # type: ignore[arg-type]
        body = json_infer_body(ppocr_tensor())
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
                     + f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
                     + b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")
        replies = []
        stream = sock.makefile("rb")  # one reader for all three: a reply must not be lost in another's buffer
        for _ in range(3):
            status = int(stream.readline().split()[1])
            headers = dict(line.decode().rstrip("\r\n").split(": ", 1) for line in iter(stream.readline, b"\r\n"))
            replies.append((status, json.loads(stream.read(int(headers["Content-Length"])))))
        assert [status for status, _ in replies] == [200, 200, 200]
        assert replies[0][1] == {"live": True} and replies[1][1]["model_name"] == "ppocr-cls"
        assert replies[2][1]["name"] == "edge-runtime"


def test_when_full_the_slowest_request_is_evicted_with_a_408(service: InferenceService) -> None:
    with start(service, max_connections=16) as srv, slow_sockets(srv.address, 16, 0) as slow:  # type: ignore[arg-type]
        # Wait until the intake has read all 16 half heads (accepted in order: slow[0] is the oldest).
        wait_for(lambda: srv._intake is not None and len(srv._intake._receiving) == 16, 10, "16 half heads")
        assert timed_ok(srv, "GET", "/v2/health/live") < SANITY_SECONDS
        oldest = slow[0]
        reply = http.client.HTTPResponse(oldest, method="GET")
        reply.begin()
        assert reply.status == 408 and reply.will_close and "evicted" in json.loads(reply.read())["error"]
        still_answers(srv)


def test_bodies_held_at_once_are_bounded_and_the_largest_is_refused(service: InferenceService) -> None:
    # Bodies are received before a worker sees them, so their sum is capped (4 x max_request_bytes):
    # six clients that each stop 1 byte short of a 1 MiB body cannot make the daemon hold 6 MiB.
    mib = 1 << 20
    with start(service, max_request_bytes=mib) as srv:
        socks = [socket.create_connection(srv.address, timeout=10) for _ in range(6)]  # type: ignore[arg-type]
        try:
            for sock in socks:
                sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {mib}\r\n\r\n".encode()
                             + b"x" * (mib - 1))
            refused = []
            for sock in socks:
                sock.settimeout(0.5)
                with contextlib.suppress(TimeoutError):
                    if sock.recv(12) == b"HTTP/1.1 503":
                        refused.append(sock)
            assert 2 <= len(refused) <= 3  # 4 MiB + 64 KiB hold four of them, at most
            assert timed_ok(srv, "GET", "/v2/health/live") < SANITY_SECONDS
        finally:
            for sock in socks:
                sock.close()


def test_out_of_descriptors_pauses_accepts_instead_of_spinning(service: InferenceService,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    # A fault only a fake can make: accept() failing with EMFILE leaves the listener readable, and a
    # loop that retried at once would spin a core and flood the log.
    calls = []
    real_accept = socket.socket.accept

    def failing_accept(self: socket.socket) -> tuple[socket.socket, object]:
        calls.append(time.monotonic())
        raise OSError(errno.EMFILE, "Too many open files")

    with start(service) as srv:
        monkeypatch.setattr(socket.socket, "accept", failing_accept)
        waiting = socket.create_connection(srv.address, timeout=10)  # type: ignore[arg-type]
        time.sleep(1.0)
        monkeypatch.setattr(socket.socket, "accept", real_accept)
        assert 1 <= len(calls) <= 25  # paused and retried a few times a second, not thousands
        assert sum("cannot accept connections" in r.getMessage() for r in caplog.records) == 1
        with waiting:  # the connection waited in the backlog and is served once accepts resume
            waiting.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            response = http.client.HTTPResponse(waiting, method="GET")
            response.begin()
            assert response.status == 200


def connect_status(srv: object) -> int:
    conn = connect(srv)  # type: ignore[arg-type]
    conn.request("GET", "/v2/health/live")
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status


def _send_then_read(address: tuple[str, int], request: bytes) -> bytes:
    """Send all of ``request`` as a simple client does (http.client, tritonclient), then read to the end."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def test_a_connection_refused_at_the_cap_reads_its_503_while_sending_a_body(
        service: InferenceService, monkeypatch: pytest.MonkeyPatch) -> None:
    # On main the 503 at the connection cap was written and the socket closed at once, with the body
    # unread: the kernel then resets the connection and the client never reads the status line.
    gate = Gate(service, monkeypatch)
    with start(service, max_connections=2, max_concurrency=2) as srv:
        held = [gate.post_in_background(srv) for _ in range(2)]  # both connections busy in a worker
        body = b"x" * (1 << 20)
        for _ in range(3):
            data = _send_then_read(srv.address,  # type: ignore[arg-type]
                                   f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                                   + body)
            head, _, error = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 ") and b"Connection: close" in head
            assert "too many connections" in json.loads(error)["error"]
        gate.release.set()
        for thread, _ in held:
            thread.join(5)
        wait_for(lambda: connect_status(srv) == 200, 5, "a worker to give its connection back", 0.02)


def test_a_slow_head_gets_a_408_before_the_connection_ends(service: InferenceService) -> None:
    # On main a head that missed its deadline was closed without a word.
    with start(service, request_timeout=0.3) as srv:
        data = b""
        with socket.create_connection(srv.address, timeout=10) as sock:  # type: ignore[arg-type]
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
            while chunk := sock.recv(65536):
                data += chunk
        head, _, error = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and "request head not received in time" in json.loads(error)["error"]


def test_slowloris_of_500_sockets_against_a_real_serve(tmp_path: Path, keys: dict[str, Path],
                                                       zoo: Callable[[str], Path]) -> None:
    # The acceptance run (issue 9), shortened: 500 slow sockets for 10 s (tools/slowloris.py re-opens
    # those the server closes) while health probes and real inferences must all be answered 200.
    config, state, port = write_config(tmp_path / "device", keys["trust_dir"])
    cli("models", "install", pack_ppocr(Device(tmp_path, config, state, keys), zoo, 1), "--config", config)
    serve = Serve(config, state, port).start()
    try:
        wait_for(lambda: serve.proc is not None and _answers(serve), 60, "serve to answer", 0.1)
        result = subprocess.run([sys.executable, str(REPO / "tools" / "slowloris.py"), "--url",
                                 f"http://127.0.0.1:{port}", "--sockets", "500", "--seconds", "10",
                                 "--max-latency", str(SANITY_SECONDS), "--json"],
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads(result.stdout)
        assert report["held_min"] >= 450, report  # the attack really held its sockets
        for probe in report["probes"]:
            assert probe["requests"] >= 5 and probe["failures"] == 0, probe
        assert serve.proc is not None and serve.proc.poll() is None
        assert serve.infer("ppocr-cls", ppocr_input())[0] == 200
        assert serve.terminate() == 0
    finally:
        if serve.proc and serve.proc.poll() is None:
            serve.kill9()


def _answers(serve: Serve) -> bool:
    assert serve.proc is not None and serve.proc.poll() is None, serve.stderr()[-3000:]
    try:
        return serve.get("/v2/health/live")[0] == 200
    except OSError:
        return False

"""The inference API's round trip vs the library call vs bare onnxruntime, on ppocr cls.

Usage: python tools/bench_api.py [--runs 600] [--threads 1]

The ApiServer runs in a child process, as the daemon does (no GIL shared with
the client). One client thread in this process sends, over loopback with
keep-alive (``http.client``), the ppocr cls model one input in several ways:
a JPEG of a 48x192 crop of grace_hopper (``image/jpeg``: decode +
preprocess + infer + postprocess in the daemon), binary tensor data (the
OIP binary extension, binary output) and a JSON float tensor ([1,3,48,192] =
27,648 floats, as 17-digit float64 reprs and as 9-digit float32 reprs).

The bare ``InferenceSession.run`` on the same tensor and the library call
without HTTP (``InferenceService.predict_bytes`` / ``.infer``) are timed
inside the daemon process, on its CPU and its loaded model, so the three
numbers compare like with like. They run in rotating blocks of 20 calls
(the first 3 of a block not counted), so drift hits all equally. Overhead
columns: API median - bare median, and API - library (HTTP + codec alone).

Then the Nagle pitfall: the keep-alive round trip of a plain stdlib
``http.server`` handler (headers and body written separately) without and
with TCP_NODELAY, and of ApiServer with ``tcp_nodelay`` off and on.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import http.server
import json
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray
from ppocr_bench_kit import install_ppocr_classifier

from edge_runtime.api_server import ApiServer
from edge_runtime.config import ApiConfig, BackendConfig, Config
from edge_runtime.metrics import Metrics
from edge_runtime.model_store import ModelStore
from edge_runtime.model_zoo import fetch
from edge_runtime.serving import InferenceService

NAME = "ppocr-cls"
INFER = f"/v2/models/{NAME}/infer"
HEADER_LENGTH = "Inference-Header-Content-Length"
BLOCK, WARM = 20, 3

Runner = Callable[[int], list[float]]
"""``runner(n)`` makes n calls and returns each one's milliseconds."""


def _config(work: Path, threads: int) -> Config:
    return Config(state_dir=work / "state", trust_dir=work / "trust",
                  backend=BackendConfig(providers=("CPUExecutionProvider",), threads=threads))


def _timed(fn: Callable[[], object], n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _daemon(pipe: Connection, work: str, threads: int, tcp_nodelay: bool, jpeg: bytes) -> None:
    """The daemon process: serves the API and, on request, times bare and library calls itself."""
    import onnxruntime as ort

    service = InferenceService(Metrics())
    model = ModelStore(_config(Path(work), threads)).load(NAME)
    service.add_slot(NAME).swap(model)
    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if decoded is None:
        raise SystemExit("cannot decode the JPEG crop")
    x = model.image_to_tensor(decoded)  # the tensor the daemon computes from the JPEG
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(fetch("ppocr_cls")), so, providers=["CPUExecutionProvider"])
    calls: dict[str, Callable[[], object]] = {
        "bare": lambda: session.run(None, {"x": x}),
        "library bytes": lambda: service.predict_bytes(NAME, jpeg),
        "library tensor": lambda: service.infer(NAME, {"x": x}),
    }
    with ApiServer(ApiConfig(listen="127.0.0.1:0"), service, service.metrics, tcp_nodelay=tcp_nodelay) as server:
        pipe.send((server.address, x))
        while (request := pipe.recv()) is not None:
            name, n = request
            pipe.send(_timed(calls[name], n))


@contextlib.contextmanager
def _daemon_process(work: Path, threads: int, jpeg: bytes, tcp_nodelay: bool = True,
                    ) -> Iterator[tuple[http.client.HTTPConnection, Callable[[str], Runner], NDArray[Any]]]:
    """(keep-alive connection to the daemon, runner of named calls inside it, the tensor it made)."""
    ctx = multiprocessing.get_context("spawn")  # no fork after onnxruntime started its threads
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_daemon, args=(child, str(work), threads, tcp_nodelay, jpeg), daemon=True)
    proc.start()

    def remote(name: str) -> Runner:
        def run(n: int) -> list[float]:
            parent.send((name, n))
            times: list[float] = parent.recv()
            return times

        return run

    try:
        (host, port), x = parent.recv()
        conn = http.client.HTTPConnection(host, port)
        yield conn, remote, x
        conn.close()
    finally:
        parent.send(None)
        proc.join(10)


def _request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> Callable[[], None]:
    def call() -> None:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise SystemExit(f"API answered {response.status} on {method} {path}")

    return call


def _local(fn: Callable[[], object]) -> Runner:
    return lambda n: _timed(fn, n)


def _rotate(runners: list[Runner], runs: int) -> list[list[float]]:
    """``runs`` samples (ms) of each: blocks of BLOCK calls in rotating order, the first WARM of a block dropped.

    Blocks, not single calls: alternating call by call would charge each call the
    cold caches the previous one left, which a daemon serving steadily does not have.
    """
    for runner in runners:
        runner(10)
    times: list[list[float]] = [[] for _ in runners]
    for i in range(-(-runs // (BLOCK - WARM))):
        for k in range(len(runners)):
            j = (i + k) % len(runners)
            times[j] += runners[j](BLOCK)[WARM:]
    return [t[:runs] for t in times]


def _p(samples: list[float], q: float) -> float:
    return float(np.percentile(samples, q))


class _PlainHandler(http.server.BaseHTTPRequestHandler):
    """The textbook stdlib handler: keep-alive, headers and body in separate unbuffered writes."""

    protocol_version = "HTTP/1.1"
    body = b'{"ready":true}'

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _NoDelayHandler(_PlainHandler):
    disable_nagle_algorithm = True


def _plain_round_trip(handler: type[_PlainHandler], runs: int) -> list[float]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1])
        (times,) = _rotate([_local(_request(conn, "GET", "/"))], runs)
        conn.close()
        return times
    finally:
        server.shutdown()
        server.server_close()


def _jpeg_crop() -> bytes:
    hopper = cv2.imread(str(fetch("grace_hopper")))
    if hopper is None:
        raise SystemExit("cannot read grace_hopper.jpg")
    ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(hopper[100:148, 150:342]), [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise SystemExit("cannot encode the JPEG crop")
    return encoded.tobytes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nagle-runs", type=int, default=20, help="runs for the slow (~40 ms) stdlib case")
    args = parser.parse_args(argv)
    jpeg = _jpeg_crop()
    rows: list[tuple[str, int, list[list[float]]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        install_ppocr_classifier(Path(tmp), _config(Path(tmp), args.threads), NAME)
        with _daemon_process(Path(tmp), args.threads, jpeg) as (conn, remote, x):
            header = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                             "parameters": {"binary_data_size": x.nbytes}}],
                                 "parameters": {"binary_data_output": True}}).encode()
            binary = header + x.tobytes()
            binary_headers = {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}
            # tolist() writes each float32 as its float64 repr (17 digits, what tritonclient sends);
            # the shortest float32 repr has about 9 digits and parses about twice as fast.
            floats = json.dumps(x.ravel().tolist())
            as_json = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                              "data": "DATA"}]}).encode()
            json_17 = as_json.replace(b'"DATA"', floats.encode())
            json_9 = as_json.replace(b'"DATA"', ("[" + ",".join(map(str, x.ravel())) + "]").encode())
            cases = [
                ("raw JPEG bytes", jpeg, {"Content-Type": "image/jpeg"}, "library bytes"),
                ("binary tensor", binary, binary_headers, "library tensor"),
                ("JSON, 17 digits", json_17, {"Content-Type": "application/json"}, "library tensor"),
                ("JSON, 9 digits", json_9, {"Content-Type": "application/json"}, "library tensor"),
            ]
            for label, body, headers, library in cases:
                runs = args.runs if not label.startswith("JSON") else max(50, args.runs // 4)
                api = _local(_request(conn, "POST", INFER, body, headers))
                rows.append((label, len(body), _rotate([remote("bare"), remote(library), api], runs)))
            (live,) = _rotate([_local(_request(conn, "GET", "/v2/health/live"))], args.runs)
        with _daemon_process(Path(tmp), args.threads, jpeg, tcp_nodelay=False) as (conn, _, _):
            (nagle_live,) = _rotate([_local(_request(conn, "GET", "/v2/health/live"))], args.runs)
            (nagle_binary,) = _rotate([_local(_request(conn, "POST", INFER, binary, binary_headers))], args.runs)

    print(f"ppocr cls [1,3,48,192] FP32, onnxruntime CPU, intra-op threads={args.threads}; ms. API: loopback, "
          "keep-alive, daemon in a child process; bare and library timed inside the daemon process")
    print(f"{'input sent as':16} {'bytes':>7} {'runs':>5} {'bare p50':>9} {'lib p50':>8} {'API p50':>8} "
          f"{'API p95':>8} {'API-bare':>9} {'API-lib':>8}")
    for label, size, (tb, tl, ta) in rows:
        b50, l50, a50 = statistics.median(tb), statistics.median(tl), statistics.median(ta)
        print(f"{label:16} {size:7d} {len(ta):5d} {b50:9.3f} {l50:8.3f} {a50:8.3f} {_p(ta, 95):8.3f} "
              f"{a50 - b50:+9.3f} {a50 - l50:+8.3f}")
    print("\nkeep-alive round trip (ms), Nagle + delayed ACK pitfall:")
    nagle = [
        ("stdlib handler, no TCP_NODELAY", "GET", _plain_round_trip(_PlainHandler, args.nagle_runs)),
        ("stdlib handler, TCP_NODELAY", "GET", _plain_round_trip(_NoDelayHandler, args.runs)),
        ("ApiServer tcp_nodelay=False", "GET /v2/health/live", nagle_live),
        ("ApiServer tcp_nodelay=False", "POST binary infer", nagle_binary),
        ("ApiServer (default)", "GET /v2/health/live", live),
        ("ApiServer (default)", "POST binary infer", rows[1][2][2]),
    ]
    print(f"{'server':32} {'request':22} {'p50':>8} {'p95':>8}")
    for label, request, times in nagle:
        print(f"{label:32} {request:22} {statistics.median(times):8.3f} {_p(times, 95):8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

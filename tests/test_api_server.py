"""The inference API over real sockets, with real models and real HTTP clients.

Models are packed with the real CLI and installed through ModelStore once per
module; each test gets a fresh InferenceService (readiness starts false) and
an ApiServer on 127.0.0.1 port 0 (or a unix socket in tmp_path).
"""

from __future__ import annotations

import http.client
import json
import socket
import stat
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import FACE_SPEC, PPOCR_SPEC, cli
from prometheus_client.parser import text_string_to_metric_families

from edge_runtime.api.codec import decode_infer_request, encode_infer_response
from edge_runtime.api.server import ApiServer
from edge_runtime.bundle.signing import generate_keypair
from edge_runtime.config.model import ApiConfig, BackendConfig, Config
from edge_runtime.errors import ConfigError, InferenceError, InputError
from edge_runtime.runtime.backends.base import TensorInfo
from edge_runtime.runtime.loaded_model import LoadedModel
from edge_runtime.runtime.service import InferenceService
from edge_runtime.telemetry.metrics import Metrics
from edge_runtime.update.store import ModelStore

PPOCR, FACE = "ppocr-cls", "face"
PPOCR_OUT = "save_infer_model/scale_0.tmp_1"
HEADER_LENGTH = "Inference-Header-Content-Length"


# --------------------------------------------------------------------------- fixtures and clients


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, zoo: Callable[[str], Path]) -> Iterator[dict[str, LoadedModel]]:
    """ppocr-cls v1 (onnx) and face v1 (tflite, preprocess + sigmoid top-1), packed by the CLI, loaded once."""
    root = tmp_path_factory.mktemp("api-models")
    generate_keypair(root / "publisher.key")
    (root / "trust").mkdir()
    (root / "trust" / "publisher.pub").write_bytes((root / "publisher.key.pub").read_bytes())
    packs = {PPOCR: ("ppocr_cls", PPOCR_SPEC), FACE: ("face_detection", FACE_SPEC)}

    def pack(name: str) -> Path:
        key, spec = packs[name]
        (root / f"{name}.toml").write_text(spec)
        out = root / f"{name}.bundle"
        cli("bundle", "pack", "--model", zoo(key), "--name", name, "--version", 1, "--key", root / "publisher.key",
            "--spec", root / f"{name}.toml", "-o", out)
        return out

    with ThreadPoolExecutor(2) as pool:
        bundles = list(pool.map(pack, packs))
    store = ModelStore(Config(state_dir=root / "state", trust_dir=root / "trust",
                              backend=BackendConfig(providers=("CPUExecutionProvider",), threads=1)))
    for bundle in bundles:
        store.install(bundle)
    loaded = {name: store.load(name) for name in packs}
    yield loaded
    for model in loaded.values():
        model.close()


@pytest.fixture()
def service(models: dict[str, LoadedModel]) -> InferenceService:
    svc = InferenceService(Metrics())
    for name, model in models.items():
        svc.add_slot(name).swap(model)
    return svc


def start(service: InferenceService, listen: str = "127.0.0.1:0", **kwargs: Any) -> ApiServer:
    max_concurrency = kwargs.pop("max_concurrency", 4)
    max_request_bytes = kwargs.pop("max_request_bytes", 1 << 20)
    server = ApiServer(ApiConfig(listen=listen, max_request_bytes=max_request_bytes, max_concurrency=max_concurrency),
                       service, service.metrics, **kwargs)
    server.start()
    return server


@pytest.fixture()
def server(service: InferenceService) -> Iterator[ApiServer]:
    srv = start(service)
    yield srv
    srv.stop()


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes
    closed: bool = field(default=False)

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> str:
        """The one-line error message (asserts the error shape)."""
        assert self.headers.get("Content-Type") == "application/json", self.headers
        doc = self.json()
        assert list(doc) == ["error"] and isinstance(doc["error"], str) and doc["error"]
        assert "\n" not in doc["error"] and len(doc["error"]) <= 300
        return str(doc["error"])


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over AF_UNIX: same protocol, a socket path instead of host:port."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def connect(server: ApiServer) -> http.client.HTTPConnection:
    address = server.address
    if isinstance(address, str):
        return UnixHTTPConnection(address)
    return http.client.HTTPConnection(*address, timeout=10)


def call(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
         headers: Mapping[str, str] | None = None) -> Reply:
    conn.request(method, path, body=body, headers=dict(headers or {}))
    response = conn.getresponse()
    data = response.read()
    return Reply(response.status, dict(response.getheaders()), data, response.will_close)


def raw(server: ApiServer, request: bytes, *, then: bytes = b"", timeout: float = 5.0) -> tuple[Reply, socket.socket]:
    """Send raw bytes (after them, ``then``), read one response; the socket stays open for more."""
    host, port = server.address  # type: ignore[misc]
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.sendall(request)
    if then:
        sock.sendall(then)
    response = http.client.HTTPResponse(sock, method=request.split(b" ", 1)[0].decode())
    response.begin()
    data = response.read()
    return Reply(response.status, dict(response.getheaders()), data, response.will_close), sock


def still_answers(server: ApiServer) -> None:
    with urllib.request.urlopen(server.url + "/v2/health/live", timeout=5) as response:
        assert response.status == 200 and json.loads(response.read()) == {"live": True}


def ppocr_tensor(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, 48, 192)).astype(np.float32)


def bare_ppocr(zoo: Callable[[str], Path], x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(zoo("ppocr_cls")), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {"x": x})[0]
    return out


def json_infer_body(x: np.ndarray, **extra: Any) -> bytes:
    doc = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}], **extra}
    return json.dumps(doc).encode()


def binary_infer_body(x: np.ndarray, binary_output: bool) -> tuple[bytes, dict[str, str]]:
    doc: dict[str, Any] = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}]}
    if binary_output:
        doc["outputs"] = [{"name": PPOCR_OUT, "parameters": {"binary_data": True}}]
    header = json.dumps(doc).encode()
    return header + x.astype("<f4").tobytes(), {HEADER_LENGTH: str(len(header)),
                                                "Content-Type": "application/octet-stream"}


# --------------------------------------------------------------------------- health, metadata, metrics


def test_live_and_ready_turn_true_after_the_first_inference(server: ApiServer) -> None:
    conn = connect(server)
    assert call(conn, "GET", "/v2/health/live").json() == {"live": True}
    not_ready = call(conn, "GET", "/v2/health/ready")
    assert (not_ready.status, not_ready.json()) == (503, {"ready": False})
    assert call(conn, "POST", f"/v2/models/{PPOCR}/infer", json_infer_body(ppocr_tensor())).status == 200
    ready = call(conn, "GET", "/v2/health/ready")
    assert (ready.status, ready.json()) == (200, {"ready": True})
    head = call(conn, "HEAD", "/v2/health/live")
    assert head.status == 200 and head.body == b""


def test_server_and_model_metadata(server: ApiServer) -> None:
    conn = connect(server)
    assert "binary_tensor_data" in call(conn, "GET", "/v2").json()["extensions"]
    meta = call(conn, "GET", f"/v2/models/{PPOCR}").json()
    assert meta["name"] == PPOCR and meta["versions"] == ["1"] and "onnxruntime" in meta["platform"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3, -1, -1]}]
    assert meta["outputs"] == [{"name": PPOCR_OUT, "datatype": "FP32", "shape": [-1, 2]}]
    assert call(conn, "GET", f"/v2/models/{PPOCR}/versions/1").json() == meta
    assert call(conn, "GET", f"/v2/models/{FACE}/ready").json() == {"name": FACE, "ready": True}
    assert call(conn, "GET", f"/v2/models/{PPOCR}/versions/1/ready").status == 200
    wrong_version = call(conn, "GET", f"/v2/models/{PPOCR}/versions/2/ready")
    assert wrong_version.status == 404 and "version 1" in wrong_version.error()
    unknown = call(conn, "GET", "/v2/models/nope")
    assert unknown.status == 404 and "nope" in unknown.error()


def test_model_without_a_loaded_version_is_503(service: InferenceService) -> None:
    service.add_slot("empty")
    with start(service) as srv:
        reply = call(connect(srv), "GET", "/v2/models/empty/ready")
        assert reply.status == 503 and reply.headers["Retry-After"] == "1" and "not loaded" in reply.error()


def test_metrics_are_prometheus_text_and_count_api_inferences(server: ApiServer) -> None:
    conn = connect(server)

    def inferences() -> float:
        reply = call(conn, "GET", "/metrics")
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        families = {f.name: f for f in text_string_to_metric_families(reply.body.decode())}
        samples = [s for s in families["edge_inferences"].samples if s.labels.get("model") == PPOCR]
        return samples[0].value if samples else 0.0

    before = inferences()
    for seed in range(3):
        assert call(conn, "POST", f"/v2/models/{PPOCR}/infer", json_infer_body(ppocr_tensor(seed))).status == 200
    assert inferences() == before + 3


# --------------------------------------------------------------------------- inference


def test_json_tensor_infer_matches_bare_onnxruntime_over_keep_alive(server: ApiServer,
                                                                    zoo: Callable[[str], Path]) -> None:
    x = ppocr_tensor(1)
    conn = connect(server)
    reply = call(conn, "POST", f"/v2/models/{PPOCR}/infer", json_infer_body(x, id="req-7"),
                 {"Content-Type": "application/json"})
    first_socket = conn.sock
    doc = reply.json()
    assert reply.status == 200 and not reply.closed
    assert (doc["model_name"], doc["model_version"], doc["id"]) == (PPOCR, "1", "req-7")
    (out,) = doc["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == (PPOCR_OUT, "FP32", [1, 2])
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(1, 2), bare_ppocr(zoo, x), atol=1e-5)
    assert call(conn, "GET", "/v2/health/ready").status == 200
    assert conn.sock is first_socket  # the same connection carried both requests


@pytest.mark.parametrize("binary_output", [True, False], ids=["binary-out", "json-out"])
def test_binary_tensor_infer_matches_bare_onnxruntime(server: ApiServer, zoo: Callable[[str], Path],
                                                      binary_output: bool) -> None:
    x = ppocr_tensor(2)
    body, headers = binary_infer_body(x, binary_output)
    reply = call(connect(server), "POST", f"/v2/models/{PPOCR}/versions/1/infer", body, headers)
    assert reply.status == 200
    if binary_output:
        n = int(reply.headers[HEADER_LENGTH])
        assert reply.headers["Content-Type"] == "application/octet-stream"
        (out,) = json.loads(reply.body[:n])["outputs"]
        assert out["parameters"] == {"binary_data_size": 8} and "data" not in out
        got = np.frombuffer(reply.body[n:], "<f4").reshape(out["shape"])
    else:
        assert HEADER_LENGTH not in reply.headers
        (out,) = reply.json()["outputs"]
        got = np.array(out["data"], np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got, bare_ppocr(zoo, x), atol=1e-5)


def test_raw_jpeg_on_face_detection_finds_the_face(server: ApiServer, zoo: Callable[[str], Path]) -> None:
    reply = call(connect(server), "POST", f"/v2/models/{FACE}/infer", zoo("grace_hopper").read_bytes(),
                 {"Content-Type": "image/jpeg"})
    doc = reply.json()
    assert reply.status == 200 and (doc["model_name"], doc["model_version"]) == (FACE, "1")
    assert doc["results"]["top"][0]["score"] > 0.8
    assert doc["latency_ms"]["total"] > 0


def test_npy_body_runs_the_declared_pipeline(server: ApiServer, zoo: Callable[[str], Path]) -> None:
    import io

    x = ppocr_tensor(3)
    buffer = io.BytesIO()
    np.save(buffer, x[0])  # no batch dim: the runtime adds it
    reply = call(connect(server), "POST", f"/v2/models/{PPOCR}/infer", buffer.getvalue(),
                 {"Content-Type": "application/octet-stream"})
    bare = bare_ppocr(zoo, x)[0]
    top = reply.json()["results"]["top"]
    assert top[0]["index"] == int(np.argmax(bare)) and top[0]["score"] == pytest.approx(float(bare.max()), abs=1e-5)


# --------------------------------------------------------------------------- hostile input


def _post(path: str, body: bytes, *headers: str, length: bool = True) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", *headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


INFER = f"/v2/models/{PPOCR}/infer"


def _infer_json(entry: Mapping[str, Any]) -> bytes:
    return _post(INFER, json.dumps({"inputs": [{"name": "x", "shape": [1, 3, 48, 192], "datatype": "FP32",
                                                **entry}]}).encode())


_FLOATS = [0.0] * (3 * 48 * 192)
_HDR = json.dumps({"inputs": [{"name": "x", "shape": [1, 3, 48, 192], "datatype": "FP32",
                               "parameters": {"binary_data_size": 4 * 3 * 48 * 192}}]}).encode()

# (id, raw request, status, words in the error, connection kept for the next request)
HOSTILE: list[tuple[str, bytes, int, str, bool]] = [
    ("malformed-json", _post(INFER, b'{"inputs": ['), 400, "not valid JSON", True),
    ("deep-nesting", _post(INFER, b"[" * 100_000), 400, "nested too deeply", True),
    ("not-an-object", _post(INFER, b"[1, 2]"), 400, "must be an object", True),
    ("nan-literal", _post(INFER, b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[NaN]}]}'),
     400, "NaN", True),
    ("overflow", _infer_json({"data": [1e39, *_FLOATS[1:]]}), 400, "out of range for FP32", True),
    ("datatype-mismatch", _infer_json({"datatype": "INT8", "data": [0] * len(_FLOATS)}), 400,
     "does not match the model's FP32", True),
    ("unknown-datatype", _infer_json({"datatype": "FP8", "data": _FLOATS}), 400, "not one of", True),
    ("shape-vs-data", _infer_json({"data": [0.0] * 10}), 400, "needs 27648 values", True),
    ("shape-vs-model", _infer_json({"shape": [1, 2, 48, 288], "data": _FLOATS}), 400, "shape", True),
    # One dim short and no batch dim would make it fit: the error names the shape as sent.
    ("rank-vs-model", _infer_json({"shape": [1, 3, 9216], "data": _FLOATS}), 400, "shape (1, 3, 9216), expected", True),
    ("strings-as-data", _infer_json({"data": ["1.0"] * len(_FLOATS)}), 400, "only numbers", True),
    ("ragged-data", _infer_json({"data": [[0.0], [0.0, 1.0]]}), 400, "rectangular", True),
    ("unknown-input", _infer_json({"name": "y", "data": _FLOATS}), 400, "unknown input 'y'", True),
    ("unknown-output", _post(INFER, json.dumps({"inputs": [{"name": "x", "shape": [1, 3, 48, 192], "datatype": "FP32",
                                                            "data": _FLOATS}], "outputs": [{"name": "z"}]}).encode()),
     400, "unknown output 'z'", True),
    ("binary-header-too-long", _post(INFER, b"{}", f"{HEADER_LENGTH}: 99"), 400, "outside", True),
    ("binary-size-wrong", _post(INFER, _HDR.replace(b"110592", b"110588") + bytes(110588),
                                f"{HEADER_LENGTH}: {len(_HDR)}"), 400, "binary_data_size", True),
    ("binary-short", _post(INFER, _HDR + bytes(100), f"{HEADER_LENGTH}: {len(_HDR)}"), 400, "short", True),
    ("binary-trailing", _post(INFER, _HDR + bytes(110592 + 4), f"{HEADER_LENGTH}: {len(_HDR)}"), 400,
     "follow the last", True),
    ("octet-not-npy", _post(INFER, b"\x00" * 64, "Content-Type: application/octet-stream"), 400, ".npy", True),
    ("corrupt-jpeg", _post(f"/v2/models/{FACE}/infer", b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(100),
                           "Content-Type: image/jpeg"), 400, "JPEG", True),
    ("unknown-model", _post("/v2/models/nope/infer", b"{}"), 404, "nope", False),
    ("wrong-version", _post(f"/v2/models/{PPOCR}/versions/9/infer", b"{}"), 404, "version 1", False),
    ("unknown-path", b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no such endpoint", True),
    ("get-on-infer", f"GET {INFER} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 405, "use POST", True),
    ("post-on-live", _post("/v2/health/live", b"{}"), 405, "use GET", False),
    ("delete", b"DELETE /v2 HTTP/1.1\r\nHost: x\r\n\r\n", 405, "use GET", True),
    ("no-content-length", _post(INFER, b"", length=False), 411, "Content-Length is required", True),
    ("chunked", _post(INFER, b"2\r\n{}\r\n0\r\n\r\n", "Transfer-Encoding: chunked", length=False), 411,
     "chunked", False),
    ("too-large", _post(INFER, b"", "Content-Length: 10000000000", length=False), 413, "exceeds", False),
    ("bad-content-length", _post(INFER, b"", "Content-Length: 1e3", length=False), 400, "Content-Length", False),
    ("two-content-lengths", _post(INFER, b"{}", "Content-Length: 5"), 400, "Content-Length", False),
    ("garbage-request-line", b"\x16\x03\x01 hello\r\n\r\n", 400, "request", False),
    ("unknown-method", b"BREW /v2 HTTP/1.1\r\nHost: x\r\n\r\n", 501, "BREW", False),
    ("header-too-long", b"GET /v2 HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431, "too long", False),
]


@pytest.mark.parametrize(("request_bytes", "status", "words", "keep"), [c[1:] for c in HOSTILE],
                         ids=[c[0] for c in HOSTILE])
def test_hostile_request_gets_a_one_line_error_and_the_server_carries_on(
        server: ApiServer, request_bytes: bytes, status: int, words: str, keep: bool) -> None:
    reply, sock = raw(server, request_bytes)
    with sock:
        assert reply.status == status, reply.body
        assert words in reply.error()
        assert reply.closed is not keep
        if keep:  # the same connection serves the next request
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            again = http.client.HTTPResponse(sock, method="GET")
            again.begin()
            assert again.status == 200 and json.loads(again.read()) == {"live": True}
    still_answers(server)


def test_expect_100_continue_only_after_the_checks(server: ApiServer) -> None:
    # The intake answers 100 Continue once the Content-Length is acceptable (within the cap), then
    # receives the body before a worker routes it: a 404 or 503 comes after the body, not instead of it.
    body = json_infer_body(ppocr_tensor())
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(server.address, timeout=5) as sock:  # type: ignore[arg-type]
        sock.sendall(head.encode())
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        response = http.client.HTTPResponse(sock, method="POST")
        response.begin()
        assert response.status == 200
    too_big, sock = raw(server, _post(INFER, b"", "Expect: 100-continue", "Content-Length: 2000000", length=False))
    sock.close()
    assert too_big.status == 413  # no 100 Continue first: the client never sends the body


def test_slow_clients_are_cut_off(service: InferenceService) -> None:
    with start(service, idle_timeout=0.3, request_timeout=0.5) as srv:
        with socket.create_connection(srv.address, timeout=5) as idle:  # type: ignore[arg-type]
            t0 = time.monotonic()
            assert idle.recv(1) == b""  # an idle keep-alive connection is closed by the server
            assert 0.2 < time.monotonic() - t0 < 2.0
        with socket.create_connection(srv.address, timeout=5) as loris:  # type: ignore[arg-type]
            loris.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
            t0 = time.monotonic()
            with pytest.raises(OSError):  # headers trickled a byte at a time never complete a request
                for _ in range(40):
                    loris.sendall(b"X")
                    time.sleep(0.05)
            assert time.monotonic() - t0 < 2.0
        slow_body, sock = raw(srv, _post(INFER, b"", "Content-Length: 100", length=False), then=b"{")
        sock.close()
        assert slow_body.status == 408 and slow_body.closed
        still_answers(srv)


# --------------------------------------------------------------------------- concurrency and shutdown


class Gate:
    """Makes service.infer wait until released, so requests can be held in flight."""

    def __init__(self, service: InferenceService, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()
        real = service.infer

        def held(name: str, feeds: Mapping[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
            self.entered.release()
            self.release.wait(10)
            return real(name, feeds)

        monkeypatch.setattr(service, "infer", held)

    def post_in_background(self, server: ApiServer) -> tuple[threading.Thread, list[Reply | OSError]]:
        replies: list[Reply | OSError] = []

        def post() -> None:
            try:
                replies.append(call(connect(server), "POST", INFER, json_infer_body(ppocr_tensor())))
            except OSError as e:  # http.client's RemoteDisconnected is one
                replies.append(e)

        thread = threading.Thread(target=post)
        thread.start()
        assert self.entered.acquire(timeout=5)
        return thread, replies


def test_over_max_concurrency_gets_503_and_health_still_answers(service: InferenceService,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(service, monkeypatch)
    with start(service, max_concurrency=1) as srv:
        thread, replies = gate.post_in_background(srv)
        busy = call(connect(srv), "POST", INFER, json_infer_body(ppocr_tensor()))
        assert busy.status == 503 and busy.headers["Retry-After"] == "1" and "max_concurrency" in busy.error()
        still_answers(srv)  # probes are not bounded by inference concurrency
        gate.release.set()
        thread.join(5)
        assert isinstance(replies[0], Reply) and replies[0].status == 200
        assert call(connect(srv), "POST", INFER, json_infer_body(ppocr_tensor())).status == 200


@pytest.mark.parametrize("mb", [6, 12])
def test_a_refused_request_still_gets_its_reply_while_the_client_sends_the_body(
        service: InferenceService, monkeypatch: pytest.MonkeyPatch, mb: int) -> None:
    # http.client sends the whole body before it reads. The 413 goes out before the body is read, and
    # closing with unread bytes used to reset the connection under the client (EPIPE while sending,
    # or ECONNRESET reading), so it never saw the reply. The 503 comes after the intake received the
    # body whole (no inference slot waits for a client), so that connection stays open.
    gate = Gate(service, monkeypatch)
    body = b"x" * (mb << 20)
    with start(service, max_concurrency=1, max_request_bytes=8 << 20) as srv:
        thread, replies = gate.post_in_background(srv)
        for _ in range(3):
            refused = call(connect(srv), "POST", INFER, body, {"Content-Type": "application/json"})
            assert refused.status == (503 if mb < 8 else 413), refused
            assert refused.closed is (mb >= 8) and "api.max_" in refused.error()
        gate.release.set()
        thread.join(5)
        assert isinstance(replies[0], Reply) and replies[0].status == 200


class _SlowRelease:
    """A BoundedSemaphore whose release lags: the window in which a finished request still holds its slot."""

    def __init__(self, inner: threading.BoundedSemaphore) -> None:
        self.inner = inner

    def acquire(self, blocking: bool = True) -> bool:
        return self.inner.acquire(blocking)

    def release(self) -> None:
        time.sleep(0.2)
        self.inner.release()


def test_back_to_back_requests_at_max_concurrency_one_are_never_busy(service: InferenceService) -> None:
    with start(service, max_concurrency=1) as srv:
        context = srv._context  # the fault goes into the server's own slot semaphore
        context.inference_slots = _SlowRelease(context.inference_slots)  # type: ignore[assignment]
        body = json_infer_body(ppocr_tensor())
        # A new connection each time (a new handler thread), as independent clients would send them.
        statuses = [call(connect(srv), "POST", INFER, body).status for _ in range(3)]
        assert statuses == [200, 200, 200]


def test_at_the_connection_cap_the_longest_idle_makes_room_and_503_only_when_all_are_busy(
        service: InferenceService, monkeypatch: pytest.MonkeyPatch) -> None:
    # The cap no longer refuses newcomers while idle or slow connections hold it (issue 9 §5): the
    # longest idle keep-alive connection is closed for the new one. Only connections whose requests
    # are being answered are never evicted, and with all of them busy a newcomer gets the 503.
    gate = Gate(service, monkeypatch)
    with start(service, max_connections=2, max_concurrency=2) as srv:
        first, second = connect(srv), connect(srv)
        assert call(first, "GET", "/v2").status == 200
        # A client has its reply a moment before the worker hands the connection back to the intake:
        # under load the second could be given back first, so wait until the first one is idle.
        intake = srv._intake
        assert intake is not None
        deadline = time.monotonic() + 5
        while not (intake._idle or intake._returned) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert call(second, "GET", "/v2").status == 200
        assert call(connect(srv), "GET", "/v2").status == 200  # evicts first, the longest idle
        assert first.sock is not None and first.sock.recv(1) == b""
        second.close()
        threads = [gate.post_in_background(srv) for _ in range(2)]  # two requests held in workers
        refused = call(connect(srv), "GET", "/v2")
        assert refused.status == 503 and refused.closed and "too many connections" in refused.error()
        gate.release.set()
        for thread, replies in threads:
            thread.join(5)
            assert isinstance(replies[0], Reply) and replies[0].status == 200
        deadline = time.monotonic() + 5
        while call(connect(srv), "GET", "/v2").status != 200:  # once a worker has given its connection back
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_stop_lets_requests_in_flight_finish(service: InferenceService, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(service, monkeypatch)
    srv = start(service)
    idle = connect(srv)
    assert call(idle, "GET", "/v2").status == 200  # an idle keep-alive connection must not delay stop()
    thread, replies = gate.post_in_background(srv)
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    time.sleep(0.2)
    assert stopper.is_alive()  # waiting for the request in flight
    gate.release.set()
    stopper.join(5)
    thread.join(5)
    assert not stopper.is_alive()
    assert isinstance(replies[0], Reply) and replies[0].status == 200 and replies[0].closed
    assert idle.sock is not None and idle.sock.recv(1) == b""  # the idle keep-alive connection was closed
    with pytest.raises(OSError):
        call(connect(srv), "GET", "/v2/health/live")


def test_stop_is_bounded_when_a_request_hangs(service: InferenceService, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(service, monkeypatch)
    srv = start(service, drain_timeout=0.3)
    thread, replies = gate.post_in_background(srv)
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 2.0 and not srv.alive
    gate.release.set()
    thread.join(5)
    assert isinstance(replies[0], OSError)  # cut off after the drain timeout, not waited for


def test_keep_alive_round_trip_is_not_held_by_nagle(server: ApiServer) -> None:
    conn = connect(server)
    body = json_infer_body(ppocr_tensor())
    call(conn, "POST", INFER, body)
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        assert call(conn, "GET", "/v2/health/ready").status == 200
        times.append(time.perf_counter() - t0)
    assert statistics.median(times) < 0.02  # Nagle + delayed ACK would make it ~40 ms


# --------------------------------------------------------------------------- listening


def test_unix_socket_serves_and_stop_removes_it(service: InferenceService, tmp_path: Path,
                                                zoo: Callable[[str], Path]) -> None:
    path = tmp_path / "api.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a socket file left by a dead daemon: nobody listens
    stale.close()
    srv = start(service, f"unix:{path}")
    try:
        assert srv.address == str(path) and srv.url.startswith("http+unix://")
        assert stat.S_ISSOCK(path.lstat().st_mode) and stat.S_IMODE(path.lstat().st_mode) == 0o660
        conn = connect(srv)
        x = ppocr_tensor(4)
        reply = call(conn, "POST", INFER, json_infer_body(x))
        np.testing.assert_allclose(np.array(reply.json()["outputs"][0]["data"]).reshape(1, 2), bare_ppocr(zoo, x),
                                   atol=1e-5)
        assert call(conn, "GET", "/v2/health/ready").json() == {"ready": True}
        with pytest.raises(ConfigError, match="another process"):
            start(service, f"unix:{path}")
    finally:
        srv.stop()
    assert not path.exists()


def test_unix_socket_path_holding_a_file_is_left_alone(service: InferenceService, tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        start(service, f"unix:{path}")
    assert path.read_text() == "not a socket"


def test_port_in_use_is_a_config_error(server: ApiServer, service: InferenceService) -> None:
    host, port = server.address  # type: ignore[misc]
    assert server.url == f"http://{host}:{port}" and port > 0
    with pytest.raises(ConfigError, match="cannot listen"):
        start(service, f"{host}:{port}")


def test_urllib_client_and_error_statuses(server: ApiServer) -> None:
    request = urllib.request.Request(server.url + INFER, data=b'{"inputs": 3}',
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    assert caught.value.code == 400
    assert json.loads(caught.value.read()) == {"error": "request needs a non-empty 'inputs' list"}


# --------------------------------------------------------------------------- codec round trips


_ALL_TYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
              "FP64"]
_NP = {"BOOL": "bool", "FP16": "float16", "FP32": "float32", "FP64": "float64"}


@pytest.mark.parametrize("datatype", _ALL_TYPES)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_codec_round_trips_every_datatype(datatype: str, binary: bool) -> None:
    dtype = np.dtype(_NP.get(datatype, datatype.lower()))
    values = (np.arange(6) % 2 == 1) if dtype.kind == "b" else (np.arange(6) * 3 - (5 if dtype.kind != "u" else 0))
    arr = values.astype(dtype).reshape(2, 3)
    inputs = {"t": TensorInfo("t", (None, 3), dtype.name)}
    entry: dict[str, Any] = {"name": "t", "shape": [2, 3], "datatype": datatype}
    if binary:
        entry["parameters"] = {"binary_data_size": arr.nbytes}
        header = json.dumps({"inputs": [entry], "parameters": {"binary_data_output": True}}).encode()
        request = decode_infer_request(header + arr.astype(dtype.newbyteorder("<")).tobytes(), len(header),
                                       inputs, ["t"])
    else:
        entry["data"] = arr.tolist()  # nested rows are accepted as well as flat data
        request = decode_infer_request(json.dumps({"inputs": [entry]}).encode(), None, inputs, ["t"])
    decoded = request.inputs["t"]
    assert decoded.dtype == dtype and decoded.shape == (2, 3) and np.array_equal(decoded, arr)
    body, header_length = encode_infer_response("m", 3, request, {"t": decoded})
    doc = json.loads(body[:header_length])
    (out,) = doc["outputs"]
    assert (out["datatype"], out["shape"], doc["model_version"]) == (datatype, [2, 3], "3")
    if binary:
        assert header_length is not None
        back = np.frombuffer(body[header_length:], dtype.newbyteorder("<")).reshape(2, 3)
    else:
        assert header_length is None
        back = np.array(out["data"], dtype).reshape(2, 3)
    assert np.array_equal(back, arr)


@pytest.mark.parametrize(("datatype", "data", "words"), [
    ("INT8", [127, 128], "out of range for INT8"),
    ("UINT8", [-1, 0], "out of range for UINT8"),
    ("INT32", [1.5, 2], "only integers"),
    ("BOOL", [1, 0], "only true/false"),
    ("FP16", [70000.0, 0], "out of range for FP16"),
    ("FP32", [None, 0], "only numbers"),
])
def test_codec_refuses_lossy_json_values(datatype: str, data: list[Any], words: str) -> None:
    dtype = np.dtype(_NP.get(datatype, datatype.lower()))
    body = json.dumps({"inputs": [{"name": "t", "shape": [2], "datatype": datatype, "data": data}]}).encode()
    with pytest.raises(InputError, match=words):
        decode_infer_request(body, None, {"t": TensorInfo("t", (2,), dtype.name)}, ["t"])


def test_codec_nan_output_needs_binary() -> None:
    inputs = {"t": TensorInfo("t", (1,), "float32")}
    entry = {"name": "t", "shape": [1], "datatype": "FP32", "data": [1]}
    nan = {"t": np.array([np.nan], np.float32)}
    as_json = decode_infer_request(json.dumps({"inputs": [entry]}).encode(), None, inputs, ["t"])
    with pytest.raises(InferenceError, match="binary"):
        encode_infer_response("m", 1, as_json, nan)
    doc = {"inputs": [entry], "outputs": [{"name": "t", "parameters": {"binary_data": True}}]}
    out, n = encode_infer_response("m", 1, decode_infer_request(json.dumps(doc).encode(), None, inputs, ["t"]), nan)
    assert n is not None and np.isnan(np.frombuffer(out[n:], "<f4")).all()


def test_codec_quantised_input_takes_floats() -> None:
    inputs = {"q": TensorInfo("q", (2,), "int8", quantization=(0.5, 0))}
    body = b'{"inputs":[{"name":"q","shape":[2],"datatype":"FP32","data":[1.0,-2.0]}]}'
    assert decode_infer_request(body, None, inputs, []).inputs["q"].dtype == np.float32  # quantised by to_tensor
    with pytest.raises(InputError, match="does not match"):
        decode_infer_request(body.replace(b"FP32", b"INT16"), None, inputs, [])

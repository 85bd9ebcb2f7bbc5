"""Run the real ``edge-runtime`` CLI in a subprocess, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent

FACE_SPEC = """
[preprocess]
resize = "stretch"
color = "rgb"
mean = [127.5]
std = [127.5]

[postprocess]
type = "classification"
output = "classificators"
activation = "sigmoid"
top_k = 1

[gates]
latency_ms_p95 = 2000.0
"""

PPOCR_SPEC = """
[preprocess]
size = [48, 192]
color = "bgr"
scale = 0.00392156862745098
mean = [0.5]
std = [0.5]

[postprocess]
type = "classification"
activation = "none"
top_k = 2
"""


def cli(*args: str | Path, check: bool = True, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m edge_runtime ARGS``; with ``check`` a non-zero exit fails the test."""
    full_env = dict(os.environ) | (env or {})
    proc = subprocess.run([sys.executable, "-m", "edge_runtime", *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=timeout, check=False, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"edge-runtime {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def face_tensor(image_path: Path) -> np.ndarray:
    """The face detector's input for an image, computed by hand (no library code)."""
    bgr = cv2.imread(str(image_path))
    rgb = cv2.cvtColor(cv2.resize(bgr, (128, 128), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
    return ((rgb.astype(np.float32) - 127.5) / 127.5)[None]


def bare_face_outputs(model: Path, tensor: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs of the bare LiteRT interpreter on ``tensor``."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(model))
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], tensor)
    interp.invoke()
    return {d["name"]: interp.get_tensor(d["index"]) for d in interp.get_output_details()}


@dataclass
class Device:
    """A device set up through the CLI: config, trust dir, state dir, signing keys."""

    root: Path
    config: Path
    state: Path
    keys: dict[str, Path]

    def cli(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        return cli(*args, "--config", self.config, check=check)

    def models(self) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = json.loads(self.cli("models", "list", "--json").stdout)
        return listed

    def tree(self) -> dict[str, str]:
        """Every path under models/ with link targets / sizes: any change shows."""
        out = {}
        for p in sorted((self.state / "models").rglob("*")):
            rel = str(p.relative_to(self.state))
            out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else str(p.stat().st_size if p.is_file() else "dir")
        return out


def make_device(root: Path, keys: dict[str, Path], extra_config: str = "") -> Device:
    root.mkdir(parents=True, exist_ok=True)
    state = root / "state"
    config = root / "config.toml"
    config.write_text(f'state_dir = "{state}"\ntrust_dir = "{keys["trust_dir"]}"\n{extra_config}')
    return Device(root, config, state, keys)

"""Run TFLite models with whatever TFLite runtime this interpreter has; save inputs and outputs.

Usage: python tflite_legacy_child.py OUT_DIR MODEL.tflite...

Run from a venv that has only numpy<2 and tflite-runtime (the legacy-device
set-up), with the repository on PYTHONPATH. For each model it writes
OUT_DIR/<stem>.npz holding the inputs it fed (``in:<name>``) and the outputs
(``out:<name>``), and prints one JSON line: the backend's description and numpy's version.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from edge_runtime.runtime.backends import BackendOptions, create_backend


def main(out_dir: Path, models: list[Path]) -> None:
    descriptions = {}
    rng = np.random.default_rng(7)
    for path in models:
        backend = create_backend("tflite", path, BackendOptions())
        feeds = {}
        for info in backend.inputs:
            shape = [d or 1 for d in info.shape]
            dtype = np.dtype(info.dtype)
            if dtype.kind == "f":
                feeds[info.name] = rng.random(shape, dtype=np.float32).astype(dtype)
            else:
                limits = np.iinfo(dtype)
                feeds[info.name] = rng.integers(limits.min, limits.max, shape, endpoint=True).astype(dtype)
        outputs = backend.infer(feeds)
        np.savez(out_dir / f"{path.stem}.npz", **{f"in:{k}": v for k, v in feeds.items()},
                 **{f"out:{k}": v for k, v in outputs.items()})
        descriptions[path.stem] = backend.description
        backend.close()
    print(json.dumps({"descriptions": descriptions, "numpy": np.__version__}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])

"""What the strict JSON loader costs against a plain ``json.loads``, on the documents it reads.

Usage: python tools/bench_strict_json.py [--runs 30]

Rows: an OIP inference body of the ppocr cls input ([1,3,48,192] = 27,648
floats, float32 reprs) and of a 224x224 RGB input (150,528 floats), read the
way :mod:`edge_runtime.api.codec` reads them (per-number hooks off: the codec
range-checks values itself); a manifest-sized document and a fleet command,
read with every check on. Columns: the median of ``--runs`` calls, in ms (the two
loaders alternate within each run).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edge_runtime._util.strict_text import load_json
from edge_runtime.errors import InputError


def _infer_body(shape: tuple[int, ...]) -> bytes:
    data = np.random.default_rng(0).random(shape, dtype=np.float32)
    doc = {"inputs": [{"name": "x", "shape": list(shape), "datatype": "FP32",
                       "data": [float(f"{v:.9g}") for v in data.ravel()]}]}
    return json.dumps(doc).encode()


def _manifest() -> bytes:
    files = {f"golden/{i}.input.npy": {"sha256": "0" * 64, "size": 1000 + i} for i in range(64)}
    return json.dumps({"schema": 1, "name": "m", "version": 3, "files": files,
                       "preprocess": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}).encode()


def _medians_ms(fns: tuple[Callable[[], Any], ...], runs: int) -> list[float]:
    """Median ms of each of ``fns``, called in turn within each run so drift on a busy machine hits all."""
    samples: list[list[float]] = [[] for _ in fns]
    for i in range(runs + 1):
        for fn, out in zip(fns, samples, strict=True):
            start = time.perf_counter()
            fn()
            if i:  # the first round warms up
                out.append((time.perf_counter() - start) * 1000)
    return [statistics.median(s) for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    command = b'{"id": "c-1", "ts": 1700000000.5, "args": {"url": "https://x/b.bundle", "n": 3}}'
    rows: list[tuple[str, bytes, dict[str, Any]]] = [
        ("OIP body 1x3x48x192", _infer_body((1, 3, 48, 192)), {"max_int_digits": None, "finite_floats": False}),
        ("OIP body 1x3x224x224", _infer_body((1, 3, 224, 224)), {"max_int_digits": None, "finite_floats": False}),
        ("manifest, 64 files", _manifest(), {}),
        ("fleet command", command, {"max_bytes": 65536, "max_depth": 32}),
    ]
    print(f"{'document':24} {'bytes':>9} {'json.loads ms':>14} {'load_json ms':>13} {'ratio':>6}")
    for name, data, kwargs in rows:
        plain, strict = _medians_ms((functools.partial(json.loads, data),
                                     functools.partial(load_json, data, "doc", error=InputError, **kwargs)), args.runs)
        print(f"{name:24} {len(data):>9} {plain:>14.3f} {strict:>13.3f} {strict / plain:>6.2f}")


if __name__ == "__main__":
    main()

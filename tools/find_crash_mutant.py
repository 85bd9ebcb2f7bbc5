"""Search seeded mutants for ones that crash the bare runtime (e.g. LiteRT SIGSEGV) in a child.

Usage:
    python tools/find_crash_mutant.py [--model face_detection] [--seed 1] [--start 0] [--count 300]
                                      [--kinds flip,overwrite] [--want 3] [--jobs 2]

Each mutant (named ``model:seed:index``, see tools/fuzz_mutants.py) is loaded
and run once on a real input by the bare runtime, with no edge_runtime code,
in a child process, under the data-segment cap the gate child sets for itself
(``--mem-limit-mb``, default 512: some mutants only crash where a huge
allocation succeeds, and fail cleanly under the cap). A child killed by a signal is a crashing mutant: its name,
kind, changed offsets and signal are printed, one line each, until ``--want``
are found. Tests and tools/fuzz_models.py then use the name to get the same
bytes, so they gate a REAL crashing model, not a simulated one.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fuzz_mutants import KINDS, PROFILES, Mutant, crash_child_source, limited, make_mutant, real_inputs

__all__ = ["bare_crash", "search"]


def bare_crash(mutant: Mutant, fmt: str, work: Path, x_path: Path, mem_limit_mb: int = 0,
               timeout: float = 60.0) -> str:
    """Run ``mutant`` in the bare runtime in a child (under RLIMIT_DATA ``mem_limit_mb``, as the
    gate child caps itself; 0: none): the signal name if it died of one, else ''."""
    model = work / f"{mutant.label.replace(':', '-')}.{fmt}"
    model.write_bytes(mutant.data)
    argv = [sys.executable, "-c", crash_child_source(), str(model), fmt, str(x_path)]
    try:
        proc = subprocess.run(limited(argv, mem_limit_mb, "RLIMIT_DATA"), capture_output=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return "timeout"
    finally:
        model.unlink(missing_ok=True)
    return signal.Signals(-proc.returncode).name if proc.returncode < 0 else ""


def search(model: str, seed: int, start: int, count: int, kinds: tuple[str, ...], want: int,
           jobs: int, mem_limit_mb: int = 0) -> list[dict[str, object]]:
    """Mutants ``start..start+count`` of ``model`` (only ``kinds``) that crash the bare runtime."""
    profile = PROFILES[model]
    original = profile.path().read_bytes()
    found: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="find-crash-") as tmp:
        work = Path(tmp)
        x_path = work / "x.npy"
        np.save(x_path, real_inputs(profile, 1)[0])
        candidates = (i for i in range(start, start + count) if KINDS[i % len(KINDS)] in kinds)

        def probe(index: int) -> tuple[Mutant, str]:
            mutant = make_mutant(model, original, seed, index)
            return mutant, bare_crash(mutant, profile.format, work, x_path, mem_limit_mb)

        with ThreadPoolExecutor(jobs) as pool:
            for mutant, how in pool.map(probe, candidates):
                if how and len(found) < want:
                    found.append({"mutant": mutant.label, "kind": mutant.kind, "edits": mutant.edits, "signal": how})
                    print(f"{mutant.label}  {how}  {mutant.edits}", flush=True)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="face_detection", choices=sorted(PROFILES))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--kinds", default="flip,overwrite", help=f"comma-separated, of {','.join(KINDS)}")
    parser.add_argument("--want", type=int, default=3, help="stop reporting after this many")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--mem-limit-mb", type=int, default=512,
                        help="RLIMIT_DATA of the child, as the gate child's [gates] child_memory_mb (0: none); "
                             "some mutants SIGSEGV only where a huge allocation succeeds")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON at the end")
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"unknown kinds {sorted(unknown)}")
    found = search(args.model, args.seed, args.start, args.count, kinds, args.want, args.jobs,
                   args.mem_limit_mb)
    if args.json:
        print(json.dumps(found, indent=1))
    print(f"{len(found)} crashing mutant(s) among indices {args.start}..{args.start + args.count - 1}",
          file=sys.stderr)
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())

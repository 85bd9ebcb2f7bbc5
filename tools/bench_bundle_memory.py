"""Peak RSS of bundle pack / verify / install on a large model (default 200 MB).

Usage: python tools/bench_bundle_memory.py [--mb 200]

Each operation runs in a fresh child process that first imports everything it
needs, records its peak RSS (the interpreter baseline), runs the operation and
records the peak again; the table shows the growth. The model is a valid ONNX
file (one big initializer) so the external-data scan walks it for real;
install skips the load/golden gates, which would measure onnxruntime, not us.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(op: str, work: Path) -> dict[str, float]:
    bare = _peak_mb()
    from edge_runtime._util.fsutil import remove_tree
    from edge_runtime.bundle.manifest import TensorSpec
    from edge_runtime.bundle.reader import read_bundle
    from edge_runtime.bundle.signing import load_private_key, load_trusted_keys
    from edge_runtime.bundle.writer import BundleSpec, pack_bundle
    from edge_runtime.config.model import Config, Limits
    from edge_runtime.update.store import ModelStore

    limits = Limits(max_bundle_bytes=4 << 30)
    base = _peak_mb()
    t0 = time.perf_counter()
    bundle = work / "big.bundle"
    if op == "pack":
        n = (work / "big.onnx").stat().st_size // 4
        spec = BundleSpec(name="big", version=1, format="onnx", model=work / "big.onnx",
                          inputs=(TensorSpec("x", (n,), "float32"),), outputs=(TensorSpec("y", (n,), "float32"),))
        pack_bundle(bundle, spec, [load_private_key(work / "key")])
    elif op == "verify":
        staged = read_bundle(bundle, trusted=load_trusted_keys(work / "trust"), threshold=1, limits=limits,
                             staging_root=work / "verify-staging")
        remove_tree(staged.directory)
    else:
        store = ModelStore(Config(state_dir=work / "state", trust_dir=work / "trust", limits=limits))
        store.install(bundle, gates=False)
    return {"bare_mb": bare, "baseline_mb": base, "peak_mb": _peak_mb(), "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--child", choices=("pack", "verify", "install"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.work)))
        return 0
    from edge_runtime.bundle.signing import generate_keypair

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"import ppocr_bench_kit as k; from pathlib import Path; "
                        f"k.write_big_onnx(Path({str(work / 'big.onnx')!r}), {args.mb})"], check=True)
        generate_keypair(work / "key")
        (work / "trust").mkdir()
        (work / "trust" / "key.pub").write_bytes((work / "key.pub").read_bytes())
        size = (work / "big.onnx").stat().st_size / (1 << 20)
        print(f"model: {size:.0f} MB ONNX; peak RSS per child process: bare python, after imports, peak")
        print(f"{'operation':10} {'python MB':>10} {'+imports MB':>12} {'peak MB':>8} {'growth MB':>10} "
              f"{'vs python':>10} {'seconds':>8}  limit 64 MB")
        for op in ("pack", "verify", "install"):
            out = subprocess.run([sys.executable, __file__, "--child", op, "--work", str(work)],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            growth = r["peak_mb"] - r["baseline_mb"]
            print(f"{op:10} {r['bare_mb']:10.1f} {r['baseline_mb']:12.1f} {r['peak_mb']:8.1f} {growth:10.1f} "
                  f"{r['peak_mb'] - r['bare_mb']:10.1f} {r['seconds']:8.2f}  {'ok' if growth < 64 else 'OVER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What re-verifying a cached version costs per load and per activation (issue 9 §3).

Usage: python tools/bench_reverify.py [--repeat 20] [--mb 50] [--keys 1,8,32]

For the real ppocr-cls model and a synthetic ONNX model of ``--mb`` MB, each
installed into a fresh state dir (signed by one key, threshold 1) with
``--keys`` publisher keys in the trust dir, the table gives the median of
``--repeat`` runs, in milliseconds, of:

  keys        load_trusted_keys (read and parse every *.pub in the trust dir)
  manifest    read + parse manifest.json only (what a load did before)
  signed      read manifest.json + .sig, load keys, check the threshold, parse
  +sig        signed - manifest: what re-verification adds to one read
  verify      ModelCache.verify_version: signed + every file re-hashed
  load        ModelStore.load + close: signed + model/labels hashed + runtime

An activation (Activator.activate) reads the manifest signed twice, once in
ModelStore.load and once in ModelCache.activate, so it pays 2 x ``+sig``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ppocr_bench_kit import write_big_onnx

from edge_runtime.bundle.manifest import TensorSpec
from edge_runtime.bundle.reverify import Trust, read_verified_manifest
from edge_runtime.bundle.signing import generate_keypair, load_private_key, load_trusted_keys
from edge_runtime.bundle.writer import BundleSpec, pack_bundle
from edge_runtime.config.model import Config
from edge_runtime.devtools.model_zoo import fetch
from edge_runtime.update.store import ModelStore

PPOCR_IO = ((TensorSpec("x", (None, 3, None, None), "float32", "NCHW"),),
            (TensorSpec("save_infer_model/scale_0.tmp_1", (None, 2), "float32"),))


def _median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm the page cache and imports: the steady per-activation cost is what we want
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _synthetic_model(path: Path, mb: int) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    n = write_big_onnx(path, mb)
    return (TensorSpec("x", (n,), "float32"),), (TensorSpec("y", (n,), "float32"),)


def _row(work: Path, label: str, model: Path, io: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]],
         n_keys: int, repeat: int) -> list[str]:
    trust_dir, keydir = work / "trust", work / "keys"
    trust_dir.mkdir()
    keydir.mkdir()
    for i in range(n_keys):
        generate_keypair(keydir / f"k{i}")
        (trust_dir / f"k{i}.pub").write_bytes((keydir / f"k{i}.pub").read_bytes())
    bundle = work / "m.bundle"
    pack_bundle(bundle, BundleSpec(name="m", version=1, format="onnx", model=model, inputs=io[0], outputs=io[1]),
                [load_private_key(keydir / "k0")])
    config = Config(state_dir=work / "state", trust_dir=trust_dir)
    store = ModelStore(config)
    store.install(bundle, gates=False)
    vdir, trust = store.cache.version_dir("m", 1), Trust(trust_dir, 1)
    caps = {"max_manifest_bytes": config.limits.max_manifest_bytes,
            "max_signature_bytes": config.limits.max_signature_bytes}

    def load() -> None:
        store.load("m", 1).close()

    keys = _median_ms(lambda: load_trusted_keys(trust_dir), repeat)
    plain = _median_ms(lambda: read_verified_manifest(vdir, "m", 1, trust=None, **caps), repeat)
    signed = _median_ms(lambda: read_verified_manifest(vdir, "m", 1, trust=trust, **caps), repeat)
    verify = _median_ms(lambda: store.cache.verify_version("m", 1), repeat)
    loaded = _median_ms(load, max(3, repeat // 4))
    size_mb = model.stat().st_size / (1 << 20)
    return [f"{label} ({size_mb:.1f} MB)", str(n_keys)] + [
        f"{v:.3f}" for v in (keys, plain, signed, signed - plain, verify, loaded)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--mb", type=int, default=50, help="size of the synthetic ONNX model")
    parser.add_argument("--keys", default="1,8,32", help="trusted keys in the trust dir, comma-separated")
    args = parser.parse_args()
    header = ["model", "keys", "keys ms", "manifest ms", "signed ms", "+sig ms", "verify ms", "load ms"]
    rows = [header]
    with tempfile.TemporaryDirectory(prefix="bench-reverify-") as tmp:
        big = Path(tmp) / "big.onnx"
        models = [("ppocr-cls", fetch("ppocr_cls"), PPOCR_IO), ("synthetic", big, _synthetic_model(big, args.mb))]
        for label, model, io in models:
            for n_keys in (int(k) for k in args.keys.split(",")):
                work = Path(tempfile.mkdtemp(dir=tmp))
                rows.append(_row(work, label, model, io, n_keys, args.repeat))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

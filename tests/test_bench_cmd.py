"""``edge-runtime bench``: library call vs bare runtime, on files and on installed models."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from cli_helpers import PPOCR_SPEC, cli, make_device

from edge_runtime.devtools.benchmark import compare, random_feeds
from edge_runtime.errors import InputError
from edge_runtime.runtime.backends.base import TensorInfo

Zoo = Callable[[str], Path]


def _check_timings(doc: dict[str, object]) -> tuple[float, float]:
    bare, lib = doc["bare_us"], doc["library_us"]
    assert isinstance(bare, dict) and isinstance(lib, dict)
    assert 0 < bare["median"] <= bare["p95"] and 0 < lib["median"] <= lib["p95"]
    assert doc["ratio"] == pytest.approx(lib["median"] / bare["median"], rel=1e-3)
    assert doc["delta_us"] == pytest.approx(lib["median"] - bare["median"], abs=1e-2)
    return bare["median"], lib["median"]


def test_bench_onnx_file_json(tmp_path: Path, zoo: Zoo) -> None:
    spec = tmp_path / "ppocr.toml"
    spec.write_text(PPOCR_SPEC)  # ppocr_cls has dynamic H/W: the spec's preprocess.size fills them
    out = cli("bench", "--model", zoo("ppocr_cls"), "--spec", spec, "--runs", "50", "--threads", "1", "--json")
    doc = json.loads(out.stdout)
    _check_timings(doc)
    assert doc["runs"] == 50 and doc["threads"] == 1 and doc["format"] == "onnx"
    assert doc["inputs"] == {"x": [1, 3, 48, 192]} and doc["runtime"].startswith("onnxruntime")


def test_bench_npy_input_prints_table(tmp_path: Path, zoo: Zoo) -> None:
    tensor = tmp_path / "x.npy"
    bgr = cv2.imread(str(zoo("grace_hopper")))
    np.save(tensor, ((cv2.resize(bgr, (192, 48)).astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1))
    out = cli("bench", "--model", zoo("ppocr_cls"), "--input", tensor, "--runs", "20", "--threads", "1")
    lines = out.stdout.splitlines()
    assert "x[1, 3, 48, 192]" in lines[0] and "threads 1" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["call", "bare", "library", "ratio"]
    assert float(lines[2].split()[1]) > 0 and float(lines[3].split()[1]) > 0


def test_bench_tflite_file(zoo: Zoo) -> None:
    doc = json.loads(cli("bench", "--model", zoo("face_detection"), "--runs", "20", "--json").stdout)
    _check_timings(doc)
    assert doc["format"] == "tflite" and doc["inputs"] == {"input": [1, 128, 128, 3]}


def test_bench_installed_model_with_image_input(tmp_path: Path, keys: dict[str, Path], zoo: Zoo) -> None:
    dev = make_device(tmp_path / "device", keys)
    spec = dev.root / "ppocr.toml"
    spec.write_text(PPOCR_SPEC)
    bundle = dev.root / "ppocr-v1.bundle"
    cli("bundle", "pack", "--model", zoo("ppocr_cls"), "--name", "ppocr-cls", "--version", "1",
        "--key", keys["a"], "--spec", spec, "-o", bundle)
    dev.cli("models", "install", bundle)
    # The image goes through the installed model's own declared preprocess (48x192).
    out = dev.cli("bench", "--installed", "ppocr-cls", "--input", zoo("grace_hopper"), "--runs", "30",
                  "--threads", "2", "--json")
    doc = json.loads(out.stdout)
    _check_timings(doc)
    assert doc["model"] == "ppocr-cls v1" and doc["threads"] == 2 and doc["inputs"] == {"x": [1, 3, 48, 192]}
    assert Path(doc["path"]).is_relative_to(dev.state / "models" / "ppocr-cls")

    missing = dev.cli("bench", "--installed", "nope", "--runs", "5", check=False)
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize(("extra", "message"), [
    ((), "dynamic dims (?, 3, ?, ?)"),  # nothing says what H/W to feed
    (("--shape", "1,3,48"), "4-D, the given shape has 3 dims"),
])
def test_bench_bad_input_is_one_line_error(zoo: Zoo, extra: tuple[str, ...], message: str) -> None:
    out = cli("bench", "--model", zoo("ppocr_cls"), "--runs", "5", *extra, check=False)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr


def test_bench_needs_exactly_one_model(zoo: Zoo) -> None:
    both = cli("bench", "--model", zoo("ppocr_cls"), "--installed", "x", check=False)
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_compare_alternates_and_attributes_time_to_the_right_call() -> None:
    calls: list[str] = []

    def bare() -> None:
        calls.append("b")

    def slow() -> None:
        calls.append("l")
        time.sleep(0.002)

    result = compare(bare, slow, runs=6, warmup=1)
    assert calls[:2] == ["b", "l"]
    timed = calls[2:]
    assert timed == ["b", "l", "l", "b", "b", "l", "l", "b", "b", "l", "l", "b"]  # who goes first swaps each round
    assert result.library.median_us > 1500 > result.bare.median_us
    assert result.ratio > 1 and result.delta_us > 1500
    with pytest.raises(InputError):
        compare(bare, slow, runs=0)


def test_random_feeds_fills_batch_and_hinted_dims_only() -> None:
    info = TensorInfo("x", (None, 3, None, None), "float32")
    assert random_feeds([info], {"x": (None, None, 48, 192)})["x"].shape == (1, 3, 48, 192)
    ids = random_feeds([TensorInfo("ids", (None, 8), "int64")])["ids"]
    assert ids.shape == (1, 8) and ids.dtype == np.int64 and ids.min() >= 0
    with pytest.raises(InputError, match="dynamic dims"):
        random_feeds([info])
    with pytest.raises(InputError, match="axis 1 is 3"):
        random_feeds([info], {"x": (1, 4, 48, 192)})

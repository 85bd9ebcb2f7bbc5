"""Issue 9 §2: ``bundle pack --golden-dir`` packs several golden cases, all checked by the device gate."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from cli_helpers import PPOCR_SPEC, Device, make_device

Zoo = Callable[[str], Path]


@pytest.fixture()
def device(tmp_path: Path, keys: dict[str, Path]) -> Device:
    return make_device(tmp_path / "dev", keys)


def _members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def test_golden_dir_packs_eight_cases_picked_evenly_and_the_device_checks_them_all(
        device: Device, zoo: Zoo, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(9)
    for i in range(10):
        np.save(inputs / f"case{i:02d}.npy", rng.standard_normal((1, 3, 48, 192)).astype(np.float32))
    (inputs / "notes.txt").write_text("not an input")
    spec = tmp_path / "ppocr.toml"
    spec.write_text(PPOCR_SPEC)
    bundle = tmp_path / "ppocr.bundle"
    out = device.cli("bundle", "pack", "--model", zoo("ppocr_cls"), "--name", "ppocr-cls", "--version", "1",
                     "--key", device.keys["a"], "--spec", spec, "--golden-dir", inputs, "-o", bundle).stdout
    assert "8 golden case(s)" in out, out

    members = _members(bundle)
    manifest = json.loads(members["manifest.json"])
    assert len(manifest["golden"]) == 8
    session = ort.InferenceSession(str(zoo("ppocr_cls")), providers=["CPUExecutionProvider"])
    for case, picked in zip(manifest["golden"], (0, 1, 2, 3, 5, 6, 7, 8), strict=True):
        packed = np.load(io.BytesIO(members[case["input"]]))
        assert np.array_equal(packed, np.load(inputs / f"case{picked:02d}.npy"))
        expected = np.load(io.BytesIO(members[case["expected"]]))
        want = session.run(None, {"x": packed})[0]
        assert np.allclose(expected[expected.files[0]], want, atol=1e-6)

    installed = device.cli("models", "install", bundle, "--json").stdout
    gates = json.loads(installed)["gates"]
    assert gates["golden_total"] == 8 and gates["golden_passed"] == 8


def test_pack_without_golden_dir_says_so(device: Device, zoo: Zoo, tmp_path: Path) -> None:
    spec = tmp_path / "ppocr.toml"
    spec.write_text(PPOCR_SPEC)
    out = device.cli("bundle", "pack", "--model", zoo("ppocr_cls"), "--name", "ppocr-cls", "--version", "1",
                     "--key", device.keys["a"], "--spec", spec, "-o", tmp_path / "b.bundle").stdout
    assert "0 golden case(s)" in out and "no --golden-dir: no golden case (--golden-dir DIR packs 8)" in out, out


def test_golden_dir_without_inputs_is_one_line(device: Device, zoo: Zoo, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = device.cli("bundle", "pack", "--model", zoo("ppocr_cls"), "--name", "ppocr-cls", "--version", "1",
                      "--key", device.keys["a"], "--golden-dir", empty, "-o", tmp_path / "b.bundle", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "has no input" in proc.stderr, proc.stderr

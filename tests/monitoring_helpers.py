"""Real inputs for the monitoring tests: crops of a real photo, and the shifts drift must catch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from cli_helpers import PPOCR_SPEC, cli

from edge_runtime.bundle.manifest import Manifest
from edge_runtime.config.model import Limits
from edge_runtime.runtime.backends.base import BackendOptions
from edge_runtime.runtime.loaded_model import LoadedModel

Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def crops(photo: Path, n: int, seed: int) -> list[np.ndarray]:
    """``n`` random text-line shaped crops (4:1, 40-120 px high) of a real photo: the reference kind of input."""
    img = cv2.imread(str(photo))
    assert img is not None
    rng = np.random.default_rng(seed)
    height, width = img.shape[:2]
    out = []
    for _ in range(n):
        h = int(rng.integers(40, 120))
        w = min(4 * h, width)
        y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        out.append(img[y:y + h, x:x + w].copy())
    return out


def text_lines(n: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    """``n`` rendered words (OpenCV's Hershey fonts, dark on light), half of them turned 180 degrees, and
    the true class of each for the ppocr orientation classifier (0: upright, 1: 180)."""
    rng = np.random.default_rng(seed)
    fonts = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX)
    letters = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    images, labels = [], []
    for _ in range(n):
        word = "".join(rng.choice(letters, int(rng.integers(5, 12))))
        img = np.full((48, 240, 3), int(rng.integers(180, 256)), np.uint8)
        ink = int(rng.integers(0, 80))
        cv2.putText(img, word, (4, 36), fonts[int(rng.integers(0, len(fonts)))], 1.0, (ink, ink, ink), 2,
                    cv2.LINE_AA)
        flipped = bool(rng.random() < 0.5)
        images.append(cv2.rotate(img, cv2.ROTATE_180) if flipped else img)
        labels.append(int(flipped))
    return images, labels


def darkened(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (img.astype(np.float32) * 0.4).astype(np.uint8)


def rotated_180(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return cv2.rotate(img, cv2.ROTATE_180)


def rotated_90(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE)


def noisy(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(img.astype(np.float32) + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)


SHIFTS: dict[str, Shift] = {"darkened": darkened, "rotated_180": rotated_180, "rotated_90": rotated_90,
                            "noisy": noisy}


def write_images(images: list[np.ndarray], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        cv2.imwrite(str(directory / f"{i:04d}.png"), img)
    return directory


def pack_with_reference(tmp: Path, model: Path, key: Path, reference_dir: Path, *, name: str = "cls",
                        version: int = 1, baseline: str = "") -> Path:
    """``bundle pack --reference DIR`` of the ppocr classifier, through the real CLI."""
    spec = tmp / f"spec-{version}.toml"
    spec.write_text(PPOCR_SPEC + (f"\n[baseline]\n{baseline}\n" if baseline else ""))
    out = tmp / f"{name}-{version}.bundle"
    cli("bundle", "pack", "--model", model, "--name", name, "--version", str(version), "--key", key,
        "--spec", spec, "--reference", reference_dir, "-o", out)
    return out


def load_bundle(bundle: Path, key: Path, work: Path) -> LoadedModel:
    """Verify and unpack ``bundle`` as a device does, then load it."""
    from edge_runtime.bundle.reader import read_bundle
    from edge_runtime.bundle.signing import key_id, load_public_key

    pub = load_public_key(Path(f"{key}.pub"))
    work.mkdir(parents=True, exist_ok=True)
    staged = read_bundle(bundle, trusted={key_id(pub): pub}, threshold=1, limits=Limits(), staging_root=work)
    manifest: Manifest = staged.manifest
    return LoadedModel(manifest, staged.directory, options=BackendOptions(), limits=Limits())

"""Pictures of results: boxes, labels, scores and keypoints (or a mask) drawn on the input image.

People would rather look than read JSON: ``edge-runtime run --draw`` and the demo use this.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_runtime._util.fsutil import atomic_write
from edge_runtime.errors import InputError

__all__ = ["draw_result", "drawable", "mask_bytes", "save_picture"]

_COLOURS = [(56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72),
            (23, 204, 146), (134, 219, 61), (52, 147, 26), (187, 212, 0), (168, 153, 44), (255, 194, 0)]


def drawable(result: dict[str, Any]) -> bool:
    """True when ``result`` has something to draw (detections or a segmentation)."""
    return "detections" in result or "segmentation" in result


def mask_bytes(result: dict[str, Any]) -> bytes | None:
    """The PNG bytes of a segmentation result's mask (None when it carries none)."""
    encoded = result.get("segmentation", {}).get("mask_png")
    return base64.b64decode(encoded) if isinstance(encoded, str) else None


def _caption(det: dict[str, Any]) -> str:
    name = det.get("label", f"class {det.get('class', '?')}")
    return f"{name} {float(det.get('score', 0.0)):.2f}"


def draw_result(image: NDArray[Any], result: dict[str, Any]) -> NDArray[Any]:
    """A copy of the BGR ``image`` with the result's detections (or mask overlay) drawn on it.

    Raises:
        InputError: the result has nothing to draw (see :func:`drawable`).
    """
    import cv2

    if not drawable(result):
        raise InputError("the model's results have no detections or segmentation to draw")
    canvas: NDArray[Any] = image.copy()
    thick = max(1, round(max(canvas.shape[:2]) / 400))
    png = mask_bytes(result)
    if png is not None:
        mask = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
        if mask is not None and mask.shape[:2] == canvas.shape[:2]:
            classes = mask.astype(np.int64)
            colours = np.asarray(_COLOURS, np.uint8)[classes % len(_COLOURS)]
            shown = classes > 0
            canvas[shown] = (0.5 * canvas[shown] + 0.5 * colours[shown]).astype(np.uint8)
    for det in result.get("detections", []):
        colour = _COLOURS[int(det.get("class", 0)) % len(_COLOURS)]
        x1, y1, x2, y2 = (round(float(v)) for v in det["box"])
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, thick)
        for x, y in det.get("keypoints", []):
            cv2.circle(canvas, (round(float(x)), round(float(y))), thick + 1, colour, -1)
        text = _caption(det)
        scale = 0.5 * thick
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        top = max(y1, th + base + 2)
        cv2.rectangle(canvas, (x1, top - th - base - 2), (x1 + tw + 2, top), colour, -1)
        cv2.putText(canvas, text, (x1 + 1, top - base - 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                    thick, cv2.LINE_AA)
    return canvas


def save_picture(path: Path, image: NDArray[Any], result: dict[str, Any]) -> None:
    """Draw ``result`` on ``image`` and write it to ``path`` (format from the suffix; 0600, atomic).

    Raises:
        InputError: nothing to draw, or OpenCV cannot encode that suffix.
    """
    import cv2

    picture = draw_result(image, result)
    try:
        ok, encoded = cv2.imencode(path.suffix or ".jpg", picture)
    except cv2.error:  # an extension OpenCV has no encoder for
        ok = False
    if not ok:
        raise InputError(f"cannot write a picture as {path.suffix or '(no suffix)'}: use .jpg or .png")
    atomic_write(path, encoded.tobytes())

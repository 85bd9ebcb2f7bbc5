"""Pre/post-processing on real images: exact against hand-written OpenCV, hostile inputs refused."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest

from edge_runtime.bundle.manifest import Postprocess, Preprocess
from edge_runtime.errors import InputError, ManifestError
from edge_runtime.runtime.backends.base import TensorInfo
from edge_runtime.runtime.postprocess import Postprocessor, parse_labels
from edge_runtime.runtime.preprocess import Preprocessor, decode_image, image_dimensions, load_npy

BIG = 1 << 30


@pytest.fixture(scope="module")
def hopper_bytes(zoo) -> bytes:  # type: ignore[no-untyped-def]
    return zoo("grace_hopper").read_bytes()


@pytest.fixture(scope="module")
def hopper(hopper_bytes: bytes) -> np.ndarray:
    return decode_image(hopper_bytes, BIG, BIG)


def test_decode_matches_opencv(hopper_bytes: bytes, hopper: np.ndarray) -> None:
    assert image_dimensions(hopper_bytes) == (512, 600)
    assert np.array_equal(hopper, cv2.imdecode(np.frombuffer(hopper_bytes, np.uint8), cv2.IMREAD_COLOR))


def test_png_dimensions_and_decode(hopper: np.ndarray) -> None:
    ok, png = cv2.imencode(".png", hopper[:40, :30])
    assert ok
    assert image_dimensions(png.tobytes()) == (30, 40)
    assert decode_image(png.tobytes(), BIG, BIG).shape == (40, 30, 3)


def test_nchw_scale_mean_std_matches_manual(hopper: np.ndarray) -> None:
    spec = Preprocess(resize="stretch", color="bgr", scale=1 / 255, mean=(0.5,), std=(0.5,))
    pre = Preprocessor(spec, (None, 3, 48, 192), "NCHW", "float32")
    tensor, _ = pre(hopper)
    manual = ((cv2.resize(hopper, (192, 48)).astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)[None]
    assert tensor.shape == (1, 3, 48, 192) and tensor.dtype == np.float32
    assert np.allclose(tensor, manual, atol=1e-6)


def test_nhwc_rgb_per_channel_mean(hopper: np.ndarray) -> None:
    spec = Preprocess(color="rgb", mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 8.0))
    tensor, _ = Preprocessor(spec, (1, 64, 64, 3), "NHWC", "float32")(hopper)
    rgb = cv2.cvtColor(cv2.resize(hopper, (64, 64)), cv2.COLOR_BGR2RGB).astype(np.float32)
    manual = (rgb - np.array([10, 20, 30], np.float32)) / np.array([2, 4, 8], np.float32)
    assert np.allclose(tensor[0], manual, atol=1e-5)


def test_letterbox_keeps_aspect_and_pads(hopper: np.ndarray) -> None:
    spec = Preprocess(resize="letterbox", color="rgb", letterbox_fill=114, dtype="uint8")
    tensor, box = Preprocessor(spec, (1, 128, 128, 3), "NHWC", "uint8")(hopper)
    # 600x512 (h x w) into 128x128: scale 128/600, width 109, 9-10 px padding left/right
    assert tensor.dtype == np.uint8 and tensor.shape == (1, 128, 128, 3)
    assert box.pad_y == 0 and box.pad_x == (128 - round(512 * 128 / 600)) // 2
    assert np.all(tensor[0, :, : box.pad_x] == 114)
    assert not np.all(tensor[0, :, box.pad_x + 5] == 114)


def test_gray_and_uint8_passthrough(hopper: np.ndarray) -> None:
    tensor, _ = Preprocessor(Preprocess(color="gray"), (1, 32, 32, 1), "NHWC", "uint8")(hopper)
    assert tensor.dtype == np.uint8 and tensor.shape == (1, 32, 32, 1)
    assert np.array_equal(tensor[0, :, :, 0], cv2.resize(cv2.cvtColor(hopper, cv2.COLOR_BGR2GRAY), (32, 32)))


@pytest.mark.parametrize(
    ("spec", "shape", "message"),
    [
        (Preprocess(), (1, 3, None, None), "dynamic height/width"),
        (Preprocess(color="gray"), (1, 3, 48, 48), "channel"),
        (Preprocess(mean=(1.0, 2.0)), (1, 3, 48, 48), "mean"),
        (Preprocess(), (1, 48), "4-D"),
    ],
)
def test_preprocess_spec_errors(spec: Preprocess, shape: tuple[int | None, ...], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Preprocessor(spec, shape, "", "float32")


def test_resize_none_refuses_other_sizes(hopper: np.ndarray) -> None:
    with pytest.raises(InputError, match="resize = none"):
        Preprocessor(Preprocess(resize="none"), (1, 3, 48, 48), "NCHW", "float32")(hopper)


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"GIF89a" + b"\0" * 100, "not a JPEG or PNG"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "truncated JPEG"),
        (_png_header(100_000, 100_000) + b"\0" * 64, "pixel cap"),
        (_png_header(0, 10) + b"\0" * 64, "zero size"),
        (_png_header(10, 10) + b"garbage" * 10, "corrupt"),
    ],
)
def test_bad_images_refused_with_reason(data: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message):
        decode_image(data, 1 << 20, 50_000_000)


def test_image_over_byte_cap(hopper_bytes: bytes) -> None:
    with pytest.raises(InputError, match="byte cap"):
        decode_image(hopper_bytes, 1024, BIG)


def test_truncated_real_jpeg_is_an_error_not_a_crash(hopper_bytes: bytes) -> None:
    with pytest.raises(InputError):
        decode_image(hopper_bytes[:300], BIG, BIG)


def test_npy_loads_numbers_and_refuses_pickles() -> None:
    buf = io.BytesIO()
    np.save(buf, np.arange(6, dtype=np.float32).reshape(2, 3))
    assert load_npy(buf.getvalue(), 1 << 20).shape == (2, 3)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError):
        load_npy(pickled.getvalue(), 1 << 20)
    with pytest.raises(InputError, match="cap"):
        load_npy(buf.getvalue(), 10)


def _outs(*names: str) -> list[TensorInfo]:
    return [TensorInfo(n, (None,), "float32") for n in names]


def test_classification_softmax_topk_labels() -> None:
    post = Postprocessor(Postprocess(type="classification", activation="softmax", top_k=2),
                         _outs("out"), ["cat", "dog", "fish"])
    logits = np.array([[1.0, 3.0, 2.0], [5.0, 0.0, 0.0]], np.float32)
    results = post({"out": logits})
    expect = np.exp(logits[0]) / np.exp(logits[0]).sum()
    assert [e["label"] for e in results[0]["top"]] == ["dog", "fish"]
    assert results[0]["top"][0]["score"] == pytest.approx(float(expect[1]), abs=1e-6)
    assert results[1]["top"][0] == {"index": 0, "label": "cat", "score": pytest.approx(0.986, abs=1e-3)}


def test_classification_sigmoid_over_flattened_anchors() -> None:
    post = Postprocessor(Postprocess(type="classification", output="b", activation="sigmoid", top_k=1),
                         _outs("a", "b"))
    scores = np.full((1, 896, 1), -5.0, np.float32)
    scores[0, 417, 0] = 2.0
    (result,) = post({"a": np.zeros((1, 2)), "b": scores})
    assert result["top"] == [{"index": 417, "score": pytest.approx(1 / (1 + np.exp(-2.0)), abs=1e-6)}]


def test_raw_returns_every_output_per_item() -> None:
    post = Postprocessor(Postprocess(), _outs("x", "y"))
    out = post({"x": np.ones((2, 3), np.float32), "y": np.zeros((2,), np.int8)})
    assert len(out) == 2
    assert out[1]["outputs"]["x"] == {"shape": [3], "dtype": "float32", "data": [1.0, 1.0, 1.0]}
    assert out[0]["outputs"]["y"]["data"] == 0


def test_labels_parsing() -> None:
    assert parse_labels(b"a\n b \n\n") == ["a", "b"]
    with pytest.raises(ManifestError, match="UTF-8"):
        parse_labels(b"\xff\xfe")

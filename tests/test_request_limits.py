"""Request content is bounded before anything is allocated: absurd shapes, lying .npy headers, big images.

Over the real API server (tests/test_api_server.py's fixtures: real models,
real sockets): hostile shapes and a .npy declaring 4 TB get a one-line 400 and
the process's memory does not move; concurrent image decodes share one byte
budget whose peak is read from the budget object itself, never from timing.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import test_api_server
from cli_helpers import PPOCR_SPEC, cli, make_device
from test_api_server import (
    FACE,
    HEADER_LENGTH,
    INFER,
    PPOCR,
    _post,
    call,
    connect,
    json_infer_body,
    ppocr_tensor,
    raw,
    start,
    still_answers,
)
from test_cli import pack_ppocr

from edge_runtime.api.server import ApiServer
from edge_runtime.config.model import Limits
from edge_runtime.errors import InputError
from edge_runtime.runtime.decode_budget import DecodeBudget, shared_budget
from edge_runtime.runtime.preprocess import decode_cost, decode_image
from edge_runtime.runtime.service import InferenceService
from edge_runtime.runtime.tensor_limits import load_npz, parse_npy

FACE_INFER = f"/v2/models/{FACE}/infer"
# The API tests' fixtures (real models packed and installed once per module, a server on loopback).
models, service, server = test_api_server.models, test_api_server.service, test_api_server.server


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _npy_text(header: str) -> bytes:
    """A version 1.0 .npy of ``header`` (padded as numpy pads it) and no data."""
    text = header.encode()
    text += b" " * ((64 - (10 + len(text) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def _npy_header_only(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """A .npy whose header declares ``shape`` of ``descr``, and no data follows."""
    return _npy_text(f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}")


def _shape_body(shape: list[int], binary: bool) -> tuple[bytes, list[str]]:
    entry: dict[str, Any] = {"name": "x", "datatype": "FP32", "shape": shape}
    if binary:
        entry["parameters"] = {"binary_data_size": 0}
        header = json.dumps({"inputs": [entry]}).encode()
        return header, [f"{HEADER_LENGTH}: {len(header)}"]
    entry["data"] = []
    return json.dumps({"inputs": [entry]}).encode(), []


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("shape", [[0, 2**62, 2**62], [0, 10**30], [2**63, 0], [0, 1 << 40, 3, 48, 192]],
                         ids=["2^62x2^62", "10^30", "2^63", "2^40"])
def test_absurd_shapes_are_400_with_one_line_before_any_allocation(server: ApiServer, shape: list[int],
                                                                  binary: bool) -> None:
    body, headers = _shape_body(shape, binary)
    reply, sock = raw(server, _post(INFER, body, *headers))
    with sock:
        assert reply.status == 400, reply.body
        error = reply.error()
        assert "input 'x': shape [" in error and ("2**63-1" in error or "tensor cap" in error), error
    still_answers(server)


def test_shape_off_the_models_fixed_dims_is_refused_before_the_tensor_is_built(server: ApiServer) -> None:
    # 0 elements, so nothing to allocate, but the model's input has 3 channels: say so, not "ok".
    body, headers = _shape_body([0, 4, 48, 192], binary=True)
    reply, sock = raw(server, _post(INFER, body, *headers))
    with sock:
        assert reply.status == 400 and "shape (0, 4, 48, 192), expected" in reply.error()


def test_npy_declaring_4_tb_in_128_bytes_is_400_and_memory_does_not_move(server: ApiServer) -> None:
    bombs = [_npy_header_only((10**12,)), _npy_header_only((1 << 20, 1 << 20, 1 << 20)),
             _npy_header_only((0, 10**18, 10**18)), _npy_header_only((3, 48, 192))]  # the last is 110592 bytes short
    assert len(bombs[0]) == 128  # 4 TB of float32 declared in 128 bytes (the smallest header numpy writes)
    before = _rss_bytes()
    conn = connect(server)
    for bomb in bombs:
        reply = call(conn, "POST", f"/v2/models/{PPOCR}/infer", bomb, {"Content-Type": "application/octet-stream"})
        assert reply.status == 400, reply.body
        assert ".npy" in reply.error() or "tensor cap" in reply.error()
    assert _rss_bytes() - before < 32 << 20
    # A sound .npy on the same connection is still served.
    buffer = io.BytesIO()
    np.save(buffer, ppocr_tensor(1)[0])
    ok = call(conn, "POST", f"/v2/models/{PPOCR}/infer", buffer.getvalue(), {"Content-Type": "application/x-npy"})
    assert ok.status == 200 and ok.json()["results"]["top"]


def test_normal_tensor_and_image_requests_are_still_served(server: ApiServer) -> None:
    conn = connect(server)
    tensor = call(conn, "POST", INFER, json_infer_body(ppocr_tensor(2)))
    assert tensor.status == 200 and tensor.json()["outputs"][0]["shape"] == [1, 2]
    ok, png = cv2.imencode(".png", np.full((240, 320, 3), 90, np.uint8))
    image = call(conn, "POST", FACE_INFER, png.tobytes(), {"Content-Type": "image/png"})
    assert ok and image.status == 200 and image.json()["results"]["top"]


def test_npy_parser_refuses_lying_or_hostile_headers() -> None:
    good = io.BytesIO()
    np.save(good, np.asfortranarray(np.arange(12, dtype=">i4").reshape(3, 4)))
    array = parse_npy(good.getvalue(), 1 << 20)
    assert array.tolist() == np.arange(12).reshape(3, 4).tolist() and array.flags.writeable
    cases = {
        "pickle": _npy_header_only((1,), "|O"),
        "dup-key": _npy_text("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1,), }"),
        "code": _npy_text("{'descr': '<f4', 'fortran_order': False, 'shape': (__import__('os'),), }"),
        "extra-key": _npy_text("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1}"),
        "trailing": good.getvalue() + b"\0",
        "huge-header": b"\x93NUMPY\x02\x00" + struct.pack("<I", 1 << 30) + b"{",
    }
    for name, data in cases.items():
        with pytest.raises(InputError, match=r"\.npy|tensor") as caught:
            parse_npy(data, 1 << 20)
        assert "\n" not in str(caught.value), name


def test_npz_member_cannot_inflate_past_the_cap() -> None:
    # What a golden file in a (validly signed, hostile) bundle could be: 64 MB of zeros deflated to 64 KB.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        member = io.BytesIO()
        np.save(member, np.zeros(64 << 20, np.uint8))
        archive.writestr("out.npy", member.getvalue())
    with pytest.raises(InputError, match="within the cap"):
        load_npz(buffer.getvalue(), 1 << 20, "golden file g.npz")


# --------------------------------------------------------------------------- the decode budget


def _png(width: int, height: int) -> bytes:
    """A real PNG that compresses to a few KB (a gradient) but decodes to width x height x 3 bytes."""
    row = np.linspace(0, 255, width, dtype=np.uint8)
    pixels = np.broadcast_to(row[None, :, None], (height, width, 3)).copy()
    ok, png = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert ok
    return png.tobytes()


@pytest.fixture()
def budget() -> Iterator[DecodeBudget]:
    """The process's shared budget at the default size, its peak reset, restored after the test."""
    shared = shared_budget(Limits().max_decode_bytes)
    shared.peak, wait = shared.reserved, shared.wait_seconds
    yield shared
    shared.wait_seconds = wait


def test_concurrent_big_decodes_stay_within_the_budget(service: InferenceService, budget: DecodeBudget) -> None:
    png = _png(3000, 2000)  # 36 MB to decode; 8 at once would be 288 MB against a 128 MB budget
    cost = decode_cost(png)
    assert cost == 3000 * 2000 * 6 and 8 * cost > budget.capacity
    srv = start(service, max_concurrency=8)
    try:
        barrier = threading.Barrier(8)

        def one(_: int) -> int:
            conn = connect(srv)
            barrier.wait()
            return call(conn, "POST", FACE_INFER, png, {"Content-Type": "image/png"}).status

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, range(8)))
    finally:
        srv.stop()
    assert statuses == [200] * 8  # they waited for each other rather than failing
    assert cost <= budget.peak <= budget.capacity
    assert budget.reserved == 0


def test_image_larger_than_the_whole_budget_is_400_and_a_full_budget_is_503(server: ApiServer,
                                                                            budget: DecodeBudget) -> None:
    conn = connect(server)
    big = call(conn, "POST", FACE_INFER, _png(5000, 5000), {"Content-Type": "image/png"})  # 150 MB > 128 MB
    assert big.status == 400 and "limits.max_decode_bytes" in big.error()
    budget.wait_seconds = 0.2
    with budget.reserve(budget.capacity - 1000, "the test's hold"):
        busy = call(conn, "POST", FACE_INFER, _png(320, 240), {"Content-Type": "image/png"})
    assert busy.status == 503 and busy.headers.get("Retry-After") == "1" and "busy" in busy.error()
    again = call(connect(server), "POST", FACE_INFER, _png(320, 240), {"Content-Type": "image/png"})
    assert again.status == 200


def test_decode_budget_bounds_threads_decoding_directly() -> None:
    # The same budget object the folder and MQTT sources reach through decode_image.
    png = _png(1000, 1000)
    budget = DecodeBudget(int(2.5 * decode_cost(png)), wait_seconds=60)
    with ThreadPoolExecutor(6) as pool:
        shapes = list(pool.map(lambda _: decode_image(png, 1 << 24, 1 << 24, budget=budget).shape, range(12)))
    assert shapes == [(1000, 1000, 3)] * 12
    assert decode_cost(png) <= budget.peak <= 2 * decode_cost(png) and budget.reserved == 0


# --------------------------------------------------------------------------- the same checks on the CLI's paths


def test_run_on_a_4_tb_npy_and_install_with_a_bomb_golden_file_are_one_line_refusals(
        tmp_path: Path, keys: dict[str, Path], zoo: Callable[[str], Path]) -> None:
    device = make_device(tmp_path, keys)
    device.cli("models", "install", pack_ppocr(device, zoo, 1))
    bomb = tmp_path / "bomb.npy"
    bomb.write_bytes(_npy_header_only((10**12,)))
    out = device.cli("run", bomb, check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"error: {bomb}: tensor: shape [1000000000000] of 4-byte values "
                                               "exceeds the 33554432-byte tensor cap (limits.max_image_bytes)"]
    # A golden input that is the same bomb, in a validly signed bundle: the gate refuses it in one line.
    spec = tmp_path / "ppocr.toml"
    spec.write_text(PPOCR_SPEC)
    expected = tmp_path / "expected.npy"
    np.save(expected, np.zeros((1, 2), np.float32))
    bundle = tmp_path / "bomb.bundle"
    cli("bundle", "pack", "--model", zoo("ppocr_cls"), "--name", "ppocr-cls", "--version", 2, "--key", keys["a"],
        "--spec", spec, "--golden", bomb, expected, "-o", bundle)
    refused = device.cli("models", "install", bundle, check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr
    assert "golden file" in refused.stderr and "tensor cap" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr

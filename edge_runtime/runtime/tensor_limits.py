"""Tensor shapes and ``.npy`` bytes checked against the size caps BEFORE numpy allocates anything.

Every path that turns untrusted bytes into an array goes through here: the
OIP request codec (JSON and binary tensors), ``.npy`` bodies of the API, MQTT
input, folder sources and ``run``, and the golden files of a bundle (.npy and
.npz). numpy itself would allocate first and fail later (``np.zeros((0, 2**62,
2**62))`` raises ValueError, a ``.npy`` header declaring 4 TB makes
``np.load`` reserve 4 TB), and its errors are not one line.

The rules: every dim is a non-negative int below 2**63; the product of the
dims *with a zero dim counted as one*, times the item size, is within the
byte cap (so ``[0, 10**30]`` is refused although it holds no element); a
model's fixed dims and rank must match. A ``.npy`` header is parsed here, not
by ``ast.literal_eval``: magic, version 1-3, header length capped, the dict
exactly ``descr`` / ``fortran_order`` / ``shape``, a numeric dtype, and the
declared size must equal the bytes that follow.
"""

from __future__ import annotations

import io
import math
import re
import struct
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_runtime._util.fsutil import CappedReadError, read_stream_capped
from edge_runtime.errors import InputError

__all__ = [
    "MAX_RANK",
    "check_model_shape",
    "check_shape",
    "is_npy",
    "load_npz",
    "parse_npy",
]

MAX_RANK = 32
_INT64_MAX = (1 << 63) - 1
_NPY_MAGIC = b"\x93NUMPY"
_MAX_NPY_HEADER = 4096  # numpy writes < 200 bytes for any rank-32 shape; numpy >= 1.24 refuses > 10000
_MAX_NPZ_MEMBERS = 64
# One entry of the header dict; values are matched strictly (no expressions, no nesting).
_ENTRY = re.compile(r"\s*'(descr|fortran_order|shape)'\s*:\s*('[^'\\]{1,16}'|True|False|\(\s*[0-9,\s]*\))\s*")
_DESCR = re.compile(r"[<>|=]?[biuf][1248]")
_DIM = re.compile(r"\s*([0-9]{1,19})\s*")


def _dims_text(shape: Sequence[Any]) -> str:
    def one(d: Any) -> str:
        if isinstance(d, int) and not isinstance(d, bool):
            return str(d) if d.bit_length() < 70 else "..."
        return repr(d)[:12]

    text = ", ".join(one(d) for d in shape[:8])
    return f"[{text}{', ...' if len(shape) > 8 else ''}]"


def check_shape(shape: Any, itemsize: int, max_bytes: int, where: str) -> tuple[int, ...]:
    """``shape`` as a tuple of ints, checked before any array of it exists.

    ``shape`` is untrusted (a JSON list, a parsed header): a list or tuple of at
    most :data:`MAX_RANK` ints (not bools), each within 0..2**63-1, whose
    product, with zero dims counted as one, times ``itemsize`` is at most
    ``max_bytes``. Python ints throughout, so nothing overflows.

    Raises:
        InputError: one line naming ``where`` and what is wrong.
    """
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_RANK:
        raise InputError(f"{where}: 'shape' must be a list of at most {MAX_RANK} non-negative integers")
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or not 0 <= dim <= _INT64_MAX:
            raise InputError(f"{where}: shape {_dims_text(shape)} has a dim that is not an integer in 0..2**63-1")
    span = math.prod(max(d, 1) for d in shape) * itemsize
    if span > max_bytes:
        raise InputError(f"{where}: shape {_dims_text(shape)} of {itemsize}-byte values exceeds the "
                         f"{max_bytes}-byte tensor cap (limits.max_image_bytes)")
    return tuple(shape)


def check_model_shape(shape: tuple[int, ...], declared: tuple[int | None, ...], where: str) -> None:
    """``shape`` must have the model input's rank and its fixed dims (None = any size).

    Checked before the tensor is built; the message is the backend's own.

    Raises:
        InputError: rank or a fixed dim differs.
    """
    if len(shape) != len(declared) or any(d is not None and d != s for s, d in zip(shape, declared, strict=True)):
        expected = tuple("?" if d is None else d for d in declared)
        raise InputError(f"{where}: shape {tuple(shape)}, expected {expected} (? = any size)")


def is_npy(data: bytes) -> bool:
    """True when ``data`` starts with the .npy magic."""
    return data[:6] == _NPY_MAGIC


def _npy_header(data: bytes, where: str) -> tuple[np.dtype[Any], bool, tuple[int, ...], int]:
    """(dtype, fortran_order, shape, offset of the data) from a .npy header."""
    if not is_npy(data) or len(data) < 10:
        raise InputError(f"{where}: not a .npy tensor (bad magic)")
    major, minor = data[6], data[7]
    if major == 1 and minor == 0:
        (length,), start = struct.unpack("<H", data[8:10]), 10
    elif major in (2, 3) and minor == 0 and len(data) >= 12:
        (length,), start = struct.unpack("<I", data[8:12]), 12
    else:
        raise InputError(f"{where}: unsupported .npy version {major}.{minor}")
    if length > _MAX_NPY_HEADER or start + length > len(data):
        raise InputError(f"{where}: .npy header of {length} bytes is too long or truncated")
    try:
        text = data[start:start + length].decode("utf-8" if major == 3 else "latin-1")
    except UnicodeDecodeError:
        raise InputError(f"{where}: .npy header is not text") from None
    text = text.rstrip(" \n")
    if not (text.startswith("{") and text.endswith("}")):
        raise InputError(f"{where}: .npy header is not a dict")
    entries: dict[str, str] = {}
    body = text[1:-1]
    pos = 0
    while pos < len(body) and body[pos:].strip():
        match = _ENTRY.match(body, pos)
        if match is None or match[1] in entries:
            raise InputError(f"{where}: .npy header is malformed or has a duplicate key")
        entries[match[1]] = match[2]
        pos = match.end()
        if pos < len(body):
            if body[pos] != ",":
                raise InputError(f"{where}: .npy header is malformed")
            pos += 1
    if set(entries) != {"descr", "fortran_order", "shape"}:
        raise InputError(f"{where}: .npy header must have exactly 'descr', 'fortran_order' and 'shape'")
    descr = entries["descr"][1:-1] if entries["descr"].startswith("'") else ""
    if not _DESCR.fullmatch(descr):
        raise InputError(f"{where}: .npy dtype {descr!r} is not a numeric type (bool, int, uint, float)")
    if entries["fortran_order"] not in ("True", "False"):
        raise InputError(f"{where}: .npy fortran_order must be True or False")
    return np.dtype(descr), entries["fortran_order"] == "True", _npy_shape(entries["shape"], where), start + length


def _npy_shape(text: str, where: str) -> tuple[int, ...]:
    if not text.startswith("("):
        raise InputError(f"{where}: .npy shape must be a tuple")
    parts = text[1:-1].split(",")
    if parts and not parts[-1].strip():
        parts.pop()  # "(3,)" and "(1, 2,)"
    dims: list[int] = []
    for part in parts:
        match = _DIM.fullmatch(part)
        if match is None:
            raise InputError(f"{where}: .npy shape {text[:60]!r} is not a tuple of integers")
        dims.append(int(match[1]))
    return tuple(dims)


def parse_npy(data: bytes, max_bytes: int, where: str = "tensor") -> NDArray[Any]:
    """A .npy tensor (numeric, no pickles) from ``data``, every size checked before numpy sees it.

    Returns a writable, native-endian, C-ordered copy.

    Raises:
        InputError: over ``max_bytes``, a malformed header, a non-numeric dtype,
        an absurd shape, or a declared size that is not the bytes that follow.
    """
    if len(data) > max_bytes:
        raise InputError(f"{where} of {len(data)} bytes exceeds the {max_bytes}-byte cap")
    dtype, fortran, shape, offset = _npy_header(data, where)
    shape = check_shape(shape, dtype.itemsize, max_bytes, where)
    declared = math.prod(shape) * dtype.itemsize
    if declared != len(data) - offset:
        raise InputError(f"{where}: .npy header declares {declared} bytes of data, {len(data) - offset} follow")
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
    array = flat.reshape(shape, order="F" if fortran else "C")
    return np.array(array, dtype=dtype.newbyteorder("="), order="C")  # a copy: writable, native, C order


def load_npz(data: bytes, max_bytes: int, where: str) -> dict[str, NDArray[Any]]:
    """The arrays of a .npz archive (a zip of .npy members), each parsed by :func:`parse_npy`.

    Member sizes are checked from the zip directory and enforced while reading,
    so a compressed member cannot inflate past ``max_bytes`` in total.

    Raises:
        InputError: not a zip, too many or oversized members, or a bad member.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
            if len(members) > _MAX_NPZ_MEMBERS:
                raise InputError(f"{where}: .npz has more than {_MAX_NPZ_MEMBERS} members")
            left = max_bytes
            arrays: dict[str, NDArray[Any]] = {}
            for info in members:
                if not info.filename.endswith(".npy") or info.file_size > left:
                    raise InputError(f"{where}: .npz member {info.filename[:60]!r} is not a .npy within the cap")
                try:
                    with archive.open(info) as fh:
                        raw = read_stream_capped(fh, left, info.filename)
                except CappedReadError:
                    raise InputError(f"{where}: .npz members exceed the {max_bytes}-byte cap") from None
                left -= len(raw)
                arrays[info.filename[:-4]] = parse_npy(raw, max_bytes, f"{where} member {info.filename[:60]!r}")
            return arrays
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError, zlib.error) as e:
        raise InputError(f"{where}: not a valid .npz archive: {e}") from None

"""Open Inference Protocol (KServe v2) message bodies: tensors <-> numpy, JSON or binary.

Pure functions, no I/O (the HTTP side is :mod:`edge_runtime.api.handler`).
:func:`decode_infer_request` turns an inference request body into numpy
feeds and output choices, checked against the model's inputs and outputs;
:func:`encode_infer_response` builds the reply; the other ``encode_*``
functions build the metadata, prediction and error bodies, and
:func:`status_of` maps the error tree to HTTP status codes.

Both directions support the binary tensor data extension: the body is a JSON
header of ``Inference-Header-Content-Length`` bytes followed by the raw
tensors, little-endian, row-major, one after the other in the order of the
header's ``inputs`` (``parameters.binary_data_size`` gives each one's size).
An output is returned as binary data when its request entry has
``parameters.binary_data`` (or ``binary_data_output``) true, or the request
has ``parameters.binary_data_output`` true.

Every rejection is an :class:`~edge_runtime.errors.InputError` with a
one-line message naming the input; nothing here echoes tensor data.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_runtime._util.strict_text import load_json
from edge_runtime.config.model import Limits
from edge_runtime.errors import (
    BusyError,
    EdgeRuntimeError,
    InferenceError,
    InputError,
    ModelError,
    ModelNotLoadedError,
    ModelNotServedError,
)
from edge_runtime.runtime.backends.base import TensorInfo
from edge_runtime.runtime.loaded_model import LoadedModel, Prediction
from edge_runtime.runtime.oip_types import DATATYPES, datatype_of, oip_name
from edge_runtime.runtime.tensor_limits import check_model_shape, check_shape

__all__ = [
    "InferRequest",
    "decode_infer_request",
    "dumps",
    "encode_error",
    "encode_infer_response",
    "encode_model_metadata",
    "encode_prediction",
    "status_of",
]

_MAX_ERROR_CHARS = 300
_DEFAULT_TENSOR_BYTES = Limits().max_image_bytes


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request.

    ``outputs`` names the outputs to return, in order (empty: all of them);
    ``binary_outputs`` those of them to return as binary data (an output's own
    ``binary_data`` wins over the request's ``binary_data_output``);
    ``binary_default`` is the request's ``binary_data_output``, for the
    case where no outputs are listed; ``postprocess`` (request parameter
    ``postprocess``) asks for the bundle's decoded results too (boxes in the
    model input's pixels), beside the raw tensors.
    """

    id: str | None
    inputs: dict[str, NDArray[Any]]
    outputs: tuple[str, ...] = ()
    binary_outputs: frozenset[str] = frozenset()
    binary_default: bool = False
    postprocess: bool = False


def _parse_header(raw: bytes | memoryview) -> dict[str, Any]:
    # Tensor values are range-checked per datatype afterwards, so the per-number hooks stay off (speed).
    doc = load_json(raw, "request body", error=InputError, max_int_digits=None, finite_floats=False)
    if not isinstance(doc, dict):
        raise InputError("request JSON must be an object with an 'inputs' list")
    return doc


def _parameters(entry: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    params = entry.get("parameters", {})
    if not isinstance(params, dict):
        raise InputError(f"{where}: 'parameters' must be an object")
    return params


def _flag(params: Mapping[str, Any], where: str, keys: tuple[str, ...], default: bool) -> bool:
    """The first of ``keys`` present in ``params`` (a boolean), else ``default``."""
    for key in keys:
        if key in params:
            value = params[key]
            if not isinstance(value, bool):
                raise InputError(f"{where}: parameter {key!r} must be true or false")
            return value
    return default


def _check_datatype(where: str, dt: np.dtype[Any], info: TensorInfo) -> None:
    """The request's datatype must be the model's, or a float for a quantised input (quantised on the way in)."""
    if dt == np.dtype(info.dtype) or (info.quantization is not None and dt.kind == "f"):
        return
    raise InputError(f"{where}: datatype {datatype_of(dt)} does not match the model's {datatype_of(info.dtype)}")


def _from_json(where: str, data: Any, dt: np.dtype[Any], shape: tuple[int, ...], count: int) -> NDArray[Any]:
    if not isinstance(data, list):
        raise InputError(f"{where}: 'data' must be a list (flat or nested, row-major)")
    try:
        # No dtype here: numpy would silently turn strings, None and floats into the
        # target type; the kind check below refuses them instead.
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise InputError(f"{where}: 'data' is not a rectangular array of numbers") from None
    if arr.size != count:
        raise InputError(f"{where}: shape {list(shape)} needs {count} values, 'data' has {arr.size}")
    if count == 0:
        return np.zeros(shape, dt)
    allowed = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[dt.kind]
    if arr.dtype.kind not in allowed:
        kind = {"b": "true/false", "i": "integers", "u": "integers", "f": "numbers"}[dt.kind]
        raise InputError(f"{where}: {datatype_of(dt)} 'data' must hold only {kind}")
    if dt.kind in "iu":
        limits = np.iinfo(dt)
        if np.min(arr) < limits.min or np.max(arr) > limits.max:
            raise InputError(f"{where}: values out of range for {datatype_of(dt)}")
        return arr.astype(dt).reshape(shape)
    if dt.kind == "b":
        return arr.reshape(shape)
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(dt)
    if not np.isfinite(out).all():  # 1e400 parses as inf; 1e39 overflows FP32
        raise InputError(f"{where}: values out of range for {datatype_of(dt)}")
    return out.reshape(shape)


def _from_binary(where: str, chunk: memoryview, dt: np.dtype[Any], shape: tuple[int, ...]) -> NDArray[Any]:
    arr = np.frombuffer(chunk, dtype=dt.newbyteorder("<")).reshape(shape)
    if not arr.dtype.isnative:
        arr = arr.astype(dt)
    elif not arr.flags.aligned:
        arr = arr.copy()  # the JSON header's length puts tensors at any offset; runtimes want aligned data
    if dt.kind == "b" and arr.size and np.max(arr.view(np.uint8)) > 1:
        raise InputError(f"{where}: BOOL binary data must be bytes 0 or 1")
    return arr


def decode_infer_request(body: bytes, header_length: int | None, inputs: Mapping[str, TensorInfo],
                         outputs: Sequence[str], *,
                         max_tensor_bytes: int = _DEFAULT_TENSOR_BYTES) -> InferRequest:
    """Decode an OIP inference request for a model with ``inputs`` and ``outputs``.

    ``header_length`` is the ``Inference-Header-Content-Length`` header (None:
    the whole body is JSON). Checks input names, datatypes against the model,
    shapes (each dim, the size against ``max_tensor_bytes``, rank and fixed
    dims against the model: all before any array exists), shapes against the
    data length, binary sizes, and output names.

    Raises:
        InputError: anything malformed, inconsistent or unknown (one line).
    """
    view = memoryview(body)
    if header_length is None:
        header_length = len(body)
    elif not 0 <= header_length <= len(body):
        raise InputError(f"Inference-Header-Content-Length {header_length} is outside the {len(body)}-byte body")
    doc = _parse_header(view[:header_length])
    binary, offset = view[header_length:], 0
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InputError("'id' must be a string")
    entries = doc.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise InputError("request needs a non-empty 'inputs' list")
    feeds: dict[str, NDArray[Any]] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InputError(f"inputs[{i}] must be an object")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise InputError(f"inputs[{i}]: 'name' must be a non-empty string")
        where = f"input {name!r}"
        info = inputs.get(name)
        if info is None:
            raise InputError(f"unknown {where} (model inputs: {', '.join(sorted(inputs))})")
        if name in feeds:
            raise InputError(f"{where} is given twice")
        datatype = entry.get("datatype")
        dt = DATATYPES.get(datatype) if isinstance(datatype, str) else None
        if dt is None:
            raise InputError(f"{where}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
        _check_datatype(where, dt, info)
        shape = check_shape(entry.get("shape"), dt.itemsize, max_tensor_bytes, where)
        check_model_shape(shape, info.shape, where)
        count = math.prod(shape)
        size = _parameters(entry, where).get("binary_data_size")
        if size is None:
            feeds[name] = _from_json(where, entry.get("data"), dt, shape, count)
            continue
        if "data" in entry:
            raise InputError(f"{where}: give either 'data' or parameters.binary_data_size, not both")
        if not isinstance(size, int) or isinstance(size, bool) or size != count * dt.itemsize:
            raise InputError(f"{where}: binary_data_size {size!r} is not {count * dt.itemsize} "
                             f"(shape {list(shape)} of {datatype_of(dt)})")
        if offset + size > len(binary):
            raise InputError(f"{where}: binary data ends {offset + size - len(binary)} bytes short")
        feeds[name] = _from_binary(where, binary[offset:offset + size], dt, shape)
        offset += size
    if offset != len(binary):
        raise InputError(f"{len(binary) - offset} bytes of binary data follow the last binary input")
    return _decode_outputs(doc, request_id, feeds, outputs)


def _decode_outputs(doc: Mapping[str, Any], request_id: str | None, feeds: dict[str, NDArray[Any]],
                    known: Sequence[str]) -> InferRequest:
    wanted = doc.get("outputs", [])
    if not isinstance(wanted, list):
        raise InputError("'outputs' must be a list")
    default = _flag(_parameters(doc, "request"), "request", ("binary_data_output",), False)
    names: list[str] = []
    binary: set[str] = set()
    for i, entry in enumerate(wanted):
        if not isinstance(entry, dict):
            raise InputError(f"outputs[{i}] must be an object")
        name = entry.get("name")
        if not isinstance(name, str) or name not in known:
            raise InputError(f"outputs[{i}]: unknown output {name!r} (model outputs: {', '.join(known)})")
        if name in names:
            raise InputError(f"output {name!r} is requested twice")
        names.append(name)
        where = f"output {name!r}"
        if _flag(_parameters(entry, where), where, ("binary_data", "binary_data_output"), default):
            binary.add(name)
    postprocess = _flag(_parameters(doc, "request"), "request", ("postprocess",), False)
    return InferRequest(request_id, feeds, tuple(names), frozenset(binary), default, postprocess)


def dumps(doc: Any) -> bytes:
    """Compact strict JSON (UTF-8).

    Raises:
        InferenceError: the document holds NaN or Infinity, which JSON cannot carry.
    """
    try:
        return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        raise InferenceError("the result holds NaN or Infinity, which JSON cannot carry: "
                             "ask for the output as binary data (parameters.binary_data)") from None


def encode_infer_response(model_name: str, version: int, request: InferRequest,
                          outputs: Mapping[str, NDArray[Any]],
                          results: list[dict[str, Any]] | None = None) -> tuple[bytes, int | None]:
    """The OIP reply body, and the JSON header's length when binary data follows it (else None).

    ``results`` (the decoded results a request asked for with ``postprocess``) go under ``"results"``.

    Raises:
        InferenceError: the runtime did not return a requested output, returned a
        type OIP cannot describe, or a JSON output holds NaN/Infinity.
    """
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name in request.outputs or tuple(outputs):
        arr = outputs.get(name)
        if arr is None:
            raise InferenceError(f"the model returned no output {name!r}")
        datatype = oip_name(arr.dtype)
        if datatype is None:
            raise InferenceError(f"output {name!r} has dtype {arr.dtype}, which the protocol cannot carry")
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        binary = (name in request.binary_outputs) if request.outputs else request.binary_default
        if binary:
            raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = arr.ravel().tolist()
        entries.append(entry)
    reply: dict[str, Any] = {"model_name": model_name, "model_version": str(version)}
    if request.id is not None:
        reply["id"] = request.id
    reply["outputs"] = entries
    if results is not None:
        reply["results"] = results
    header = dumps(reply)
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def encode_model_metadata(model: LoadedModel) -> bytes:
    """Model metadata (:meth:`LoadedModel.describe`)."""
    return dumps(model.describe())


def encode_prediction(model_name: str, version: int, prediction: Prediction) -> bytes:
    """The reply to a raw image/.npy request: the first result and the stage timings.

    Raises:
        InferenceError: the result holds NaN or Infinity.
    """
    return dumps({
        "model_name": model_name,
        "model_version": str(version),
        "results": prediction.results[0] if prediction.results else None,
        "latency_ms": {k: round(v, 3) for k, v in prediction.timings_ms.items()},
    })


def encode_error(message: str) -> bytes:
    """``{"error": "<one line>"}``, the message collapsed to one line and shortened."""
    text = " ".join(message.split()) or "error"
    if len(text) > _MAX_ERROR_CHARS:
        text = text[:_MAX_ERROR_CHARS - 3] + "..."
    return dumps({"error": text})


def status_of(error: EdgeRuntimeError) -> int:
    """The HTTP status for an error of the tree, by its type: the caller's fault 4xx, ours 5xx
    (a corrupt cache, :class:`~edge_runtime.errors.CacheError`, is ours: 500)."""
    if isinstance(error, InputError):
        return 400
    if isinstance(error, ModelNotServedError):
        return 404  # no such model here
    if isinstance(error, ModelNotLoadedError):
        return 503  # not loaded yet, or the daemon is stopping: Retry-After
    if isinstance(error, BusyError):
        return 503  # the decode budget is full: Retry-After
    if isinstance(error, ModelError) and not isinstance(error, InferenceError):
        return 503  # cannot be loaded or served right now
    return 500

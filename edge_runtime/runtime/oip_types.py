"""Open Inference Protocol (KServe v2) tensor datatype names and their numpy dtypes.

Shared by the model metadata (:meth:`~edge_runtime.runtime.loaded_model.LoadedModel.describe`)
and the request/response codec (:mod:`edge_runtime.api.codec`). BYTES (strings)
is not supported.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["DATATYPES", "datatype_of", "oip_name"]

#: OIP datatype name -> numpy dtype.
DATATYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(np_name)
    for name, np_name in (
        ("BOOL", "bool"), ("UINT8", "uint8"), ("UINT16", "uint16"), ("UINT32", "uint32"), ("UINT64", "uint64"),
        ("INT8", "int8"), ("INT16", "int16"), ("INT32", "int32"), ("INT64", "int64"),
        ("FP16", "float16"), ("FP32", "float32"), ("FP64", "float64"),
    )
}
_NAMES: dict[np.dtype[Any], str] = {dt: name for name, dt in DATATYPES.items()}


def oip_name(dt: np.dtype[Any]) -> str | None:
    """The OIP datatype name of ``dt`` in either byte order ('>f4' and '<f4' are FP32), or None."""
    return _NAMES.get(dt.newbyteorder("="))


def datatype_of(dtype: np.dtype[Any] | str) -> str:
    """The OIP datatype name of a numpy dtype ("float32" -> "FP32"); unknown ones upper-cased."""
    dt = np.dtype(dtype)
    return oip_name(dt) or dt.name.upper()

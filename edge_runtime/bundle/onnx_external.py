"""Find ONNX tensors stored as external data, without loading the model.

An ONNX tensor may keep its bytes in a separate file named by a relative path
(``TensorProto.external_data`` ``location``). Loaders resolve that path next to
the model, so a bundle could make the runtime read ``../../etc/shadow``
(CVE-2022-25882). Bundles must be self-contained, so any external reference is
refused.

This module walks the protobuf wire format directly: it descends only into the
messages that can hold tensors and seeks over everything else (raw weights
included), so memory stays bounded whatever the model size, and the ``onnx``
package is not needed at run time. Field numbers follow ``onnx/onnx.proto``::

    ModelProto        graph=7 training_info=20 functions=25
    TrainingInfoProto initialization=1 algorithm=2              (GraphProto)
    GraphProto        node=1 initializer=5 sparse_initializer=15
    FunctionProto     node=7 attribute_proto=11
    NodeProto         attribute=5
    AttributeProto    t=5 g=6 tensors=10 graphs=11 sparse_tensor=22 sparse_tensors=23
    SparseTensorProto values=1 indices=2
    TensorProto       name=8 external_data=13 data_location=14 (EXTERNAL = 1)
    StringStringEntryProto key=1 value=2
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from edge_runtime._util.fsutil import CLOEXEC
from edge_runtime.errors import BundleError, ManifestError, UnsafeBundleError

__all__ = ["MAX_DEPTH", "ExternalDataRef", "check_no_external_data", "find_external_data"]

MAX_DEPTH = 64
"""Deepest message nesting accepted; a real model with If/Loop nests a few levels."""

_BUFFER = 64 << 10
_MAX_STRING = 1024  # names/locations are reported, never used; longer ones are cut
_DATA_LOCATION_EXTERNAL = 1

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# Message kinds and, per kind, the fields that lead (possibly) to a TensorProto.
_MODEL, _TRAINING, _GRAPH, _FUNCTION, _NODE, _ATTRIBUTE, _SPARSE, _TENSOR, _ENTRY = range(9)
_CHILDREN: dict[int, dict[int, tuple[int, str]]] = {
    _MODEL: {7: (_GRAPH, "graph"), 20: (_TRAINING, "training_info"), 25: (_FUNCTION, "functions")},
    _TRAINING: {1: (_GRAPH, "initialization"), 2: (_GRAPH, "algorithm")},
    _GRAPH: {1: (_NODE, "node"), 5: (_TENSOR, "initializer"), 15: (_SPARSE, "sparse_initializer")},
    _FUNCTION: {7: (_NODE, "node"), 11: (_ATTRIBUTE, "attribute_proto")},
    _NODE: {5: (_ATTRIBUTE, "attribute")},
    _ATTRIBUTE: {
        5: (_TENSOR, "t"),
        6: (_GRAPH, "g"),
        10: (_TENSOR, "tensors"),
        11: (_GRAPH, "graphs"),
        22: (_SPARSE, "sparse_tensor"),
        23: (_SPARSE, "sparse_tensors"),
    },
    _SPARSE: {1: (_TENSOR, "values"), 2: (_TENSOR, "indices")},
}
_REPEATED = {  # repeated fields get an index in the reported location
    (_MODEL, 20), (_MODEL, 25), (_GRAPH, 1), (_GRAPH, 5), (_GRAPH, 15), (_FUNCTION, 7),
    (_FUNCTION, 11), (_NODE, 5), (_ATTRIBUTE, 10), (_ATTRIBUTE, 11), (_ATTRIBUTE, 23),
}


@dataclass(frozen=True)
class ExternalDataRef:
    """One tensor whose data lives outside the model file.

    ``location`` is the external file path as written in the model ('' when the
    tensor is marked EXTERNAL without one); ``where`` is the field path to the
    tensor, e.g. ``graph.node[3].attribute[0].g.initializer[0]``.
    """

    tensor: str
    location: str
    where: str


class _Malformed(Exception):
    """Internal: the wire format is broken at ``offset``."""

    def __init__(self, what: str, offset: int) -> None:
        super().__init__(f"{what} at byte {offset}")


class _Stream:
    """Forward reader over a seekable file with its own buffer (fast varints)."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self._fh = fh
        self.size = size
        self._buf = b""
        self._start = 0  # file offset of _buf[0]
        self._i = 0

    @property
    def pos(self) -> int:
        return self._start + self._i

    def _fill(self, n: int) -> None:
        if self._i + n <= len(self._buf):
            return
        pos = self.pos
        self._fh.seek(pos)
        self._buf = self._fh.read(max(n, _BUFFER))
        self._start, self._i = pos, 0
        if len(self._buf) < n:
            raise _Malformed("unexpected end of file", pos + len(self._buf))

    def read(self, n: int) -> bytes:
        self._fill(n)
        data = self._buf[self._i : self._i + n]
        self._i += n
        return data

    def skip(self, n: int) -> None:
        if self._i + n <= len(self._buf):
            self._i += n
        else:
            # Jump without reading: this is how raw weights are passed over.
            self._start, self._buf, self._i = self.pos + n, b"", 0

    def varint(self) -> int:
        # Fast path: most tags and lengths in a model are one byte. The scan holds
        # the GIL, so its speed is request latency during a hot swap.
        i = self._i
        if i < len(self._buf):
            byte = self._buf[i]
            if byte < 0x80:
                self._i = i + 1
                return byte
        start = self.pos
        result = 0
        for shift in range(0, 70, 7):
            self._fill(1)
            byte = self._buf[self._i]
            self._i += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
        raise _Malformed("varint longer than 10 bytes", start)


@dataclass
class _Tensor:
    name: str = ""
    external: bool = False
    locations: list[str] = field(default_factory=list)


class _Walker:
    def __init__(self, stream: _Stream, max_depth: int) -> None:
        self.s = stream
        self.max_depth = max_depth
        self.refs: list[ExternalDataRef] = []

    def next_field(self, end: int) -> tuple[int, int, int]:
        """Read one tag; returns (field number, wire type, offset of the tag)."""
        s = self.s
        at = s._start + s._i  # the pos property, inlined: this is the hot loop
        tag = s.varint()
        number, wire = tag >> 3, tag & 7
        if number == 0 or wire not in (_VARINT, _I64, _LEN, _I32):
            raise _Malformed(f"invalid field tag {tag}", at)
        if s._start + s._i > end:
            raise _Malformed("field runs past the end of its message", at)
        return number, wire, at

    def length(self, end: int, at: int) -> int:
        n = self.s.varint()
        if self.s.pos + n > end:
            raise _Malformed("length-delimited field runs past the end of its message", at)
        return n

    def skip_value(self, wire: int, end: int, at: int) -> None:
        if wire == _VARINT:
            self.s.varint()
            return
        if wire == _LEN:
            n = self.length(end, at)
        else:
            n = 8 if wire == _I64 else 4
            if self.s.pos + n > end:
                raise _Malformed("fixed-width field runs past the end of its message", at)
        self.s.skip(n)

    def string(self, end: int, at: int) -> str:
        n = self.length(end, at)
        data = self.s.read(min(n, _MAX_STRING))
        self.s.skip(n - len(data))
        return data.decode("utf-8", errors="replace")

    def message(self, kind: int, end: int, depth: int, where: str) -> set[int]:
        """Walk one message up to ``end``; returns the field numbers seen."""
        if depth > self.max_depth:
            raise _Malformed(f"messages nested deeper than {self.max_depth} levels", self.s.pos)
        if kind == _TENSOR:
            self.tensor(end, depth, where)
            return set()
        children = _CHILDREN[kind]
        seen: set[int] = set()
        counts: dict[int, int] = {}
        while self.s.pos < end:
            number, wire, at = self.next_field(end)
            seen.add(number)
            child = children.get(number)
            if child is None:
                self.skip_value(wire, end, at)
                continue
            if wire != _LEN:
                raise _Malformed(f"field {number} has wire type {wire}, expected a message", at)
            n = self.length(end, at)
            label = child[1]
            if (kind, number) in _REPEATED:
                label = f"{label}[{counts.get(number, 0)}]"
                counts[number] = counts.get(number, 0) + 1
            self.message(child[0], self.s.pos + n, depth + 1, f"{where}.{label}" if where else label)
        if self.s.pos != end:
            raise _Malformed("message does not end on a field boundary", self.s.pos)
        return seen

    def tensor(self, end: int, depth: int, where: str) -> None:
        t = _Tensor()
        while self.s.pos < end:
            number, wire, at = self.next_field(end)
            if number == 8 and wire == _LEN:
                t.name = self.string(end, at)
            elif number == 14 and wire == _VARINT:
                t.external = self.s.varint() == _DATA_LOCATION_EXTERNAL
            elif number == 13 and wire == _LEN:
                if depth + 1 > self.max_depth:
                    raise _Malformed(f"messages nested deeper than {self.max_depth} levels", at)
                n = self.length(end, at)
                t.locations.append(self.entry_location(self.s.pos + n))
            elif number in (8, 13, 14):
                raise _Malformed(f"TensorProto field {number} has unexpected wire type {wire}", at)
            else:
                self.skip_value(wire, end, at)
        if self.s.pos != end:
            raise _Malformed("tensor does not end on a field boundary", self.s.pos)
        if t.external or t.locations:
            location = next((loc for loc in t.locations if loc), "")
            self.refs.append(ExternalDataRef(t.name, location, where))

    def entry_location(self, end: int) -> str:
        """Parse one external_data key/value entry; returns the value for 'location'.

        Any entry at all marks the tensor external; only 'location' is reported.
        """
        key = value = ""
        while self.s.pos < end:
            number, wire, at = self.next_field(end)
            if number in (1, 2) and wire == _LEN:
                text = self.string(end, at)
                key, value = (text, value) if number == 1 else (key, text)
            else:
                self.skip_value(wire, end, at)
        return value if key == "location" else ""


def find_external_data(path: Path, *, max_depth: int = MAX_DEPTH) -> list[ExternalDataRef]:
    """List every tensor in the ONNX model at ``path`` that uses external data.

    Looks in the main graph, training graphs, function bodies and function
    default attributes, and recursively in node attributes (If/Loop/Scan
    subgraphs, tensor and sparse-tensor attributes). Reads the file in bounded
    chunks and seeks over weights.

    Raises:
        ManifestError: the file is not a well-formed ONNX ModelProto (bad wire
            format, truncated, no graph, nesting deeper than ``max_depth``).
        BundleError: the file cannot be opened or read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | CLOEXEC)
    except OSError as e:
        raise BundleError(f"cannot read ONNX model {path}: {e.strerror or e}") from e
    with os.fdopen(fd, "rb") as fh:
        stream = _Stream(fh, os.fstat(fd).st_size)
        walker = _Walker(stream, max_depth)
        try:
            seen = walker.message(_MODEL, stream.size, 0, "")
        except _Malformed as e:
            raise ManifestError(f"{path.name}: not a valid ONNX model: {e}") from e
        except OSError as e:
            raise BundleError(f"cannot read ONNX model {path}: {e.strerror or e}") from e
    # ir_version (1) and graph (7) are mandatory; random bytes that happen to
    # parse as protobuf almost never carry both.
    if 1 not in seen or 7 not in seen:
        raise ManifestError(f"{path.name}: not a valid ONNX model: no ir_version or no graph")
    return walker.refs


_CLEAN: set[tuple[int, int, int, int]] = set()
_CLEAN_MAX = 1024


def check_no_external_data(path: Path, *, name: str = "") -> None:
    """Refuse an ONNX model that keeps any tensor in an external file.

    ``name`` is how the model is called in the message (default: file name).

    A file found clean is remembered by its identity (device, inode, size,
    mtime): a cached model is scanned once at install, not at every reload,
    because the pure-Python walk holds the GIL for tens of milliseconds and
    would stall requests served during a hot swap.

    Raises:
        UnsafeBundleError: a tensor references external data.
        ManifestError: the file is not a well-formed ONNX model.
        BundleError: the file cannot be read.
    """
    try:
        st = path.stat()
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        identity = None
    if identity is not None and identity in _CLEAN:
        return
    refs = find_external_data(path)
    if not refs:
        if identity is not None:
            if len(_CLEAN) >= _CLEAN_MAX:
                _CLEAN.clear()
            _CLEAN.add(identity)
        return
    label = name or path.name
    first = refs[0]
    more = f" (and {len(refs) - 1} more tensor(s))" if len(refs) > 1 else ""
    if first.location:
        what = f"references external data file {first.location!r}{more}"
    else:
        what = f"marks tensor {first.tensor!r} at {first.where} as external data{more}"
    raise UnsafeBundleError(
        f"{label} {what}; external data is not allowed (path traversal risk, CVE-2022-25882)"
    )

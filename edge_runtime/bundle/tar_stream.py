"""A small streaming reader for USTAR archives, written for untrusted input.

Why not :mod:`tarfile`: Python 3.11.7 predates the extraction-filter bypass
fixes (CVE-2025-4517 and kin), and ``tarfile`` reads a whole pax header into
memory before a caller can look at its size. This reader:

- validates every header checksum, so random bytes fail on the first block;
- reads sizes as octal or GNU base-256 and refuses negative ones;
- joins the USTAR ``prefix`` and ``name`` fields;
- classifies the type flag (regular, hard link, symlink, char/block device,
  directory, FIFO) and leaves the policy to the caller;
- accepts a per-file pax header ('x') of at most ``max_pax_bytes``, checked
  from the header *before* its data is read, honouring ``path`` and ``size``
  (ASCII digits only) and refusing keywords that would change meaning (sparse
  files, binary names) or that appear twice;
- refuses global pax ('g'), GNU long names ('L'/'K') and every other type;
- checks that each member's data lies inside the file before it is read;
- requires the two zero blocks that end an archive.

Member data is handed out in bounded chunks; nothing here holds more than one
chunk (or one pax header) in memory.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from edge_runtime._util.fsutil import CHUNK
from edge_runtime._util.strict_text import parse_decimal
from edge_runtime.errors import BundleError, SizeLimitError, UnsafeBundleError

__all__ = ["BLOCK", "MAX_PAX_BYTES", "MemberKind", "TarMember", "TarReader"]

BLOCK = 512
MAX_PAX_BYTES = 64 << 10

_MAGIC_POSIX = b"ustar\x0000"
_MAGIC_GNU = b"ustar  \x00"
_ZERO_BLOCK = bytes(BLOCK)


class MemberKind(enum.Enum):
    """What a tar member is, by its type flag."""

    REGULAR = "regular file"
    HARDLINK = "hard link"
    SYMLINK = "symbolic link"
    CHARDEV = "character device"
    BLOCKDEV = "block device"
    DIRECTORY = "directory"
    FIFO = "FIFO"


_KINDS = {
    b"0": MemberKind.REGULAR,
    b"\x00": MemberKind.REGULAR,
    b"1": MemberKind.HARDLINK,
    b"2": MemberKind.SYMLINK,
    b"3": MemberKind.CHARDEV,
    b"4": MemberKind.BLOCKDEV,
    b"5": MemberKind.DIRECTORY,
    b"6": MemberKind.FIFO,
}
# pax keywords that only carry metadata we never apply (we write 0600 files
# owned by the daemon, with the current time).
_PAX_IGNORED = {
    "mtime", "atime", "ctime", "uid", "gid", "uname", "gname", "comment", "charset", "linkpath",
}
_PAX_IGNORED_PREFIXES = ("SCHILY.", "LIBARCHIVE.")  # xattrs / ACLs, never applied
_PAX_UTF8 = "ISO-IR 10646 2000 UTF-8"


@dataclass(frozen=True)
class TarMember:
    """One archive member as its header (and any pax header) describe it.

    ``offset`` is where its header starts; ``data_offset`` where its data starts.
    """

    name: str
    kind: MemberKind
    size: int
    linkname: str
    offset: int
    data_offset: int


def _padded(size: int) -> int:
    return -size % BLOCK + size


class TarReader:
    """Iterate the members of an uncompressed tar archive in one forward pass.

    ``file_size`` is the archive's size as ``fstat`` reported it: data beyond
    it is treated as missing, so a file that grows while being read cannot
    push the reader past the size that was checked against the caps.

    Every method raises:
        BundleError: "not a tar archive" (first header invalid), "truncated",
            or a corrupt header later on.
        UnsafeBundleError: an unsupported member type or pax keyword.
        SizeLimitError: a pax header larger than ``max_pax_bytes``.
    """

    def __init__(self, fh: BinaryIO, file_size: int, *, max_pax_bytes: int = MAX_PAX_BYTES) -> None:
        self._fh = fh
        self._size = file_size
        self._max_pax = max_pax_bytes
        self._pos = 0  # offset of the next header once the current member is done
        self._current: TarMember | None = None
        self._read_in_current = 0
        self._done = False

    # ------------------------------------------------------------------ reading

    def _read_exact(self, n: int, what: str) -> bytes:
        try:
            data = self._fh.read(n)
        except OSError as e:
            raise BundleError(f"cannot read the archive: {e.strerror or e}") from e
        if len(data) != n:
            raise BundleError(f"bundle is truncated: archive ends inside {what}")
        return data

    def next(self) -> TarMember | None:
        """Advance to the next member (skipping unread data); None at the end."""
        if self._done:
            return None
        if self._current is not None:
            self._pos = self._current.data_offset + _padded(self._current.size)
            self._current = None
        pax: dict[str, str] | None = None
        while True:
            header_at = self._pos
            header = self._header(header_at)
            if header is None:
                if pax is not None:
                    raise BundleError(f"corrupt tar: pax header at byte {header_at - BLOCK} has no member")
                self._done = True
                return None
            flag = header[156:157]
            size = _size_field(header[124:136], header_at)
            self._pos = header_at + BLOCK
            if flag == b"x":
                if pax is not None:
                    raise UnsafeBundleError(f"two pax headers in a row at byte {header_at}; not supported")
                pax = self._pax(size, header_at)
                continue
            member = self._member(header, flag, size, header_at, pax or {})
            self._current = member
            self._read_in_current = 0
            return member

    def _header(self, at: int) -> bytes | None:
        """Read and check the header block at ``at``; None for end of archive."""
        if at + BLOCK > self._size:
            if at == 0:
                raise BundleError(f"not a tar archive ({self._size} bytes, shorter than one header)")
            raise BundleError(f"bundle is truncated: archive ends inside the header at byte {at}")
        self._fh.seek(at)
        header = self._read_exact(BLOCK, f"the header at byte {at}")
        if header == _ZERO_BLOCK:
            if at + 2 * BLOCK > self._size:
                raise BundleError("bundle is truncated: archive ends inside the end-of-archive marker")
            if self._read_exact(BLOCK, "the end-of-archive marker") != _ZERO_BLOCK:
                raise BundleError(f"corrupt tar: zero block at byte {at} is not followed by another")
            return None
        if not _checksum_ok(header) or header[257:265] not in (_MAGIC_POSIX, _MAGIC_GNU):
            if at == 0:
                raise BundleError("not a tar archive (bad header checksum or magic)")
            raise BundleError(f"corrupt tar: bad header checksum or magic at byte {at}")
        return header

    def _pax(self, size: int, at: int) -> dict[str, str]:
        # The cap is checked from the header alone, before any pax data is read.
        if size > self._max_pax:
            raise SizeLimitError(
                f"pax header at byte {at} is {size} bytes, over the {self._max_pax}-byte cap"
            )
        if self._pos + size > self._size:
            raise BundleError(f"bundle is truncated: archive ends inside the pax header at byte {at}")
        data = self._read_exact(size, f"the pax header at byte {at}")
        self._pos += _padded(size)
        return _parse_pax(data, at)

    def _member(self, header: bytes, flag: bytes, size: int, at: int, pax: dict[str, str]) -> TarMember:
        name = _name(header, at)
        if "path" in pax:
            name = pax["path"]
        if "size" in pax:  # read here, where the member's name is known for the message
            size = parse_decimal(pax["size"], f"bundle member {name!r}: pax size", max_digits=15,
                                 error=UnsafeBundleError)
        kind = _KINDS.get(flag)
        if kind is None:
            shown = flag.decode("latin-1") if flag.isalnum() else repr(flag)
            raise UnsafeBundleError(f"member {name!r} has unsupported tar type {shown!r}")
        if self._pos + size > self._size:
            raise BundleError(
                f"bundle is truncated: member {name!r} needs {size} bytes at byte {self._pos}, "
                f"archive is {self._size} bytes"
            )
        linkname = _cstr(header[157:257]).decode("utf-8", errors="replace")
        return TarMember(name, kind, size, linkname, at, self._pos)

    # -------------------------------------------------------------- member data

    def chunks(self, chunk: int = CHUNK) -> Iterator[bytes]:
        """Yield the current member's unread data, at most ``chunk`` bytes at a time."""
        member = self._current
        if member is None:
            return
        while self._read_in_current < member.size:
            n = min(chunk, member.size - self._read_in_current)
            data = self._read_exact(n, f"member {member.name!r}")
            self._read_in_current += n
            yield data

    def read_all(self) -> bytes:
        """The current member's whole data; callers bound ``size`` first."""
        return b"".join(self.chunks())


def _cstr(field: bytes) -> bytes:
    end = field.find(b"\x00")
    return field if end < 0 else field[:end]


def _octal(field: bytes, at: int, what: str) -> int:
    digits = _cstr(field).strip(b" ")
    if not digits:
        return 0
    if not all(0x30 <= c <= 0x37 for c in digits):
        raise BundleError(f"corrupt tar: {what} field of the header at byte {at} is not octal")
    return int(digits, 8)


def _size_field(field: bytes, at: int) -> int:
    if field[0] == 0x80:  # GNU base-256, positive
        return int.from_bytes(field[1:], "big")
    if field[0] & 0x80:
        raise BundleError(f"corrupt tar: negative or invalid size in the header at byte {at}")
    return _octal(field, at, "size")


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _octal(header[148:156], 0, "checksum")
    except BundleError:
        return False
    blanked = header[:148] + b" " * 8 + header[156:]
    unsigned = sum(blanked)
    # Some old writers summed signed chars; accept both like every tar does.
    signed = unsigned - 256 * sum(1 for b in blanked if b > 127)
    return stored in (unsigned, signed)


def _name(header: bytes, at: int) -> str:
    name = _cstr(header[0:100])
    if header[257:265] == _MAGIC_POSIX:
        prefix = _cstr(header[345:500])
        if prefix:
            name = prefix + b"/" + name
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnsafeBundleError(f"member name in the header at byte {at} is not UTF-8") from e


def _parse_pax(data: bytes, at: int) -> dict[str, str]:
    """Parse ``"<len> <key>=<value>\\n"`` records, strictly."""
    records: dict[str, str] = {}
    i = 0
    while i < len(data):
        space = data.find(b" ", i, i + 20)
        length_text = data[i:space] if space > i else b""
        if not length_text.isdigit() or int(length_text) < 5 or i + int(length_text) > len(data):
            if data[i:].strip(b"\x00") == b"":
                break  # NUL padding some writers leave at the end
            raise UnsafeBundleError(f"malformed pax header at byte {at}")
        record = data[space + 1 : i + int(length_text)]
        i += int(length_text)
        key_bytes, eq, value_bytes = record.partition(b"=")
        if not eq or not record.endswith(b"\n"):
            raise UnsafeBundleError(f"malformed pax record in the header at byte {at}")
        try:
            key, value = key_bytes.decode("utf-8"), value_bytes[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise UnsafeBundleError(f"pax record in the header at byte {at} is not UTF-8") from e
        _check_pax_record(key, value, at)
        if key in records:  # readers differ on which one wins (tarfile: the last)
            raise UnsafeBundleError(f"pax keyword {key[:40]!r} appears twice in the header at byte {at}")
        records[key] = value
    return records


def _check_pax_record(key: str, value: str, at: int) -> None:
    if key == "path":
        if not value or "\x00" in value:
            raise UnsafeBundleError(f"pax path in the header at byte {at} is empty or has a NUL")
    elif key == "hdrcharset":
        if value != _PAX_UTF8:
            raise UnsafeBundleError(f"pax {key} {value[:40]!r} at byte {at} is not supported")
    elif key != "size" and key not in _PAX_IGNORED and not key.startswith(_PAX_IGNORED_PREFIXES):
        # Unknown keywords may change meaning (GNU.sparse.* turns the data into
        # a sparse map); refusing is the only safe reading.
        raise UnsafeBundleError(f"pax keyword {key[:40]!r} in the header at byte {at} is not supported")

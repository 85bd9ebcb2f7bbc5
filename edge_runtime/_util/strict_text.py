"""Strict readers for numbers and JSON that arrive from outside the process.

Python's defaults are lenient where another parser (the publisher's, the
operator's, a second device's) may read the same bytes differently, and a
disagreement between two readers of one signed document is a way in:

- ``str.isdigit()`` is true for ``'²'`` and ``'٣'``; ``int()`` then raises
  (a traceback instead of a refusal) or quietly reads another script's digit,
  and ``int()`` also takes ``' +1_0 '``. :func:`parse_decimal` takes ASCII
  ``0-9`` only.
- ``json.loads`` keeps the *last* of two equal keys (``"version":1,"version":9``),
  accepts ``NaN``/``Infinity``, reads ``1e999`` as infinity, and guesses
  UTF-16/32 from bytes. :func:`load_json` refuses all of these.
- ``re.match(r"^x$")`` also matches ``"x\\n"``: callers use ``re.fullmatch``
  with ASCII-only classes (``[0-9]``, or ``re.ASCII``) instead.

Every refusal is the caller's :class:`~edge_runtime.errors.EdgeRuntimeError`
subclass with one line that names what was being read.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from edge_runtime.errors import EdgeRuntimeError

__all__ = ["MAX_INT_DIGITS", "load_json", "parse_decimal"]

#: Integers in JSON we receive: 20 digits hold every int64/uint64 (Python's
#: own 4300-digit cap would still cost quadratic time to convert).
MAX_INT_DIGITS = 20
# A whole JSON string (escapes included) or one bracket: brackets inside strings never count.
_DEPTH_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


def _shown(text: str | bytes) -> str:
    value = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return repr(value if len(value) <= 24 else value[:24] + "...")


def parse_decimal(text: str | bytes, what: str, *, max_digits: int, error: type[EdgeRuntimeError]) -> int:
    """The value of ``text``, which must be 1 to ``max_digits`` ASCII digits and nothing else.

    No sign, no spaces, no ``_``, no other script's digits: strip what the
    format allows around the number before calling.

    Raises:
        error: ``"<what> '²' is not a decimal number"`` or ``"... has more than N digits"``.
    """
    raw = text.encode("utf-8", "replace") if isinstance(text, str) else text
    if not raw.isdigit():  # bytes.isdigit() is ASCII-only, unlike str.isdigit()
        raise error(f"{what} {_shown(text)} is not a decimal number")
    if len(raw) > max_digits:
        raise error(f"{what} {_shown(text)} has more than {max_digits} digits")
    return int(raw)


class _Refused(Exception):
    """Raised inside the JSON hooks; :func:`load_json` turns it into the caller's error."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers could disagree on which of two values wins (a signed document
    # read one way by the signer and another by the device): refuse the ambiguity.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f" repeats the key {key[:64]!r}")
        out[key] = value
    return out


def _refuse_constant(name: str) -> float:
    raise _Refused(f": {name} is not a JSON number")


def _bounded_int(max_digits: int) -> Callable[[str], int]:
    def parse_int(text: str) -> int:
        digits = len(text.lstrip("-"))
        if digits > max_digits:
            raise _Refused(f": integer with {digits} digits is too large (max {max_digits})")
        return int(text)

    return parse_int


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f": number {text[:24]!r} is out of range")
    return value


def _check_depth(text: str, max_depth: int) -> None:
    depth = 0
    for match in _DEPTH_TOKENS.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > max_depth:
                raise _Refused(f" is nested deeper than {max_depth} levels")
        elif token in ("]", "}"):
            depth -= 1
        # a string token: skipped whole


def load_json(
    data: bytes | bytearray | memoryview | str, what: str, *, error: type[EdgeRuntimeError],
    max_bytes: int | None = None, max_depth: int | None = None, max_int_digits: int | None = MAX_INT_DIGITS,
    finite_floats: bool = True,
) -> Any:
    """Decode ``data`` as strict JSON: UTF-8, no duplicate keys, no NaN/Infinity.

    ``max_bytes`` is checked first (only the length is looked at); ``max_depth``
    refuses deep nesting with one linear scan before the recursive parser runs
    (without it, nesting is bounded by the interpreter's recursion limit).
    ``max_int_digits`` (None: Python's own cap) bounds integers; with
    ``finite_floats`` a literal that overflows to infinity (``1e999``) is refused.
    Both cost a Python call per number, so a caller that checks the values
    itself afterwards (tensor data) may turn them off.

    Raises:
        error: one line naming ``what``: over the cap, not UTF-8, nested too
            deep, not JSON, a repeated key, NaN/Infinity, an oversized number.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise error(f"{what} is {len(data)} bytes, over the {max_bytes}-byte cap")
    if isinstance(data, str):
        text = data
    else:
        try:
            text = bytes(data).decode("utf-8")  # never json's UTF-16/32 guessing
        except UnicodeDecodeError as e:
            raise error(f"{what} is not valid UTF-8 (byte {e.start})") from e
    try:
        if max_depth is not None:
            _check_depth(text, max_depth)
        return json.loads(
            text, object_pairs_hook=_unique_pairs, parse_constant=_refuse_constant,
            parse_int=None if max_int_digits is None else _bounded_int(max_int_digits),
            parse_float=_finite_float if finite_floats else None,
        )
    except _Refused as e:
        raise error(f"{what}{e}") from e
    except json.JSONDecodeError as e:
        raise error(f"{what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    except RecursionError as e:
        raise error(f"{what} is nested too deeply") from e
    except ValueError as e:  # Python's own digit cap on int()
        raise error(f"{what} is not valid JSON: {e}") from e

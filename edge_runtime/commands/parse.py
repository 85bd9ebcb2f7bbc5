"""Fleet command payloads: bounded, strict JSON into a :class:`Command`. Pure, no I/O.

A command arrives on ``<prefix>/<device>/cmd/<verb>`` (or the group / all
topics) as JSON ``{"id": str, "ts": number, "args": {...}}`` and is answered
with a :class:`Reply` ``{"id", "ok", "message", "data"}``.

Everything a sender controls is refused *before* it can cost much, in this order:
unknown verb; payload over ``max_bytes`` (only ``len`` is looked at); not UTF-8;
nesting deeper than ``max_depth`` (one regex pass that skips string contents,
so a 100,000-deep payload never reaches the recursive JSON parser); then the
parse itself, which refuses integers of more than 20 digits, non-finite
numbers (``1e999``, ``NaN``, ``Infinity``) and duplicate keys. Last the shape:
an object with a valid ``id``, a finite ``ts``, an object ``args`` and no
unknown key.

An ``id`` is 1 to 128 printable ASCII characters without space, ``/``, ``+``,
``#``, ``"`` or ``\\``: it becomes a topic level of the reply topic
``<prefix>/<device>/reply/<id>``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from edge_runtime._util.strict_text import load_json
from edge_runtime.errors import CommandError

__all__ = [
    "VERBS",
    "Command",
    "Reply",
    "best_effort_id",
    "check_verb",
    "command_from_object",
    "load_object",
    "parse_command",
]

VERBS = ("ping", "status", "update", "rollback", "pin", "unpin", "config", "reload", "shadow")
"""Every verb of the MQTT command contract."""

MAX_ID_CHARS = 128
_ID_RE = re.compile(r'[!$-*,-.0-\[\]-~]{1,128}')  # printable ASCII minus space " # + / \
# The id of a plain payload ("id": "x") or of a signed one, where it sits escaped in a string (\"id\": \"x\").
_ID_IN_PAYLOAD = re.compile(rb'\\?"id\\?"\s*:\s*\\?"([!$-*,-.0-\[\]-~]{1,128})\\?"')
_BEST_EFFORT_SCAN = 64 << 10


@dataclass(frozen=True)
class Command:
    """A parsed, well-formed command. ``args`` is read-only.

    ``nonce`` and ``signed_by`` (the key ids of valid operator signatures) are
    set only for signed commands (:mod:`edge_runtime.commands.auth`).
    """

    id: str
    verb: str
    ts: float
    args: Mapping[str, Any]
    nonce: str | None = None
    signed_by: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Reply:
    """The answer to one command: ``ok``, a one-line ``message`` and JSON-ready ``data``.

    ``message`` is collapsed to one line on construction.
    """

    ok: bool
    message: str
    id: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "message", " ".join(str(self.message).split()))

    def to_dict(self) -> dict[str, Any]:
        """The reply document: ``{"id", "ok", "message", "data"}``."""
        return {"id": self.id, "ok": self.ok, "message": self.message, "data": dict(self.data)}

    def to_json(self) -> bytes:
        """The reply as compact, sorted JSON bytes (values JSON cannot hold become strings)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), default=str).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Reply:
        """Read a reply document: :meth:`to_json` output from the ledger, or a device's reply to ``fleet``.

        Raises:
            CommandError: not strict JSON, or not a reply document.
        """
        doc = load_json(data, "reply", error=CommandError)
        if not isinstance(doc, dict) or not isinstance(doc.get("ok"), bool) or not isinstance(doc.get("data"), dict):
            raise CommandError("stored reply is not a reply document")
        reply_id = doc.get("id")
        return cls(doc["ok"], str(doc.get("message", "")), reply_id if isinstance(reply_id, str) else None,
                   doc["data"])


def check_verb(verb: str) -> None:
    """Raise CommandError unless ``verb`` is one of :data:`VERBS`."""
    if verb not in VERBS:
        shown = verb if len(verb) <= 32 else verb[:32] + "..."
        raise CommandError(f"unknown command verb {shown!r} (known: {', '.join(VERBS)})")


def load_object(payload: bytes, *, max_bytes: int, max_depth: int, what: str = "command payload") -> dict[str, Any]:
    """Decode ``payload`` as one strict JSON object, refusing anything costly first.

    Raises:
        CommandError: over ``max_bytes``, not UTF-8, nested deeper than
            ``max_depth``, not JSON, an oversized or non-finite number, a
            duplicate key, or not an object (the message says which).
    """
    doc = load_json(payload, what, error=CommandError, max_bytes=max_bytes, max_depth=max_depth)
    if not isinstance(doc, dict):
        raise CommandError(f"{what} must be a JSON object, not {_json_type(doc)}")
    return doc


def command_from_object(doc: Mapping[str, Any], verb: str, *, required: Collection[str] = (),
                        optional: Collection[str] = ()) -> Command:
    """Check the command fields of a decoded payload and build the :class:`Command`.

    Always required: ``id``; ``ts``; ``args`` may be left out (``{}``). ``verb``
    and ``nonce`` may be listed in ``required``; ``verb``, when present, must
    equal ``verb``. Keys outside the known and ``optional`` ones are refused.

    Raises:
        CommandError: a field is missing, mistyped, out of range or unknown.
    """
    known = {"id", "ts", "args", "verb", *required, *optional}
    for key in doc:
        if key not in known:
            raise CommandError(f"unknown command key {key[:64]!r} (known: {', '.join(sorted(known))})")
    for key in ("id", "ts", *required):
        if key not in doc:
            raise CommandError(f"command is missing {key!r}")
    command_id = doc["id"]
    if not isinstance(command_id, str) or not _ID_RE.fullmatch(command_id):
        raise CommandError(f"command id must be 1 to {MAX_ID_CHARS} printable ASCII characters "
                           "without space, '/', '+', '#', '\"' or '\\'")
    ts = doc["ts"]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not 0 <= ts < 1e11:
        raise CommandError("command ts must be a Unix time in seconds (a finite, non-negative number)")
    args = doc.get("args", {})
    if not isinstance(args, dict):
        raise CommandError(f"command args must be a JSON object, not {_json_type(args)}")
    if "verb" in doc and doc["verb"] != verb:
        named = doc["verb"] if isinstance(doc["verb"], str) else _json_type(doc["verb"])
        raise CommandError(f"command names verb {str(named)[:32]!r} but arrived on the {verb!r} topic")
    nonce = doc.get("nonce")
    return Command(command_id, verb, float(ts), MappingProxyType(args),
                   nonce=nonce if isinstance(nonce, str) else None)


def parse_command(payload: bytes, verb: str, *, max_bytes: int, max_depth: int) -> Command:
    """Parse an unsigned command payload received on the ``verb`` topic.

    Raises:
        CommandError: unknown verb, or the payload is refused (see the module doc).
    """
    check_verb(verb)
    return command_from_object(load_object(payload, max_bytes=max_bytes, max_depth=max_depth), verb)


def best_effort_id(payload: bytes) -> str | None:
    """The command id of a payload that was refused, for the error reply; None if none is found.

    Looks only at the first 64 KiB, with one linear regex search, and returns
    only an id that is valid by the id rule; it also finds the id inside a
    signed envelope. It is a hint for correlation, never trusted.
    """
    match = _ID_IN_PAYLOAD.search(payload[:_BEST_EFFORT_SCAN])
    return match.group(1).decode("ascii") if match else None


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")

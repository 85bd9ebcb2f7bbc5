"""Signed fleet commands: operator Ed25519 signatures, freshness and replay protection.

A signed command is the JSON envelope::

    {"signed": "<the exact inner command JSON text, as a JSON string>",
     "signatures": [{"keyid": "<sha256 hex of the raw public key>", "sig": "<base64 Ed25519>"}]}

Each signature is Ed25519 over the UTF-8 bytes of the ``signed`` text, made
and checked by :mod:`edge_runtime.bundle.signing` (:func:`~edge_runtime.bundle.signing.sign_document`,
:func:`~edge_runtime.bundle.signing.verify_threshold`). The inner command is::

    {"verb": "update",          # must equal the topic's verb: a signed ping cannot be replayed as update
     "id": "...", "ts": 1767225600.0, "args": {...},
     "nonce": "<random, 16 to 128 printable ASCII characters>",
     "device": "cam-7"}         # optional; or "group": "lobby"; must name this device / one of its groups

:meth:`CommandAuth.verify` checks, in order: the envelope's shape; the
signature (before the inner text is parsed at all); the inner command's
fields (:func:`~edge_runtime.commands.parse.command_from_object`); the verb; the
target; the timestamp (refused when more than ``max_age_seconds`` old or
ahead: "expired timestamp"); the nonce, last, so only an otherwise valid
command uses one up. Nonces are kept by the nonce store (the
:class:`~edge_runtime.commands.ledger.CommandLedger`, on disk) until the
command's timestamp would be refused anyway, so a replay is refused after a
restart too.

When ``mqtt.signed_commands`` is on, the verbs in :data:`SIGNED_VERBS` must be
signed; ``ping``, ``status`` and ``reload`` may come unsigned, but a signed one
is verified all the same. Operators build envelopes with :func:`sign_command`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime.bundle.signing import sign_document, verify_threshold
from edge_runtime.commands.parse import Command, check_verb, command_from_object, load_object
from edge_runtime.errors import CommandError, SignatureError

__all__ = [
    "SIGNED_VERBS",
    "CommandAuth",
    "NonceStore",
    "is_signed_envelope",
    "new_command",
    "sign_command",
]

SIGNED_VERBS = frozenset({"update", "rollback", "pin", "unpin", "config", "shadow"})
"""Verbs that must carry an operator signature when signed commands are on."""

_NONCE_RE = re.compile(r"[!-~]{16,128}")
_TARGET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # as config device_id / groups
_ENVELOPE_KEYS = frozenset({"signed", "signatures"})


class NonceStore(Protocol):
    """Where seen nonces are kept (:class:`~edge_runtime.commands.ledger.CommandLedger`)."""

    def remember_nonce(self, nonce: str, expires_at: float) -> bool:
        """Record ``nonce`` until ``expires_at``; False if it was already recorded."""
        ...


def is_signed_envelope(doc: Mapping[str, Any]) -> bool:
    """Whether a decoded payload is a signed envelope rather than a plain command."""
    return "signed" in doc or "signatures" in doc


class CommandAuth:
    """Verifies signed command envelopes against the operator keys.

    ``operator_keys`` maps key id to public key (:func:`~edge_runtime.bundle.signing.load_trusted_keys`
    of ``mqtt.operator_keys_dir``); ``threshold`` distinct keys must sign.
    ``clock`` is wall-clock Unix seconds. ``max_bytes`` / ``max_depth`` bound
    the inner command text like the payload itself (pass ``mqtt.max_command_bytes``
    and ``mqtt.max_json_depth``).
    """

    def __init__(self, operator_keys: Mapping[str, Ed25519PublicKey], *, max_age_seconds: float,
                 nonce_store: NonceStore, clock: Callable[[], float] = time.time, threshold: int = 1,
                 max_bytes: int = 64 << 10, max_depth: int = 32) -> None:
        if max_age_seconds <= 0 or threshold < 1:
            raise ValueError("max_age_seconds must be positive and threshold at least 1")
        self.operator_keys = dict(operator_keys)
        self.max_age_seconds = max_age_seconds
        self.threshold = threshold
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self._nonces = nonce_store
        self._clock = clock

    def verify(self, payload: bytes, verb: str, *, device: str, groups: Collection[str]) -> Command:
        """Verify a signed command payload received on the ``verb`` topic.

        Raises:
            CommandError: unknown verb; the payload is malformed or unsigned;
                the signature is missing, bad or by an unknown key; the inner
                command is malformed, for another verb or another device/group;
                its timestamp is expired or in the future; its nonce was used.
        """
        check_verb(verb)
        doc = load_object(payload, max_bytes=self.max_bytes, max_depth=self.max_depth)
        if not is_signed_envelope(doc):
            raise CommandError(f"command {verb!r} is not signed (an operator signature is required)")
        return self.verify_envelope(doc, verb, device=device, groups=groups)

    def verify_envelope(self, doc: Mapping[str, Any], verb: str, *, device: str,
                        groups: Collection[str]) -> Command:
        """:meth:`verify` for an already decoded payload (see there for what is refused)."""
        unknown = sorted(set(doc) - _ENVELOPE_KEYS)
        if unknown:
            raise CommandError(f"signed command envelope has unknown key {unknown[0][:64]!r}")
        signed, signatures = doc.get("signed"), doc.get("signatures")
        if not isinstance(signed, str) or not isinstance(signatures, list):
            raise CommandError("signed command envelope needs 'signed' (a string) and 'signatures' (a list)")
        try:
            message = signed.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate escape (\ud800) decodes but cannot be signed text
            raise CommandError("signed command text is not valid Unicode") from e
        try:
            signers = verify_threshold(message, json.dumps({"signatures": signatures}).encode(),
                                       self.operator_keys, self.threshold)
        except SignatureError as e:
            raise CommandError(f"command signature refused: {e.one_line()}") from e
        inner = load_object(message, max_bytes=self.max_bytes, max_depth=self.max_depth, what="signed command")
        command = _inner_command(inner, verb)
        if inner.get("device", device) != device:
            raise CommandError(f"signed command is for device {str(inner['device'])[:64]!r}, not {device!r}")
        if "group" in inner and inner["group"] not in groups:
            raise CommandError(f"signed command is for group {str(inner['group'])[:64]!r}, "
                               "which this device is not in")
        now = self._clock()
        age = now - command.ts
        if age > self.max_age_seconds:
            raise CommandError(f"expired timestamp: command is {age:.0f} s old (max {self.max_age_seconds:g} s)")
        if -age > self.max_age_seconds:
            raise CommandError(f"expired timestamp: command is {-age:.0f} s in the future "
                               f"(max {self.max_age_seconds:g} s; device clock wrong?)")
        # Kept until the timestamp check alone would refuse a replay.
        if not self._nonces.remember_nonce(str(command.nonce), command.ts + self.max_age_seconds):
            raise CommandError("replayed command: its nonce was already used")
        return dataclasses.replace(command, signed_by=tuple(signers))


def _inner_command(doc: Mapping[str, Any], verb: str) -> Command:
    """The inner command of an envelope, checked by the same rules on the device and in :func:`sign_command`."""
    if "verb" not in doc:
        raise CommandError("signed command is missing 'verb'")
    command = command_from_object(doc, verb, required=("verb", "nonce"), optional=("device", "group"))
    if command.nonce is None or not _NONCE_RE.fullmatch(command.nonce):
        raise CommandError("signed command nonce must be 16 to 128 printable ASCII characters")
    if "device" in doc and "group" in doc:
        raise CommandError("signed command names both a device and a group; name one")
    for key in ("device", "group"):
        if key in doc and not (isinstance(doc[key], str) and _TARGET_RE.fullmatch(doc[key])):
            raise CommandError(f"signed command {key} must match {_TARGET_RE.pattern}")
    return command


def new_command(verb: str, args: Mapping[str, Any] | None = None, *, command_id: str | None = None,
                device: str | None = None, group: str | None = None, ts: float | None = None) -> dict[str, Any]:
    """A fresh inner command for :func:`sign_command`: a random id (unless given), ``ts`` now, a random nonce.

    ``device`` / ``group`` restrict it to one device or group (checked when signed).
    """
    command: dict[str, Any] = {"verb": verb, "id": command_id or uuid.uuid4().hex,
                               "ts": round(time.time() if ts is None else ts, 3),
                               "nonce": secrets.token_urlsafe(24), "args": dict(args or {})}
    for key, value in (("device", device), ("group", group)):
        if value is not None:
            command[key] = value
    return command


def sign_command(command: Mapping[str, Any], keys: Sequence[Ed25519PrivateKey]) -> bytes:
    """Sign ``command`` (see :func:`new_command`) with each key; return the envelope payload bytes.

    The command is checked with the device's own rules first, so a malformed
    one fails here rather than on every device.

    Raises:
        CommandError: no key, a duplicate key, or the command is malformed
            (verb, id, ts, nonce, args, device/group).
    """
    if not keys:
        raise CommandError("sign_command needs at least one operator key")
    verb = command.get("verb")
    check_verb(verb if isinstance(verb, str) else "")
    _inner_command(command, str(verb))
    try:
        text = json.dumps(dict(command), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CommandError(f"the command to sign is not plain JSON: {e}") from e
    signatures = json.loads(sign_document(text.encode("utf-8"), list(keys)))["signatures"]
    if len({s["keyid"] for s in signatures}) != len(signatures):
        raise CommandError("the same operator key is given twice")
    return json.dumps({"signed": text, "signatures": signatures}, sort_keys=True).encode()

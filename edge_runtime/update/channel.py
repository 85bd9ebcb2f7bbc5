"""The signed channel document: which bundle version each model should run. Pure, no I/O.

A channel is published as two files side by side: ``channel.json`` and
``channel.json.sig``, a :func:`~edge_runtime.bundle.signing.sign_document` over the
exact ``channel.json`` bytes. The document::

    {"schema": 1,
     "sequence": 42,                      # grows with every publication
     "expires": "2026-02-01T00:00:00Z",   # ISO-8601 with an offset
     "models": {"face": {"version": 3,
                         "url": "face-3.bundle",   # absolute, or relative to the channel URL
                         "sha256": "<64 hex>",
                         "size": 123456}}}

:func:`parse_channel` checks, in order: the signature threshold (before the
bytes are parsed at all), the schema (unknown or duplicate keys refused), the
expiry and the sequence. ``expires`` and ``sequence`` together stop replay: an
attacker who serves an old, validly signed document is refused once it has
expired, and before that as soon as the device has seen a newer sequence (the
caller persists the highest sequence accepted and passes it as ``min_sequence``).
The same sequence again is accepted: polling twice is not a replay.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any
from urllib.parse import urljoin, urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime._util.strict_text import load_json
from edge_runtime.bundle.manifest import NAME_PATTERN, is_sha256_hex, is_valid_name
from edge_runtime.bundle.requirements import format_timestamp, parse_timestamp
from edge_runtime.bundle.signing import verify_threshold
from edge_runtime.errors import IncompatibleError, ManifestError

__all__ = [
    "CHANNEL_FILE",
    "CHANNEL_SCHEMA",
    "SIGNATURE_FILE",
    "Channel",
    "ChannelEntry",
    "build_channel",
    "parse_channel",
    "verified_sequence",
]

CHANNEL_SCHEMA = 1
CHANNEL_FILE = "channel.json"
SIGNATURE_FILE = "channel.json.sig"
_MAX_MODELS = 256
_MAX_URL = 2048
_MAX_INT = 2**53  # what every JSON implementation reads exactly
_MAX_SIZE = 2**48


@dataclass(frozen=True)
class ChannelEntry:
    """One model's target: bundle ``version`` at ``url`` (absolute), with its sha256 and size."""

    version: int
    url: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Channel:
    """A verified channel document; ``expires`` is aware UTC, ``entries`` read-only."""

    sequence: int
    expires: datetime
    entries: Mapping[str, ChannelEntry]


def parse_channel(
    data: bytes,
    sig: bytes,
    *,
    trusted: Mapping[str, Ed25519PublicKey],
    threshold: int,
    now: datetime,
    min_sequence: int,
    base_url: str,
) -> Channel:
    """Verify and parse a channel document; relative URLs resolve against ``base_url``.

    ``now`` must be timezone-aware. ``base_url`` is the URL ``data`` came from.

    Raises:
        SignatureError: malformed signature document, a bad signature, or fewer
            than ``threshold`` trusted signers.
        ManifestError: not UTF-8 JSON, or a field is missing, unknown,
            duplicated, mistyped or out of range (the message names it).
        IncompatibleError: expired (``expires <= now``), or ``sequence`` is
            below ``min_sequence`` (an older document replayed).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    verify_threshold(data, sig, trusted, threshold)
    sequence, expires, raw_entries = _decode(data)
    if expires <= now:
        raise IncompatibleError(
            f"channel document expired at {format_timestamp(expires)}, now is {format_timestamp(now)} (replayed?)"
        )
    if sequence < min_sequence:
        raise IncompatibleError(
            f"channel sequence {sequence} is below {min_sequence}, already seen (an older document replayed?)"
        )
    entries = {
        name: ChannelEntry(e.version, _resolve(base_url, e.url, name), e.sha256, e.size)
        for name, e in raw_entries.items()
    }
    return Channel(sequence, expires, MappingProxyType(entries))


def verified_sequence(
    data: bytes, sig: bytes, *, trusted: Mapping[str, Ed25519PublicKey], threshold: int
) -> int:
    """The sequence of a channel document whose signatures verify, expired or not (state recovery).

    Raises:
        SignatureError: the signatures do not meet ``threshold`` with ``trusted``.
        ManifestError: the document is not a valid channel document.
    """
    verify_threshold(data, sig, trusted, threshold)
    return _decode(data)[0]


def build_channel(
    models: Mapping[str, ChannelEntry],
    sequence: int,
    expires: datetime,
    base_url_relative_ok: bool = True,
) -> bytes:
    """Canonical channel.json bytes (sorted keys, one key per line) for the publisher to sign.

    ``models`` URLs are written as given: relative ones are resolved by each
    device against the channel URL; with ``base_url_relative_ok`` False every
    URL must be absolute http(s). The result passes the same validation as
    :func:`parse_channel`.

    Raises:
        ManifestError: a name, URL, hash, size, version or ``sequence`` is invalid.
    """
    if expires.tzinfo is None:
        raise ManifestError("channel.expires must be timezone-aware")
    doc = {
        "schema": CHANNEL_SCHEMA,
        "sequence": sequence,
        "expires": format_timestamp(expires),
        "models": {
            name: {"version": e.version, "url": e.url, "sha256": e.sha256, "size": e.size}
            for name, e in sorted(models.items())
        },
    }
    data = json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"
    _, _, entries = _decode(data)
    if not base_url_relative_ok:
        for name, e in entries.items():
            if not _scheme(e.url, f"channel.models[{name!r}]"):
                raise ManifestError(f"channel.models[{name!r}].url {e.url!r} must be absolute")
    return data


def _scheme(url: str, where: str) -> str:
    try:
        return urlsplit(url).scheme
    except ValueError as e:  # e.g. an unbalanced '[' in the host
        raise ManifestError(f"{where}.url is not a valid URL") from e


def _resolve(base_url: str, url: str, name: str) -> str:
    where = f"channel.models[{name!r}]"
    try:
        resolved = urljoin(base_url, url)
        parts = urlsplit(resolved)
    except ValueError as e:
        raise ManifestError(f"{where}.url does not resolve against the channel URL") from e
    # A relative URL against a file: or garbage base would escape the http(s) fetcher's checks.
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ManifestError(f"{where}.url does not resolve to an http(s) URL")
    return resolved


def _fields(obj: object, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ManifestError(f"{where} must be an object")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise ManifestError(f"{where}.{unknown[0]} is not a known key")
    missing = [k for k in allowed if k not in obj]
    if missing:
        raise ManifestError(f"{where}.{missing[0]} is required")
    return obj


def _int(obj: dict[str, Any], key: str, where: str, lo: int, hi: int) -> int:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ManifestError(f"{where}.{key} must be an integer in [{lo}, {hi}]")
    return value


def _str(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise ManifestError(f"{where}.{key} must be a string")
    return value


def _decode(data: bytes) -> tuple[int, datetime, dict[str, ChannelEntry]]:
    doc = load_json(data, "channel document", error=ManifestError)
    top = _fields(doc, "channel", ("schema", "sequence", "expires", "models"))
    schema = _int(top, "schema", "channel", 1, 1000)
    if schema != CHANNEL_SCHEMA:
        raise ManifestError(f"channel.schema {schema} is not supported (expected {CHANNEL_SCHEMA})")
    sequence = _int(top, "sequence", "channel", 0, _MAX_INT)
    expires = parse_timestamp(_str(top, "expires", "channel"), "channel.expires")
    models = top["models"]
    if not isinstance(models, dict) or len(models) > _MAX_MODELS:
        raise ManifestError(f"channel.models must be an object with at most {_MAX_MODELS} entries")
    entries: dict[str, ChannelEntry] = {}
    for name, raw in models.items():
        if not is_valid_name(name):  # the manifest's rule: a channel can only name installable models
            raise ManifestError(f"channel.models name {name[:80]!r} must match {NAME_PATTERN.pattern}")
        where = f"channel.models[{name!r}]"
        entry = _fields(raw, where, ("version", "url", "sha256", "size"))
        url = _str(entry, "url", where)
        if not url or len(url) > _MAX_URL or any(c.isspace() or not c.isprintable() for c in url):
            raise ManifestError(f"{where}.url must be 1 to {_MAX_URL} printable characters without spaces")
        scheme = _scheme(url, where)
        if scheme and scheme not in ("http", "https"):
            raise ManifestError(f"{where}.url must be http(s) or relative, not {scheme}:")
        sha256 = _str(entry, "sha256", where)
        if not is_sha256_hex(sha256):
            raise ManifestError(f"{where}.sha256 must be 64 lowercase hex digits")
        entries[name] = ChannelEntry(
            version=_int(entry, "version", where, 1, _MAX_INT),
            url=url,
            sha256=sha256,
            size=_int(entry, "size", where, 1, _MAX_SIZE),
        )
    return sequence, expires, entries

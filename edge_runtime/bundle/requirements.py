"""Does a bundle fit this device? Pure checks of ``requires`` and ``expires``.

``requires.runtime`` is a minimum (``">=0.1.0"`` or plain ``"0.1.0"``) or an
exact version (``"==0.1.0"``); versions compare as integer tuples padded with
zeros, so ``0.1`` equals ``0.1.0``. ``requires.hardware`` tags must all be in
the device's tag set (its CPU architecture from :func:`device_tags` plus the
accelerator tags from config). ``expires`` and ``created`` are ISO-8601
timestamps with an explicit offset (``2026-01-31T00:00:00Z``).

A ``created`` time in the future is deliberately *not* refused: boards such as
the Raspberry Pi have no battery-backed clock and boot with a stale time until
NTP syncs, and a future ``created`` carries no risk (it is signed by the
publisher). Only ``expires`` is enforced.
"""

from __future__ import annotations

import platform
import re
from datetime import datetime, timezone

from edge_runtime.bundle.manifest import Manifest
from edge_runtime.errors import IncompatibleError, ManifestError

__all__ = [
    "check_requirements",
    "check_runtime_and_hardware",
    "device_tags",
    "format_timestamp",
    "parse_runtime_requirement",
    "parse_timestamp",
]

# re.ASCII: a bare \d also matches other scripts' digits, which int() then reads.
_REQUIREMENT_RE = re.compile(r"(>=|==)?\s*(\d{1,9}(?:\.\d{1,9}){0,3})", re.ASCII)
_VERSION_PREFIX_RE = re.compile(r"\d{1,9}(?:\.\d{1,9}){0,3}", re.ASCII)
_ARCH_ALIASES = {
    "arm64": "aarch64",
    "aarch64_be": "aarch64",
    "amd64": "x86_64",
    "x64": "x86_64",
    "armv7": "armv7l",
    "armv7hl": "armv7l",
    "armhf": "armv7l",
}


def parse_timestamp(text: str, key: str) -> datetime:
    """Parse an ISO-8601 timestamp with an explicit offset, returned in UTC.

    ``key`` names the field in the error message.

    Raises:
        ManifestError: not ISO-8601, or no UTC offset (a naive time is ambiguous).
    """
    # datetime.fromisoformat only accepts a trailing 'Z' from Python 3.11 on.
    normalised = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    try:
        parsed = datetime.fromisoformat(normalised)
    except ValueError as e:
        raise ManifestError(
            f"{key} {text!r} is not an ISO-8601 timestamp (e.g. 2026-01-31T00:00:00Z)"
        ) from e
    if parsed.tzinfo is None:
        raise ManifestError(f"{key} {text!r} has no UTC offset (e.g. 2026-01-31T00:00:00Z)")
    return parsed.astimezone(timezone.utc)


def format_timestamp(moment: datetime) -> str:
    """Format an aware datetime as the manifest writes it: ``YYYY-MM-DDTHH:MM:SSZ``."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _version_tuple(text: str, width: int = 4) -> tuple[int, ...]:
    parts = [int(p) for p in text.split(".")]
    return tuple(parts + [0] * (width - len(parts)))


def parse_runtime_requirement(spec: str) -> tuple[str, tuple[int, ...]]:
    """Split ``requires.runtime`` into (operator, version tuple); '' means none.

    Raises:
        ManifestError: not ``>=X.Y.Z``, ``==X.Y.Z`` or ``X.Y.Z``.
    """
    match = _REQUIREMENT_RE.fullmatch(spec.strip())
    if not match:
        raise ManifestError(
            f"requires.runtime {spec!r} must be '>=X.Y.Z', '==X.Y.Z' or 'X.Y.Z' (meaning >=)"
        )
    return match.group(1) or ">=", _version_tuple(match.group(2))


def check_runtime_and_hardware(what: str, runtime: str, hardware: tuple[str, ...] | list[str], *,
                               device_tags: set[str], runtime_version: str) -> None:
    """Refuse ``what`` (a bundle, or a TUF target announcing one) when this device cannot run it.

    Raises:
        IncompatibleError: the runtime is too old (or not the exact version), or a hardware tag is missing.
        ManifestError: ``runtime`` is malformed.
    """
    if runtime:
        op, wanted = parse_runtime_requirement(runtime)
        match = _VERSION_PREFIX_RE.match(runtime_version)
        if not match:
            raise IncompatibleError(f"runtime version {runtime_version!r} is not a dotted version")
        have = _version_tuple(match.group(0))
        if (op == "==" and have != wanted) or (op == ">=" and have < wanted):
            raise IncompatibleError(f"{what} requires runtime {runtime}, this device runs {runtime_version}")
    missing = [tag for tag in hardware if tag not in device_tags]
    if missing:
        have_tags = ", ".join(sorted(device_tags)) or "none"
        raise IncompatibleError(f"{what} requires hardware {', '.join(missing)}; this device has {have_tags}")


def check_requirements(
    manifest: Manifest, *, device_tags: set[str], runtime_version: str, now: datetime
) -> None:
    """Refuse a bundle this device cannot or must not run.

    ``now`` must be timezone-aware. Checks, in order: runtime version,
    hardware tags, expiry.

    Raises:
        IncompatibleError: the runtime is too old (or not the exact version),
            a hardware tag is missing, or the bundle has expired.
        ManifestError: ``requires.runtime``, ``expires`` or ``created`` is
            malformed (the publisher's fault, not the device's).
    """
    check_runtime_and_hardware(f"bundle {manifest.name} v{manifest.version}", manifest.requires.runtime,
                               manifest.requires.hardware, device_tags=device_tags,
                               runtime_version=runtime_version)
    if manifest.created:
        parse_timestamp(manifest.created, "manifest.created")
    if manifest.expires:
        expires = parse_timestamp(manifest.expires, "manifest.expires")
        if expires <= now:
            raise IncompatibleError(
                f"bundle {manifest.name} v{manifest.version} expired at "
                f"{format_timestamp(expires)} (now {format_timestamp(now)})"
            )


def device_tags() -> set[str]:
    """This machine's architecture tag: 'aarch64', 'x86_64', 'armv7l', ...

    Accelerator tags ('cuda', 'tensorrt', ...) come from config and are added
    by the caller; they cannot be detected reliably without loading runtimes.
    """
    machine = platform.machine().lower()
    return {_ARCH_ALIASES.get(machine, machine)} if machine else set()

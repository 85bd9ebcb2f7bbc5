"""Publish a signed OTA channel for a set of bundles.

Usage:
    python tools/make_channel.py --key KEY [--key KEY2] --sequence N --expires-in-hours H --out DIR BUNDLE...

Reads each bundle's manifest (name, version), copies the bundle into DIR under
its own file name (skipped when DIR already holds the identical file; a
different file of that name is refused), then writes DIR/channel.json, whose
URLs are those file names (relative, so DIR can be served from any base URL),
and DIR/channel.json.sig signed by every --key.

DIR is then the whole publication: upload the bundles first, channel.json and
channel.json.sig last, so that a device never reads a channel naming a bundle
that is not there yet. --sequence must be above the sequence already in
DIR/channel.json, since devices refuse a sequence lower than one they have seen.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from edge_runtime._util.fsutil import atomic_write, create_exclusive, fsync_dir, sha256_file
from edge_runtime.bundle.reader import inspect_bundle
from edge_runtime.bundle.requirements import format_timestamp
from edge_runtime.bundle.signing import key_id, load_private_key, sign_document
from edge_runtime.cli.common import report_errors
from edge_runtime.config.model import Limits
from edge_runtime.errors import ConfigError, ManifestError
from edge_runtime.update.channel import CHANNEL_FILE, SIGNATURE_FILE, ChannelEntry, build_channel

# Bundle file names become relative URLs verbatim: keep them free of anything to escape.
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _copy_into(src: Path, out_dir: Path) -> Path:
    """Copy ``src`` to ``out_dir/src.name`` (temp + rename); keep an identical file already there."""
    dest = out_dir / src.name
    if dest.exists() or dest.is_symlink():
        if dest.is_symlink() or not dest.is_file():
            raise ConfigError(f"{dest} exists and is not a regular file")
        if dest.samefile(src) or sha256_file(dest) == sha256_file(src):
            return dest
        raise ConfigError(f"{dest} exists with other content; refusing to overwrite a published bundle")
    tmp = out_dir / f".{src.name}.{os.getpid()}.tmp"
    try:
        with open(src, "rb") as fh_in, create_exclusive(tmp, 0o644) as fh_out:
            shutil.copyfileobj(fh_in, fh_out, 1 << 20)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(out_dir)
    return dest


def _published_sequence(out_dir: Path) -> int | None:
    path = out_dir / CHANNEL_FILE
    if not path.exists():
        return None
    try:
        sequence = json.loads(path.read_bytes()).get("sequence")
    except (ValueError, AttributeError) as e:
        raise ConfigError(f"{path} is not a channel document; move it away first") from e
    if not isinstance(sequence, int):
        raise ConfigError(f"{path} has no integer sequence; move it away first")
    return sequence


def publish(keys: list[Path], sequence: int, hours: float, out_dir: Path, bundles: list[Path]) -> list[str]:
    """Write the channel into ``out_dir``; return one report line per model and one for the channel.

    Raises:
        EdgeRuntimeError: a key, bundle or argument is refused (the message names it).
        OSError: a file cannot be read or written.
    """
    if hours <= 0:
        raise ConfigError("--expires-in-hours must be above 0")
    private = [load_private_key(k) for k in keys]
    if len({key_id(k.public_key()) for k in private}) != len(private):
        raise ConfigError("the same key is given twice; a threshold needs distinct keys")
    published = _published_sequence(out_dir) if out_dir.exists() else None
    if published is not None and sequence <= published:
        raise ConfigError(f"--sequence {sequence} must be above the published sequence {published}")
    # Read every manifest before copying anything, so a bad bundle leaves DIR untouched.
    planned: dict[str, tuple[int, Path]] = {}
    for bundle in bundles:
        if not _FILE_NAME_RE.fullmatch(bundle.name):
            raise ConfigError(f"{bundle}: file name must match {_FILE_NAME_RE.pattern} (it becomes the URL)")
        if any(b.name == bundle.name for _, b in planned.values()):
            raise ConfigError(f"{bundle}: a second bundle named {bundle.name}")
        manifest = inspect_bundle(bundle, Limits()).manifest()
        if manifest.name in planned:
            raise ManifestError(f"{bundle}: a second bundle for model {manifest.name!r}; a channel names one each")
        planned[manifest.name] = (manifest.version, bundle)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries: dict[str, ChannelEntry] = {}
    report = []
    for name, (version, bundle) in sorted(planned.items()):
        sha256, size = sha256_file(_copy_into(bundle, out_dir))
        entries[name] = ChannelEntry(version, bundle.name, sha256, size)
        report.append(f"{name:24s} v{version:<6d} {bundle.name}  {size} bytes  sha256 {sha256[:16]}")
    expires = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(hours=hours)
    data = build_channel(entries, sequence, expires)
    atomic_write(out_dir / CHANNEL_FILE, data, 0o644)
    atomic_write(out_dir / SIGNATURE_FILE, sign_document(data, private), 0o644)
    report.append(
        f"{out_dir / CHANNEL_FILE}: sequence {sequence}, expires {format_timestamp(expires)}, "
        f"{len(private)} signature(s)"
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key", type=Path, action="append", required=True, help="private key (repeat for k of n)")
    parser.add_argument("--sequence", type=int, required=True, help="above every sequence published before")
    parser.add_argument("--expires-in-hours", type=float, required=True, help="devices refuse the channel after")
    parser.add_argument("--out", type=Path, required=True, help="publication dir (channel + bundles)")
    parser.add_argument("bundles", type=Path, nargs="+", metavar="BUNDLE")
    args = parser.parse_args(argv)
    def run() -> int:
        print("\n".join(publish(args.key, args.sequence, args.expires_in_hours, args.out, args.bundles)))
        return 0

    return report_errors(run)


if __name__ == "__main__":
    sys.exit(main())

"""Who owns an entry under ``<state>/staging/``, and removing the entries of dead owners.

The daemon and any number of CLI processes share one state dir, so no one may
empty ``staging/`` while another process installs from it. Instead every
staging entry carries its owner in its *name*::

    bundle-.pid<pid>-<start>-<boot>.<random>      (a bundle being unpacked)
    download-<hash>.pid<pid>-<start>-<boot>.bundle (an OTA download)

``<start>`` is the process start time from ``/proc/<pid>/stat`` (clock ticks
since boot) and ``<boot>`` the first 8 hex digits of the kernel's boot id, so
a pid reused by another process, or after a reboot, is not mistaken for the
owner. The name is set when the entry is created (``mkdtemp``/``O_CREAT``), so
there is no window in which an entry exists without its owner. An entry
whose owner is dead, or that names no owner (left by an older version), is
removed by :func:`sweep_staging`: at daemon start and by every CLI command.

A process in another pid namespace (a CLI in a container next to a daemon on
the host) looks dead: its install then fails with a one-line error when its
staging dir vanishes; it never installs a partial bundle.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from pathlib import Path

from edge_runtime._util.fsutil import fsync_dir, remove_tree

__all__ = ["owner_alive", "owner_tag", "process_start", "sweep_staging"]

_OWNED = re.compile(r"[A-Za-z0-9_-]*\.pid([1-9][0-9]{0,9})-([0-9]{1,20})-([0-9a-f]{8})\.[A-Za-z0-9_]+")
_PROC = Path("/proc")


def process_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of process ``pid``, None if there is no such process."""
    try:
        stat = (_PROC / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and ')': fields after the last ')' are fixed.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of stat(5); fields[0] is field 3
    except (IndexError, ValueError):
        return None


@functools.cache
def _boot_id() -> str:
    try:
        text = (_PROC / "sys" / "kernel" / "random" / "boot_id").read_text("ascii")
    except (OSError, UnicodeDecodeError):
        return "00000000"
    digits = "".join(c for c in text.lower() if c in "0123456789abcdef")
    return (digits + "00000000")[:8]


def owner_tag(pid: int | None = None) -> str:
    """``pid<pid>-<start>-<boot>`` for process ``pid`` (default: this one), to embed in a staging name.

    Raises OSError: the process does not exist (or /proc is not mounted).
    """
    pid = os.getpid() if pid is None else pid
    start = process_start(pid)
    if start is None:
        raise OSError(f"cannot read /proc/{pid}/stat: no such process, or /proc is not mounted")
    return f"pid{pid}-{start}-{_boot_id()}"


def owner_alive(name: str) -> bool:
    """True if the staging entry ``name`` names an owner that still runs; False if dead or unowned."""
    match = _OWNED.fullmatch(name)
    if match is None:
        return False
    pid, start, boot = int(match[1]), int(match[2]), match[3]
    return boot == _boot_id() and process_start(pid) == start


def sweep_staging(staging: Path) -> list[str]:
    """Remove every entry of ``staging`` whose owner is dead or that names none; one note per entry.

    Entries of live owners (this process included) are kept. Safe to run in
    several processes at once: an entry another sweeper removed first is skipped.
    Raises OSError: ``staging`` cannot be listed, or an entry cannot be removed.
    """
    notes: list[str] = []
    if process_start(os.getpid()) is None:
        return notes  # no /proc: nobody's liveness can be told, so remove nothing
    with os.scandir(staging) as it:
        names = sorted(e.name for e in it)
    for name in names:
        if owner_alive(name):
            continue
        with contextlib.suppress(FileNotFoundError):
            remove_tree(staging / name)
            notes.append(f"removed staging leftover {name}")
    if notes:
        fsync_dir(staging)
    return notes

"""One daemon per state dir: an ``flock`` on ``<state>/daemon.lock`` held for the daemon's life.

Two daemons on one state dir would both process the same inbox files, both
forward the same spool and fight over the model slots. The second one refuses
to start with one line naming the first one's pid. The lock is separate from
the state lock (``state.lock``, held only for each read-modify-write), so the
CLI (``edge-runtime models activate`` + SIGHUP) keeps working next to a
running daemon. The kernel drops an ``flock`` when its holder dies, so a
``kill -9`` never leaves a stale lock; the pid written in the file is only
for the message.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from edge_runtime._util.fsutil import CLOEXEC, NOFOLLOW
from edge_runtime.errors import CacheError

__all__ = ["DAEMON_LOCK_FILE", "InstanceLock"]

DAEMON_LOCK_FILE = "daemon.lock"


class InstanceLock:
    """The daemon's exclusive hold on a state dir; :meth:`acquire`, then :meth:`release` at stop."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / DAEMON_LOCK_FILE
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock without waiting and write our pid into the file.

        Raises:
            CacheError: another process holds it (the message names its pid), or
                the lock file cannot be opened (a symlink, permissions).
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | NOFOLLOW | CLOEXEC, 0o600)
        except OSError as e:
            raise CacheError(f"{self.path}: cannot open the daemon lock file: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise CacheError(f"another edge-runtime daemon ({who}) already runs on state dir "
                             f"{self.path.parent} (lock {self.path}); stop it first") from None
        os.fchmod(fd, 0o600)  # an older file may have been created with other bits
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (closing the descriptor); safe to call twice or when never acquired."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None

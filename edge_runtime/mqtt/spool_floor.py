"""The spool's seq floor: a sidecar file ``<spool>.seq`` holding a value above every seq assigned.

A spool database that had to be thrown away (corruption) restarts numbering at
the floor instead of 1, so subscribers that drop duplicates by seq never discard
fresh messages. The floor is written ``SEQ_RESERVE`` seqs ahead of use, so one
fsync'd rename covers that many appends.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from edge_runtime._util.fsutil import atomic_write

__all__ = ["SEQ_RESERVE", "SeqFloor"]

SEQ_RESERVE = 4096  # seqs reserved per sidecar write: one fsync'd rename per 4096 appends
_log = logging.getLogger(__name__)


class SeqFloor:
    """The floor file next to one spool database; ``value`` is the floor held now.

    Not thread-safe on its own: the spool calls it under its lock.
    """

    def __init__(self, spool_path: Path) -> None:
        self.path = spool_path.with_name(spool_path.name + ".seq")
        self.value = 0
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # a kill -9 during a floor write
            with contextlib.suppress(OSError):
                stale.unlink()

    def load(self) -> int:
        """Raise ``value`` to what the file says and return it (an unreadable file is logged, never fatal)."""
        try:
            stored = int(self.path.read_text().strip() or 0)
        except FileNotFoundError:
            stored = 0
        except (OSError, ValueError) as e:
            _log.warning("spool seq floor %s unreadable (%s): relying on the database", self.path, e)
            stored = 0
        self.value = max(self.value, stored)
        return self.value

    def reserve(self, seq: int) -> None:
        """Make sure the floor is above ``seq`` (writing ``SEQ_RESERVE`` ahead when it is not).

        Raises OSError: the file could not be written.
        """
        if seq >= self.value:
            atomic_write(self.path, f"{seq + SEQ_RESERVE}\n".encode())
            self.value = seq + SEQ_RESERVE

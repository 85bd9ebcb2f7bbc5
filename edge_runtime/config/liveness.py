"""The ``[liveness]`` config section: when a stuck part counts as stalled, and how often it is restarted.

::

    [liveness]
    stall_seconds = 30.0          # a source/worker/API loop without progress this long is stalled
    max_restarts = 3              # stalled-source restarts allowed per pipeline in any window ...
    restart_window_seconds = 600.0  # ... of this many seconds; past that the watchdog is withheld
    max_abandoned_threads = 4     # threads left blocked by restarts, whole daemon; past that: withheld

See :mod:`edge_runtime.liveness` for what happens on a stall.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_runtime.config.typed_toml import in_range

__all__ = ["LivenessConfig"]


@dataclass(frozen=True)
class LivenessConfig:
    """Progress-based liveness: the stall bound and the restart budget."""

    stall_seconds: float = field(default=30.0, metadata={"check": in_range(0.5, 86400)})
    max_restarts: int = field(default=3, metadata={"check": in_range(0, 1000)})
    restart_window_seconds: float = field(default=600.0, metadata={"check": in_range(1, 86400 * 7)})
    max_abandoned_threads: int = field(default=4, metadata={"check": in_range(0, 256)})

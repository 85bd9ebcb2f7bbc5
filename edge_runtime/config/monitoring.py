"""The ``[monitoring]`` config section: drift, field accuracy and shadow runs.

::

    [monitoring]
    enabled = true                # result ids, drift against the bundle's reference, truth matching
    window = 200                  # live samples per drift window
    check_every = 20              # test the window after this many new samples
    alpha = 0.01                  # false-alarm rate per window over all features (Bonferroni-split)
    clear_alpha = 0.05            # a feature in drift clears when no longer significant at this level
    truth_ttl_seconds = 3600.0    # how long a result waits for its ground truth
    truth_max_pending = 4096      # results waiting for truth, at most (oldest dropped, counted)
    accuracy_window = 200         # truths per rolling accuracy
    accuracy_min_samples = 50     # before any accuracy event
    accuracy_margin = 0.05        # event when accuracy is below the bundle's baseline by this much
    rollback_on_accuracy = false  # also roll back to the previous version

    [monitoring.shadow]           # a candidate version run beside the active one
    model = ""                    # none by default; the fleet command `shadow` starts one too
    version = 0
    share = 0.1                   # of the active model's inputs
    queue = 4                     # inputs waiting for the shadow; more are dropped (counted)
    promote_after = 0             # activate the candidate after this many samples (0: never) ...
    min_agreement = 0.95          # ... when its agreement with the active one is at least this
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_runtime.config.typed_toml import in_range
from edge_runtime.errors import ConfigError

__all__ = ["MonitoringConfig", "ShadowConfig"]


@dataclass(frozen=True)
class ShadowConfig:
    """A shadow run to start with the daemon (empty ``model``: none)."""

    model: str = ""
    version: int = field(default=0, metadata={"check": in_range(0, 2**53)})
    share: float = field(default=0.1, metadata={"check": in_range(0.0, 1.0)})
    queue: int = field(default=4, metadata={"check": in_range(1, 64)})
    promote_after: int = field(default=0, metadata={"check": in_range(0, 10**9)})
    min_agreement: float = field(default=0.95, metadata={"check": in_range(0.0, 1.0)})


@dataclass(frozen=True)
class MonitoringConfig:
    """Drift, field accuracy and shadow settings."""

    enabled: bool = True
    window: int = field(default=200, metadata={"check": in_range(20, 100_000)})
    check_every: int = field(default=20, metadata={"check": in_range(1, 100_000)})
    alpha: float = field(default=0.01, metadata={"check": in_range(1e-9, 0.5)})
    clear_alpha: float = field(default=0.05, metadata={"check": in_range(1e-9, 0.99)})
    truth_ttl_seconds: float = field(default=3600.0, metadata={"check": in_range(1, 86400 * 30)})
    truth_max_pending: int = field(default=4096, metadata={"check": in_range(1, 1 << 20)})
    accuracy_window: int = field(default=200, metadata={"check": in_range(10, 100_000)})
    accuracy_min_samples: int = field(default=50, metadata={"check": in_range(1, 100_000)})
    accuracy_margin: float = field(default=0.05, metadata={"check": in_range(0.0, 1.0)})
    rollback_on_accuracy: bool = False
    shadow: ShadowConfig = field(default_factory=ShadowConfig)

    def __post_init__(self) -> None:
        if self.clear_alpha <= self.alpha:
            raise ConfigError("must be above monitoring.alpha (the clear level is the more lenient one)",
                              key="monitoring.clear_alpha")
        if self.accuracy_min_samples > self.accuracy_window:
            raise ConfigError("must not exceed monitoring.accuracy_window", key="monitoring.accuracy_min_samples")

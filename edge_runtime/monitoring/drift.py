"""Drift of live inputs and outputs against the bundle's reference, per feature.

Each feature keeps a ring of the last ``window`` bin indices and the count of
each bin: a new value costs one bin lookup (``bisect`` over at most 63 edges)
and two integer updates, with no allocation and no re-scan of the window.

Every ``check_every`` values, once the window is full, each feature's live
histogram is compared with the reference's by the two-sample chi-square test
of homogeneity, which accounts for the size of both samples. The fixed PSI
threshold people use (0.1, 0.25) does not: with 100 samples and 10 bins PSI
of *unchanged* data exceeds 0.1 in most windows, because its noise floor is
about (bins - 1) / n. So the decision is the test's, and the PSI reported
beside it comes with the threshold that matches the same false-alarm rate at
this window size (critical value / effective sample size).

Testing F features at once multiplies the chances of a false alarm, and so
does testing a sliding window every ``check_every`` samples (``window /
check_every`` tests while one window's worth of samples passes). So each test
is made at ``alpha / (F * window / check_every)`` (Bonferroni): at most
``alpha`` of the windows of unchanged data raise any drift event. A feature in drift clears
only when its test is no longer significant at the lenient ``clear_alpha``
(hysteresis: it does not flap around the threshold).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edge_runtime.bundle.reference_stats import CategoricalFeature, NumericFeature, ReferenceStats
from edge_runtime.config.monitoring import MonitoringConfig
from edge_runtime.monitoring.stats import chi2_critical, chi2_sf, homogeneity, psi

__all__ = ["DriftMonitor", "FeatureScore"]

Emit = Callable[..., Any]


@dataclass(frozen=True)
class FeatureScore:
    """The last check of one feature."""

    statistic: float
    df: int
    p_value: float
    critical: float
    psi: float
    psi_threshold: float
    active: bool

    @property
    def score(self) -> float:
        """Statistic over its critical value: 1 or more is drift."""
        return self.statistic / self.critical if self.critical > 0 else 0.0


class _Window:
    __slots__ = ("counts", "edges", "filled", "name", "pos", "ref_counts", "ring", "values")

    def __init__(self, name: str, feature: NumericFeature | CategoricalFeature, size: int) -> None:
        self.name = name
        self.ref_counts = list(feature.counts)
        self.edges: tuple[float, ...] | None = feature.edges if isinstance(feature, NumericFeature) else None
        self.values: dict[int, int] = ({} if isinstance(feature, NumericFeature)
                                       else {v: i for i, v in enumerate(feature.values)})
        self.counts = [0] * len(self.ref_counts)
        self.ring = [0] * size
        self.pos = 0
        self.filled = 0

    def add(self, value: float) -> None:
        if self.edges is not None:
            i = bisect.bisect_right(self.edges, value)
        else:
            i = self.values.get(int(value), len(self.ref_counts) - 1)
        if self.filled == len(self.ring):
            self.counts[self.ring[self.pos]] -= 1
        else:
            self.filled += 1
        self.ring[self.pos] = i
        self.counts[i] += 1
        self.pos = (self.pos + 1) % len(self.ring)


class DriftMonitor:
    """Drift windows of one model version; :meth:`add` is called from the inferring threads."""

    def __init__(self, model: str, version: int, reference: ReferenceStats, names: Sequence[str],
                 config: MonitoringConfig, emit: Emit) -> None:
        """``names`` are the extractor's features in order; those the reference lacks are not watched."""
        self.model, self.version, self.config, self._emit = model, version, config, emit
        self._slots: list[tuple[int, _Window]] = [
            (i, _Window(n, reference.features[n], config.window)) for i, n in enumerate(names)
            if n in reference.features]
        self.unwatched = tuple(n for n in names if n not in reference.features)
        self.reference_samples = reference.samples
        self._lock = threading.Lock()
        self._since = 0
        self._seen = 0
        self._active: set[str] = set()
        self.scores: dict[str, FeatureScore] = {}
        # Bonferroni over the features and over the checks made while one window's worth of samples
        # passes (a sliding window is tested window / check_every times): alpha per window, in all.
        self.tests_per_window = max(1, len(self._slots)) * max(1, config.window // config.check_every)
        self._alpha = config.alpha / self.tests_per_window

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(w.name for _, w in self._slots)

    def add(self, values: Sequence[float]) -> None:
        """One prediction's feature values (in the extractor's order)."""
        with self._lock:
            for i, window in self._slots:
                window.add(values[i])
            self._seen += 1
            self._since += 1
            if self._since < self.config.check_every or not self._slots or \
                    self._slots[0][1].filled < self.config.window:
                return
            self._since = 0
            changes = self._check()
        for kind, name, score in changes:
            self._announce(kind, name, score)

    def _check(self) -> list[tuple[str, str, FeatureScore]]:
        changes = []
        n, m = self.config.window, self.reference_samples
        n_eff = n * m / (n + m)
        for _, w in self._slots:
            stat, df = homogeneity(w.ref_counts, w.counts)
            if df < 1:
                continue
            crit = chi2_critical(self._alpha, df)
            was = w.name in self._active
            if not was and stat > crit:
                self._active.add(w.name)
            elif was and stat < chi2_critical(self.config.clear_alpha, df):
                self._active.discard(w.name)
            now = w.name in self._active
            score = FeatureScore(stat, df, chi2_sf(stat, df) if now != was else -1.0, crit,
                                 psi(w.ref_counts, w.counts), crit / n_eff, now)
            self.scores[w.name] = score
            if now != was:
                changes.append(("drift" if now else "drift_cleared", w.name, score))
        return changes

    def _announce(self, kind: str, feature: str, s: FeatureScore) -> None:
        verb = "drifted from" if kind == "drift" else "is back to"
        self._emit(kind, model=self.model, version=self.version,
                   reason=f"{feature} {verb} the reference: chi-square {s.statistic:.1f} "
                          f"(critical {s.critical:.1f}, df {s.df}), PSI {s.psi:.3f} over {self.config.window} samples",
                   feature=feature, statistic="chi-square", value=round(s.statistic, 3),
                   threshold=round(s.critical, 3), p_value=float(f"{s.p_value:.3g}"), psi=round(s.psi, 4),
                   psi_threshold=round(s.psi_threshold, 4), window=self.config.window,
                   reference_samples=self.reference_samples)

    def snapshot(self) -> dict[str, Any]:
        """Per feature: score (statistic / critical), PSI and its threshold, in drift or not; plus counts."""
        with self._lock:
            scores = dict(self.scores)
            filled = self._slots[0][1].filled if self._slots else 0
            seen = self._seen
        return {
            "version": self.version, "samples": seen, "window": self.config.window, "filled": filled,
            "active": sorted(n for n, s in scores.items() if s.active),
            "features": {n: {"score": round(s.score, 4), "psi": round(s.psi, 4),
                             "psi_threshold": round(s.psi_threshold, 4), "active": s.active}
                         for n, s in sorted(scores.items())},
        }

"""The drift reference a bundle ships (``reference.json``, signed like every file).

``bundle pack --reference DIR`` runs representative inputs through the model
and stores, per feature (:mod:`edge_runtime.runtime.monitor_features` names
them), what the device compares its live window with:

- numeric features: a histogram over bins whose edges are the reference's own
  quantiles (so each bin holds about the same share), plus mean/std/min/max;
- categorical features (the top-1 class): the count of each frequent value and
  one "other" bin.

Bins holding under :data:`MIN_BIN_SHARE` of the reference are merged into a
neighbour: the chi-square test needs expected counts of about 5 or more in a
window, and a near-empty reference bin makes PSI explode on noise. The
``baseline`` is the accuracy (or detection precision/recall) the publisher
measured, which field accuracy is compared with on the device.

Format (JSON, at most :data:`MAX_REFERENCE_BYTES`)::

    {"format": "edge-runtime-reference/1", "samples": 400,
     "features": {"image.brightness": {"kind": "numeric", "edges": [..], "counts": [..],
                                       "mean": .., "std": .., "min": .., "max": ..},
                  "output.class": {"kind": "categorical", "values": [0, 1], "counts": [300, 90, 10]}},
     "baseline": {"accuracy": 0.93}}
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_runtime._util.strict_text import load_json
from edge_runtime.errors import ManifestError

__all__ = [
    "FORMAT",
    "MAX_REFERENCE_BYTES",
    "MIN_BIN_SHARE",
    "MIN_SAMPLES",
    "Baseline",
    "CategoricalFeature",
    "NumericFeature",
    "ReferenceStats",
    "build_reference",
    "parse_reference",
]

FORMAT = "edge-runtime-reference/1"
MAX_REFERENCE_BYTES = 256 << 10
MAX_FEATURES = 64
MAX_BINS = 64
MIN_SAMPLES = 50
"""Fewer reference inputs than this give bins too coarse to test against."""
MIN_BIN_SHARE = 0.05
DEFAULT_BINS = 10
_MAX_SAMPLES = 10**7
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._")


@dataclass(frozen=True)
class NumericFeature:
    """A histogram over ``len(edges) + 1`` bins: ``(-inf, e0), [e0, e1), ..., [e_last, inf)``."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]
    mean: float = 0.0
    std: float = 0.0
    min: float = 0.0
    max: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"kind": "numeric", "edges": list(self.edges), "counts": list(self.counts), "mean": self.mean,
                "std": self.std, "min": self.min, "max": self.max}


@dataclass(frozen=True)
class CategoricalFeature:
    """Counts of each value in ``values``, then of every other value (the last count)."""

    values: tuple[int, ...]
    counts: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"kind": "categorical", "values": list(self.values), "counts": list(self.counts)}


Feature = NumericFeature | CategoricalFeature


@dataclass(frozen=True)
class Baseline:
    """What the publisher measured on labelled data; None where not declared."""

    accuracy: float | None = None
    precision: float | None = None
    recall: float | None = None

    def to_json(self) -> dict[str, float]:
        return {k: v for k, v in (("accuracy", self.accuracy), ("precision", self.precision),
                                  ("recall", self.recall)) if v is not None}


@dataclass(frozen=True)
class ReferenceStats:
    """The parsed ``reference.json``."""

    samples: int
    features: Mapping[str, Feature]
    baseline: Baseline = field(default_factory=Baseline)

    def to_json(self) -> bytes:
        doc = {"format": FORMAT, "samples": self.samples,
               "features": {n: f.to_json() for n, f in self.features.items()}, "baseline": self.baseline.to_json()}
        data = json.dumps(doc, indent=1, sort_keys=True).encode()
        if len(data) > MAX_REFERENCE_BYTES:
            raise ManifestError(f"reference statistics are {len(data)} bytes, over the {MAX_REFERENCE_BYTES} cap")
        return data

    def summary(self) -> dict[str, Any]:
        """What ``bundle inspect`` shows: per feature its bins and summary, and the baseline."""
        shown: dict[str, Any] = {}
        for name, feat in self.features.items():
            if isinstance(feat, NumericFeature):
                shown[name] = {"bins": len(feat.counts), "mean": round(feat.mean, 4), "std": round(feat.std, 4),
                               "min": round(feat.min, 4), "max": round(feat.max, 4)}
            else:
                shown[name] = {"values": list(feat.values), "counts": list(feat.counts)}
        return {"samples": self.samples, "features": shown, "baseline": self.baseline.to_json()}


def parse_reference(data: bytes) -> ReferenceStats:
    """Strictly parse ``reference.json``.

    Raises:
        ManifestError: over the size cap, not strict JSON, an unknown format or
            key, too many features or bins, edges not increasing, counts that
            do not fit the bins or do not add up to ``samples``.
    """
    doc = load_json(data, "reference.json", error=ManifestError, max_bytes=MAX_REFERENCE_BYTES, max_depth=6)
    _keys(doc, {"format", "samples", "features", "baseline"}, "reference.json")
    if doc.get("format") != FORMAT:
        raise ManifestError(f"reference.json: format must be {FORMAT!r}, got {doc.get('format')!r}")
    samples = doc.get("samples")
    if not isinstance(samples, int) or isinstance(samples, bool) or not MIN_SAMPLES <= samples <= _MAX_SAMPLES:
        raise ManifestError(f"reference.json: samples must be an integer from {MIN_SAMPLES}, got {samples!r}")
    raw = doc.get("features")
    if not isinstance(raw, dict) or not 1 <= len(raw) <= MAX_FEATURES:
        raise ManifestError(f"reference.json: features must be an object of 1 to {MAX_FEATURES} features")
    features = {name: _feature(name, spec, samples) for name, spec in raw.items()}
    base = doc.get("baseline", {})
    _keys(base, {"accuracy", "precision", "recall"}, "reference.json baseline")
    for key, value in base.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
            raise ManifestError(f"reference.json: baseline.{key} must be a number in [0, 1], got {value!r}")
    return ReferenceStats(samples, features, Baseline(**{k: float(v) for k, v in base.items()}))


def _keys(doc: Any, allowed: set[str], what: str) -> None:
    if not isinstance(doc, dict):
        raise ManifestError(f"{what} must be a JSON object")
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise ManifestError(f"{what}: unknown key {unknown[0]!r}")


def _feature(name: str, spec: Any, samples: int) -> Feature:
    if not name or len(name) > 64 or not set(name) <= _NAME_CHARS:
        raise ManifestError(f"reference.json: feature name {name[:64]!r} is not [a-z0-9._], 1-64 characters")
    what = f"reference.json: feature {name!r}"
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "numeric":
        _keys(spec, {"kind", "edges", "counts", "mean", "std", "min", "max"}, what)
        edges = _numbers(spec.get("edges"), what + " edges", MAX_BINS - 1, integer=False)
        if any(b <= a for a, b in itertools.pairwise(edges)):
            raise ManifestError(f"{what}: edges must be strictly increasing")
        counts = _counts(spec.get("counts"), len(edges) + 1, samples, what)
        stats = {k: spec.get(k, 0.0) for k in ("mean", "std", "min", "max")}
        for k, v in stats.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ManifestError(f"{what}: {k} must be a number")
        return NumericFeature(tuple(float(e) for e in edges), counts,
                              **{k: float(v) for k, v in stats.items()})
    if kind == "categorical":
        _keys(spec, {"kind", "values", "counts"}, what)
        values = _numbers(spec.get("values"), what + " values", MAX_BINS - 1, integer=True)
        if len(set(values)) != len(values):
            raise ManifestError(f"{what}: values repeat")
        return CategoricalFeature(tuple(int(v) for v in values), _counts(spec.get("counts"), len(values) + 1,
                                                                          samples, what))
    raise ManifestError(f"{what}: kind must be 'numeric' or 'categorical'")


def _numbers(value: Any, what: str, cap: int, *, integer: bool) -> list[float]:
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if not isinstance(value, list) or len(value) > cap or not all(
            isinstance(v, kinds) and not isinstance(v, bool) for v in value):
        raise ManifestError(f"{what} must be a list of at most {cap} {'integers' if integer else 'numbers'}")
    return value


def _counts(value: Any, bins: int, samples: int, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) != bins or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in value):
        raise ManifestError(f"{what}: counts must be {bins} non-negative integers")
    if sum(value) != samples:
        raise ManifestError(f"{what}: counts add up to {sum(value)}, not samples = {samples}")
    return tuple(value)


# ---------------------------------------------------------------------- building (publisher side)


def build_reference(rows: Sequence[Mapping[str, float]], categorical: frozenset[str] = frozenset(),
                    baseline: Baseline | None = None, bins: int = DEFAULT_BINS) -> ReferenceStats:
    """Reference statistics from one feature row per representative input.

    Raises:
        ManifestError: fewer than :data:`MIN_SAMPLES` rows, rows with different
            features, or a non-finite value.
    """
    if len(rows) < MIN_SAMPLES:
        raise ManifestError(f"a drift reference needs at least {MIN_SAMPLES} inputs, got {len(rows)}")
    names = list(rows[0])
    if any(list(r) != names for r in rows):
        raise ManifestError("reference inputs gave different features (mixed image and tensor inputs?)")
    features: dict[str, Feature] = {}
    for name in names:
        values = np.asarray([r[name] for r in rows], dtype=np.float64)
        if not np.isfinite(values).all():
            raise ManifestError(f"reference feature {name!r} is not finite on some input")
        features[name] = _categorical(values) if name in categorical else _numeric(values, bins)
    return ReferenceStats(len(rows), features, baseline or Baseline())


def _numeric(values: Any, bins: int) -> NumericFeature:
    inner = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    # Edges on the minimum would leave an empty first bin: drop them.
    edges = [float(e) for e in inner if e > values.min()]
    counts = _bin_counts(values, edges)
    n = len(values)
    while len(counts) > 1 and min(counts) < MIN_BIN_SHARE * n:
        i = counts.index(min(counts))
        j = i - 1 if i == len(counts) - 1 or (i > 0 and counts[i - 1] < counts[i + 1]) else i + 1
        # Merge bins i and j: drop the edge between them.
        del edges[min(i, j)]
        counts = _bin_counts(values, edges)
    return NumericFeature(tuple(edges), tuple(counts), mean=float(values.mean()), std=float(values.std()),
                          min=float(values.min()), max=float(values.max()))


def _bin_counts(values: Any, edges: list[float]) -> list[int]:
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right")
    return [int(c) for c in np.bincount(idx, minlength=len(edges) + 1)]


def _categorical(values: Any) -> CategoricalFeature:
    n = len(values)
    ints, counts = np.unique(values.astype(np.int64), return_counts=True)
    order = np.argsort(-counts, kind="stable")
    kept = [int(ints[i]) for i in order if counts[i] >= MIN_BIN_SHARE * n][: MAX_BINS - 1]
    kept_counts = [int(counts[ints == v][0]) for v in kept]
    return CategoricalFeature(tuple(kept), (*kept_counts, n - sum(kept_counts)))


def bin_of(feature: Feature, value: float) -> int:
    """The bin ``value`` falls in (the live side uses its own faster lookup, the same rule)."""
    if isinstance(feature, NumericFeature):
        return bisect.bisect_right(feature.edges, value)
    v = int(value) if math.isfinite(value) else -1
    return feature.values.index(v) if v in feature.values else len(feature.values)

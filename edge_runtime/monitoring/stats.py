"""The few statistics drift and accuracy monitoring need, in the stdlib (no scipy on a Pi).

- :func:`chi2_sf`: the chi-square survival function P(X >= x) for ``df`` degrees
  of freedom, through the regularised upper incomplete gamma function Q(df/2, x/2)
  (series below a + 1, Lentz's continued fraction above; Numerical Recipes 6.2);
- :func:`chi2_critical`: the x with P(X >= x) = p, by bisection on :func:`chi2_sf` (cached);
- :func:`homogeneity`: the two-sample chi-square test of a live histogram
  against the reference's, and the PSI between them;
- :func:`wilson_bounds`: the Wilson score interval of a proportion.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

__all__ = ["chi2_critical", "chi2_sf", "homogeneity", "psi", "wilson_bounds"]

_EPS = 1e-15
_ITERATIONS = 500


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df); 1.0 for x <= 0 or df < 1."""
    if x <= 0 or df < 1:
        return 1.0
    a, z = df / 2.0, x / 2.0
    log_prefix = a * math.log(z) - z - math.lgamma(a)
    if z < a + 1:
        term = total = 1.0 / a
        for n in range(1, _ITERATIONS):
            term *= z / (a + n)
            total += term
            if abs(term) < abs(total) * _EPS:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    tiny = 1e-300
    b = z + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, _ITERATIONS):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return min(1.0, math.exp(log_prefix) * h)


@functools.lru_cache(maxsize=1024)
def chi2_critical(p: float, df: int) -> float:
    """The value a chi-square(df) statistic exceeds with probability ``p`` (0 < p < 1)."""
    lo, hi = 0.0, max(10.0, df * 10.0)
    while chi2_sf(hi, df) > p:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if chi2_sf(mid, df) > p:
            lo = mid
        else:
            hi = mid
    return hi


def psi(reference: Sequence[int], live: Sequence[int]) -> float:
    """Population stability index sum((l - r) * ln(l / r)) over bin shares, each count + 0.5 (no log 0)."""
    r_total = sum(reference) + 0.5 * len(reference)
    l_total = sum(live) + 0.5 * len(live)
    value = 0.0
    for r, n in zip(reference, live, strict=True):
        rs, ls = (r + 0.5) / r_total, (n + 0.5) / l_total
        value += (ls - rs) * math.log(ls / rs)
    return value


def homogeneity(reference: Sequence[int], live: Sequence[int]) -> tuple[float, int]:
    """(statistic, df) of the two-sample chi-square test that both histograms share one distribution.

    Bins empty in both are left out; df is the bins used minus one (Numerical Recipes ``chstwo``).
    """
    m, n = sum(reference), sum(live)
    if m == 0 or n == 0:
        return 0.0, 0
    a, b = math.sqrt(n / m), math.sqrt(m / n)
    stat, used = 0.0, 0
    for r, x in zip(reference, live, strict=True):
        if r + x == 0:
            continue
        used += 1
        diff = a * r - b * x
        stat += diff * diff / (r + x)
    return stat, used - 1


def wilson_bounds(successes: int, trials: int, z: float) -> tuple[float, float]:
    """The Wilson score interval (low, high) of ``successes / trials`` at ``z`` standard errors."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)

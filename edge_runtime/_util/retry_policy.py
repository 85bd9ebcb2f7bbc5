"""Shared policies for anything that retries or logs an address: backoff and URL redaction."""

from __future__ import annotations

import random
from typing import Protocol

__all__ = ["Uniform", "equal_jitter", "redact_url"]


class Uniform(Protocol):
    """A source of jitter (``random.Random`` or the ``random`` module)."""

    def uniform(self, a: float, b: float) -> float: ...


def equal_jitter(step: int, base: float, cap: float, rng: Uniform = random, floor: float = 0.0) -> float:  # type: ignore[assignment]
    """Capped exponential backoff with "equal jitter".

    Uniform in ``[max(floor, s/2), s]`` with ``s = min(cap, base * 2**step)``: devices
    that failed together spread out, yet every wait is at least half its step, so
    the delays still grow until the cap.
    """
    s = max(min(cap, base * 2.0 ** min(step, 64)), floor)
    return rng.uniform(max(floor, s / 2), s)


def redact_url(url: str) -> str:
    """``url`` safe to log: credentials become ``***@``, a query ``?***``, a fragment ``#***``.

    Everything before the last ``@`` of the address counts as credentials, so a
    password holding ``/`` or ``@`` (common in unescaped RTSP URLs) stays hidden.
    Never raises; non-printable characters become ``?`` (no log injection).
    """
    cut = min((i for i in (url.find("?"), url.find("#")) if i >= 0), default=len(url))
    head, tail = url[:cut], url[cut:]
    scheme, sep, rest = head.partition("://")
    if not sep:
        if "@" in head:
            return "<redacted URL>"  # no scheme, so no telling where credentials end
        scheme, rest = "", head
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    shown = "".join(c if c.isprintable() else "?" for c in f"{scheme}{sep}{rest}")
    return shown + (tail[0] + "***" if tail else "")

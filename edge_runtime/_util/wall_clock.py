"""Whether the wall clock can be believed: a Pi without an RTC boots in 1970, or at fake-hwclock's last save."""

from __future__ import annotations

__all__ = ["CLOCK_FLOOR"]

CLOCK_FLOOR = 1_767_225_600.0
"""2026-01-01 UTC, before this release was built: a device clock earlier than this is not set."""

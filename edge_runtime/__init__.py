"""edge-runtime: a hardened inference daemon for ARM/IoT devices."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]

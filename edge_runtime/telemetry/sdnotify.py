"""systemd notification protocol (sd_notify) without libsystemd.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET``; we send datagrams such
as ``READY=1``, ``STATUS=...``, ``WATCHDOG=1`` and ``STOPPING=1``. Outside
systemd every call is a no-op, so the daemon code never branches on it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

from edge_runtime._util.strict_text import parse_decimal
from edge_runtime.errors import ConfigError

__all__ = ["Notifier"]

_log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages to ``NOTIFY_SOCKET`` (abstract ``@`` names supported)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_seconds = _watchdog_seconds(env)

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; False when not under systemd or on error."""
        if not self._address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as e:
            _log.warning("sd_notify failed: %s", e.strerror or e)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping")


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """The watchdog period systemd asked for, if it is meant for this process."""
    usec, pid = _decimal(env.get("WATCHDOG_USEC", "")), _decimal(env.get("WATCHDOG_PID", ""))
    if not usec or (pid is not None and pid != os.getpid()):
        return None
    return usec / 1e6


def _decimal(text: str) -> int | None:
    """``text`` as ASCII digits, else None (str.isdigit() passes '²', which int() refuses)."""
    try:
        return parse_decimal(text, "value", max_digits=19, error=ConfigError)
    except ConfigError:
        return None

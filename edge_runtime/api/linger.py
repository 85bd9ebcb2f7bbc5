"""The lingering close of the inference API's connections (as nginx's).

Closing a socket with unread bytes makes the kernel send a reset that destroys
the reply on its way, so every close after a reply goes through :class:`Linger`:
the reply, FIN, then read and discard until the client's FIN, bounded in time
and bytes, and in the number of sockets held so.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import time

from edge_runtime.api.connection import LINGER, Conn, receive

__all__ = ["LINGER_SECONDS", "LINGER_SLOW_SECONDS", "Linger"]

LINGER_SECONDS = 5.0  # after a reply given before the body was read: the client may still be sending it
LINGER_SLOW_SECONDS = 0.5  # after cutting off a slow client: long enough to read its 408, no longer


class Linger:
    """The lingering connections of one intake; its selector thread alone calls it.

    At most ``max_sockets`` linger (a new one ends the oldest), each draining at
    most ``drain_bytes`` before it is closed.
    """

    def __init__(self, selector: selectors.BaseSelector, max_sockets: int, drain_bytes: int) -> None:
        self._selector = selector
        self._max_sockets = max_sockets
        self._drain_bytes = drain_bytes
        self.conns: dict[Conn, None] = {}  # insertion order = lingering longest first

    def start(self, conn: Conn, reply: bytes, seconds: float) -> float:
        """Send ``reply``, FIN, and drain until the client's FIN, ``seconds`` or the byte bound; the deadline."""
        conn.sock.setblocking(False)
        with contextlib.suppress(OSError):
            if reply:
                conn.sock.send(reply)  # a small reply fits the empty send buffer
            conn.sock.shutdown(socket.SHUT_WR)
        if len(self.conns) >= self._max_sockets:  # bound the sockets held this way too
            self.end(next(iter(self.conns)))
        conn.state, conn.deadline = LINGER, time.monotonic() + seconds
        conn.linger_left = self._drain_bytes  # a body declared over the cap still drains
        self.conns[conn] = None
        try:
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
        except (OSError, ValueError):  # already closed by the peer's reset
            self.end(conn)
        return conn.deadline

    def drain(self, conn: Conn) -> None:
        """``conn`` is readable: discard what arrived; close it at the client's FIN or the byte bound."""
        chunk = receive(conn)
        if chunk is None:
            return
        conn.linger_left -= len(chunk)
        if not chunk or conn.linger_left <= 0:
            self.end(conn)

    def end(self, conn: Conn) -> None:
        """Stop lingering on ``conn`` and close it."""
        self.conns.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()

    def expire(self, now: float) -> None:
        """Close the connections whose deadline has passed."""
        for conn in [c for c in self.conns if c.deadline <= now]:
            self.end(conn)

    def end_all(self) -> None:
        """Close every lingering connection (the intake is stopping)."""
        for conn in list(self.conns):
            self.end(conn)

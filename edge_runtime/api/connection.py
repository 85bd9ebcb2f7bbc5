"""One client connection of the inference API as the intake holds it, and what it reads of a request head.

:class:`Conn` carries the connection's state (one of :data:`IDLE`,
:data:`RECEIVING`, :data:`BUSY`, :data:`LINGER`), its buffer and its deadline;
:func:`refusal` builds the complete replies the intake sends by itself (408,
431, 503). The intake (:mod:`edge_runtime.api.intake`) moves connections
between the states.
"""

from __future__ import annotations

import socket
from email.utils import formatdate

from edge_runtime import __version__
from edge_runtime.api.codec import encode_error

__all__ = ["BUSY", "IDLE", "LINGER", "MAX_HEAD_BYTES", "RECEIVING", "RECV_BYTES", "Conn", "expects_continue",
           "head_fields", "receive", "refusal"]

MAX_HEAD_BYTES = 65536
"""Request line + headers of one request (tritonclient sends a few hundred bytes)."""
RECV_BYTES = 64 << 10
"""One ``recv`` from a client socket."""
_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}
IDLE, RECEIVING, BUSY, LINGER = "idle", "receiving", "busy", "linger"


def refusal(status: int, message: str, *, retry: bool = False) -> bytes:
    """A complete ``Connection: close`` reply with a one-line JSON error, as the handler writes them."""
    body = encode_error(message)
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nServer: edge-runtime/{__version__}\r\n"
            f"Date: {formatdate(usegmt=True)}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            + ("Retry-After: 1\r\n" if retry else "") + "Connection: close\r\n\r\n")
    return head.encode("iso-8859-1") + body


class Conn:
    """One client connection and what the intake knows of its current request."""

    __slots__ = ("body_end", "buffer", "deadline", "head_end", "linger_left", "peer", "scanned", "sock", "state")

    def __init__(self, sock: socket.socket, peer: object) -> None:
        self.sock, self.peer = sock, peer
        self.buffer = bytearray()
        self.state = IDLE
        self.deadline = 0.0
        self.scanned = 0  # the buffer has no head end before this offset
        self.head_end = self.body_end = -1
        self.linger_left = 0


def receive(conn: Conn) -> bytes | None:
    """One non-blocking ``recv`` on ``conn``: the bytes, ``b""`` once the client closed or reset, None: nothing yet."""
    try:
        return conn.sock.recv(RECV_BYTES)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def head_fields(head: bytes) -> tuple[str, list[str], bool]:
    """(HTTP version word, Content-Length values, Transfer-Encoding present) of a complete request head."""
    lines = head.decode("iso-8859-1").split("\n")
    words = lines[0].split()
    lengths: list[str] = []
    chunked = False
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        key = name.lower()
        if colon and key == "content-length":
            lengths.append(value.strip())
        elif colon and key == "transfer-encoding":
            chunked = True
    return (words[2] if len(words) == 3 else ""), lengths, chunked


def expects_continue(head: bytes) -> bool:
    """The head asks for ``Expect: 100-continue`` (the client waits for it before sending the body)."""
    return any(line.partition(b":")[0].lower() == b"expect" and line.partition(b":")[2].strip().lower()
               == b"100-continue" for line in head.split(b"\n")[1:])

"""The inference API's connection intake: one selector thread that owns every socket while it waits.

Slow clients must not starve the API (issue 9 §5): a thread per connection,
capped, lets a few dozen half-sent requests (slowloris) hold every thread and
the cap. So one thread (:class:`Intake`) accepts connections and reads request
heads and bodies non-blocking, each against a deadline, and hands only a
COMPLETE request (head + Content-Length bytes) to a worker thread
(:class:`~edge_runtime.api_workers.Workers`). A worker never waits for a
client's bytes, so slow clients cost a socket and a buffer, not a thread or an
inference slot. When ``max_connections`` are open, the connection that has been
receiving its request the longest is evicted (408), then the oldest idle
keep-alive one; a new connection is refused (503) only when every open one is
in a worker.

Closing a socket with unread bytes makes the kernel send a reset that destroys
the reply on its way, so every close after a reply goes through *linger*:
FIN, then read and discard until the client's FIN, bounded in time and bytes
(as nginx's lingering close; :mod:`edge_runtime.api.linger`). A connection's
state and the request-head scanning are :mod:`edge_runtime.api.connection`'s.

Idle CPU is a wake-up per :data:`~edge_runtime._util.progress.BEAT_SECONDS` (the
heartbeat liveness watches) or per deadline, whichever is sooner; no polling.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable

from edge_runtime._util.progress import BEAT_SECONDS, Heartbeat
from edge_runtime.api.connection import (
    BUSY,
    IDLE,
    LINGER,
    MAX_HEAD_BYTES,
    RECEIVING,
    RECV_BYTES,
    Conn,
    expects_continue,
    head_fields,
    receive,
    refusal,
)
from edge_runtime.api.linger import LINGER_SECONDS, LINGER_SLOW_SECONDS, Linger

__all__ = ["Intake"]

log = logging.getLogger("edge_runtime.api.server")

class Intake:
    """The selector thread: accepts on ``listener``, receives requests, gives complete ones to ``dispatch``.

    ``dispatch(conn, request_bytes)`` runs the request elsewhere and must
    call :meth:`give_back` once it is answered. Deadlines: ``idle_timeout``
    for the first byte of the next request on a keep-alive connection,
    ``request_timeout`` for the whole head and body from its first byte (plus
    a second per ``min_body_rate`` bytes declared, so a large body on a slow
    link still fits). ``max_request_bytes`` is the handler's body cap: a
    longer body is not read here (the handler answers 413), and at most four
    times that is buffered over all connections (then the largest gets a 503).
    """

    def __init__(self, listener: socket.socket, dispatch: Callable[[Conn, bytes], None], *,
                 max_connections: int, max_request_bytes: int, idle_timeout: float, request_timeout: float,
                 tcp_nodelay: bool, min_body_rate: int = 64 << 10) -> None:
        self.listener = listener
        self.dispatch = dispatch
        self.max_connections = max_connections
        self.max_request_bytes = max_request_bytes
        self.idle_timeout, self.request_timeout, self.min_body_rate = idle_timeout, request_timeout, min_body_rate
        self.tcp_nodelay = tcp_nodelay and listener.family in (socket.AF_INET, socket.AF_INET6)
        self.progress = Heartbeat()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._returned: collections.deque[tuple[Conn, bool, bool, bool]] = collections.deque()
        self._lock = threading.Lock()
        self._conns: set[Conn] = set()  # every open connection but lingering ones
        self._receiving: dict[Conn, None] = {}  # insertion order = oldest request first
        self._idle: dict[Conn, None] = {}  # insertion order = idle longest first
        self._lingering = Linger(self._selector, max_connections, 4 * max_request_bytes + RECV_BYTES)
        self._buffered = 0
        self._stopping = False
        self._ended = False
        self._next_sweep = 0.0
        self._accept_paused = self._accept_warned = False

    # ------------------------------------------------------------------ other threads

    def give_back(self, conn: Conn, keep_alive: bool, body_unread: bool) -> None:
        """From a worker: the request on ``conn`` is answered; keep it for the next one, or close it."""
        with self._lock:
            if not self._ended:
                if keep_alive and not conn.buffer and not self._stopping:
                    # The common case, without waking the intake: it takes the books over with the
                    # first event on this socket (appended before registered, so it is in the deque then).
                    conn.sock.setblocking(False)
                    self._returned.append((conn, True, False, True))
                    self._selector.register(conn.sock, selectors.EVENT_READ, conn)
                    return
                self._returned.append((conn, keep_alive, body_unread, False))
                self._wake()
                return
        with contextlib.suppress(OSError):  # the loop has ended (stopped): nobody else will close it
            conn.sock.close()

    def stop_accepting(self) -> None:
        """Close the listener and every connection not in a worker; workers' connections close when given back."""
        self._stopping = True
        self._wake()

    def busy_sockets(self) -> list[socket.socket]:
        """Sockets of the connections in a worker now (stop() cuts them off after its drain timeout)."""
        with self._lock:
            return [c.sock for c in self._conns if c.state == BUSY]

    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError: a wake-up is already pending
            self._wake_w.send(b"x")

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """The intake thread's loop; returns once stopped and every connection is closed."""
        self.listener.setblocking(False)
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not (self._stopping and not self._lingering.conns):
                self.progress.beat()
                timeout = max(0.0, min(BEAT_SECONDS, self._next_sweep - time.monotonic()))
                events = self._selector.select(timeout)
                self._take_returned()  # before the events: one may be on a connection just given back
                for key, _ in events:
                    if key.fileobj is self.listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    elif key.data.state != BUSY and key.data.sock.fileno() >= 0:  # not dropped in this batch
                        self._readable(key.data)
                self._take_returned()
                if self._stopping:
                    self._shut_down()
                if time.monotonic() >= self._next_sweep:
                    self._sweep()
                    if self._accept_paused and not self._stopping:
                        self._accept_paused = False
                        self._selector.register(self.listener, selectors.EVENT_READ)
        finally:
            with self._lock:
                self._ended = True
            for conn, *_ in self._returned:
                with contextlib.suppress(OSError):
                    conn.sock.close()
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _accept(self) -> None:
        for _ in range(64):  # a burst, without starving the connections already open
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: the connection stays in the backlog
                if not self._accept_warned:  # once per outage
                    log.warning("API: cannot accept connections (%s); pausing accepts", e.strerror or e)
                    self._accept_warned = True
                # The listener stays readable: without a pause this loop would spin. Retried at the next sweep.
                self._selector.unregister(self.listener)
                self._accept_paused = True
                return
            self._accept_warned = False
            self._accepted(sock, peer)

    def _accepted(self, sock: socket.socket, peer: object) -> None:
        sock.setblocking(False)
        if self.tcp_nodelay:  # a keep-alive client would wait ~40 ms per request for its delayed ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(sock, peer)
        if len(self._conns) >= self.max_connections and not self._evict():
            self._linger(conn, refusal(503, "too many connections; retry later", retry=True), LINGER_SLOW_SECONDS)
            return
        with self._lock:
            self._conns.add(conn)
        self._to_idle(conn)

    def _evict(self) -> bool:
        """Make room: cut off the longest-receiving request, else the longest-idle connection. False: none."""
        self._take_returned()  # a connection just given back is idle, so it can make room
        if self._receiving:
            victim = next(iter(self._receiving))
            self._drop(victim, refusal(408, "request not received in time (the server is full; slowest evicted)"))
            return True
        if self._idle:
            self._drop(next(iter(self._idle)), b"")
            return True
        return False

    # ------------------------------------------------------------------ connection states

    def _to_idle(self, conn: Conn, *, registered: bool = False) -> None:
        conn.state, conn.deadline = IDLE, time.monotonic() + self.idle_timeout
        conn.head_end = conn.body_end = -1
        conn.scanned = 0
        self._idle[conn] = None
        self._next_sweep = min(self._next_sweep, conn.deadline)
        if not registered:
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
        if conn.buffer:  # a pipelined request arrived with the last one
            self._parse(conn)

    def _leave(self, conn: Conn) -> None:
        """Take ``conn`` out of the idle/receiving books (not out of the selector)."""
        self._idle.pop(conn, None)
        self._receiving.pop(conn, None)

    def _readable(self, conn: Conn) -> None:
        if conn.state == LINGER:
            return self._lingering.drain(conn)
        chunk = receive(conn)
        if chunk is None:
            return
        if not chunk:  # the client closed (or reset): nobody to answer
            return self._drop(conn, None)
        conn.buffer += chunk
        self._buffered += len(chunk)
        self._parse(conn)
        while self._buffered > 4 * self.max_request_bytes + MAX_HEAD_BYTES and self._receiving:
            # Many large bodies arriving at once: the largest goes, so memory stays bounded.
            largest = max(self._receiving, key=lambda c: len(c.buffer))
            self._drop(largest, refusal(503, "too many request bodies arriving at once; retry later", retry=True))

    def _parse(self, conn: Conn) -> None:
        """Advance ``conn``'s request: find the head's end, then wait for the body; dispatch when complete."""
        if conn.state == IDLE:
            self._idle.pop(conn, None)
            conn.state, conn.deadline = RECEIVING, time.monotonic() + self.request_timeout
            self._receiving[conn] = None
            self._next_sweep = min(self._next_sweep, conn.deadline)
        if conn.head_end < 0:
            buf = conn.buffer
            ends = [i for i in (buf.find(b"\n\r\n", conn.scanned), buf.find(b"\n\n", conn.scanned)) if i >= 0]
            if not ends:
                if len(buf) > MAX_HEAD_BYTES:
                    return self._drop(conn, refusal(431, "request head too long"), LINGER_SECONDS)
                conn.scanned = max(0, len(buf) - 2)
                return
            end = min(ends)
            conn.head_end = end + (3 if buf[end + 1:end + 3] == b"\r\n" else 2)
            if conn.head_end > MAX_HEAD_BYTES:
                return self._drop(conn, refusal(431, "request head too long"), LINGER_SECONDS)
            conn.body_end = conn.head_end + self._body_length(conn, bytes(buf[:conn.head_end]))
        if len(conn.buffer) >= conn.body_end:
            self._dispatch(conn)

    def _body_length(self, conn: Conn, head: bytes) -> int:
        """Bytes of body to receive here: the Content-Length the handler will accept, else 0 (it refuses)."""
        version, lengths, chunked = head_fields(head)
        if chunked or len(lengths) != 1 or not (lengths[0].isascii() and lengths[0].isdigit()):
            return 0
        length = int(lengths[0])
        if length > self.max_request_bytes:
            return 0  # the handler answers 413 without it
        conn.deadline += length / self.min_body_rate
        if length and version == "HTTP/1.1" and len(conn.buffer) < conn.head_end + length and expects_continue(head):
            with contextlib.suppress(OSError):  # the client waits for this before it sends the body
                conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        return length

    def _dispatch(self, conn: Conn) -> None:
        self._receiving.pop(conn, None)
        self._selector.unregister(conn.sock)
        request, rest = bytes(conn.buffer[:conn.body_end]), conn.buffer[conn.body_end:]
        self._buffered -= len(request)
        conn.buffer = bytearray(rest)
        with self._lock:
            conn.state = BUSY
        conn.sock.settimeout(self.idle_timeout)  # the worker writes blocking, bounded per send
        self.dispatch(conn, request)

    def _take_returned(self) -> None:
        while self._returned:
            conn, keep_alive, body_unread, registered = self._returned.popleft()
            if keep_alive and not self._stopping:
                conn.sock.setblocking(False)
                with self._lock:
                    conn.state = IDLE
                self._to_idle(conn, registered=registered)
            else:
                if registered:
                    self._selector.unregister(conn.sock)
                with self._lock:
                    conn.state = IDLE  # not busy any more; _drop unregisters nothing it does not hold
                self._close(conn, b"", LINGER_SECONDS if body_unread else LINGER_SLOW_SECONDS)

    # ------------------------------------------------------------------ closing

    def _drop(self, conn: Conn, reply: bytes | None, linger: float = LINGER_SLOW_SECONDS) -> None:
        """Close a connection the intake holds: None = at once (the client is gone), else after ``reply``."""
        self._leave(conn)
        self._selector.unregister(conn.sock)
        self._close(conn, reply, linger)

    def _close(self, conn: Conn, reply: bytes | None, linger: float) -> None:
        self._buffered -= len(conn.buffer)
        conn.buffer = bytearray()
        with self._lock:
            self._conns.discard(conn)
        if reply is None or self._stopping:
            with contextlib.suppress(OSError):
                conn.sock.close()
            return
        self._linger(conn, reply, linger)

    def _linger(self, conn: Conn, reply: bytes, seconds: float) -> None:
        self._next_sweep = min(self._next_sweep, self._lingering.start(conn, reply, seconds))

    def _sweep(self) -> None:
        """Apply the deadlines: idle connections close, slow requests get 408, lingering ones close."""
        now = time.monotonic()
        for conn in [c for c in self._idle if c.deadline <= now]:
            self._drop(conn, b"", LINGER_SLOW_SECONDS)
        for conn in [c for c in self._receiving if c.deadline <= now]:
            what = "request head" if conn.head_end < 0 else "request body"
            self._drop(conn, refusal(408, f"{what} not received in time"))
        self._lingering.expire(now)
        deadlines = [c.deadline for d in (self._idle, self._receiving, self._lingering.conns) for c in d]
        # At most 20 sweeps a second however the deadlines spread: each one looks at every connection.
        self._next_sweep = max(min(deadlines, default=now + BEAT_SECONDS), now + 0.05)

    def _shut_down(self) -> None:
        if self.listener.fileno() >= 0:
            if not self._accept_paused:
                self._selector.unregister(self.listener)
            self.listener.close()
        for conn in list(self._idle) + list(self._receiving):
            self._drop(conn, None)
        self._lingering.end_all()

"""A process-wide byte budget for image decodes, so concurrent decodes cannot add up past the device's memory.

A pixel cap bounds one image; it does not bound eight of them decoding at
once (8 x 49 MP x 3 bytes is over a gigabyte). Every decode first reserves the
bytes its header says OpenCV will allocate (:func:`edge_runtime.runtime.preprocess.decode_cost`)
from one :class:`DecodeBudget` shared by the API, MQTT input, folder sources,
``run`` and the gates, and gives them back when the decoded image is released.

A reservation larger than the whole budget can never succeed: InputError (400).
One that does not fit within ``wait_seconds`` is BusyError (503 + Retry-After
on the API; the pipelines count it as a failed item).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from edge_runtime.errors import BusyError, InputError

__all__ = ["DEFAULT_WAIT_SECONDS", "DecodeBudget", "shared_budget"]

DEFAULT_WAIT_SECONDS = 5.0  # beyond this a client is better told to retry than kept waiting


class DecodeBudget:
    """A counting semaphore of bytes: ``reserve(n)`` blocks until ``n`` bytes are free (bounded wait).

    ``reserved`` is what is held now and ``peak`` the most ever held at once
    (tests and tools/bench_decode.py read it). Thread-safe.
    """

    def __init__(self, capacity: int, wait_seconds: float = DEFAULT_WAIT_SECONDS) -> None:
        self._cond = threading.Condition()
        self._capacity = capacity
        self.wait_seconds = wait_seconds
        self.reserved = 0
        self.peak = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    def resize(self, capacity: int) -> None:
        """Set the capacity (the config's value); reservations already held stay held."""
        with self._cond:
            self._capacity = capacity
            self._cond.notify_all()

    @contextlib.contextmanager
    def reserve(self, nbytes: int, what: str) -> Iterator[None]:
        """Hold ``nbytes`` of the budget for the ``with`` block.

        Raises:
            InputError: ``nbytes`` is more than the whole budget (retrying cannot help).
            BusyError: the bytes did not become free within ``wait_seconds``.
        """
        with self._cond:
            if nbytes > self._capacity:
                raise InputError(f"{what} needs {nbytes} bytes to decode, more than the whole "
                                 f"{self._capacity}-byte decode budget (limits.max_decode_bytes)")
            deadline = time.monotonic() + self.wait_seconds
            while self.reserved + nbytes > self._capacity:
                left = deadline - time.monotonic()
                if left <= 0 or nbytes > self._capacity:  # capacity may have shrunk while waiting
                    raise BusyError(f"busy: {what} waited {self.wait_seconds:g} s for {nbytes} bytes of the "
                                    f"{self._capacity}-byte decode budget (limits.max_decode_bytes); retry later")
                self._cond.wait(left)
            self.reserved += nbytes
            self.peak = max(self.peak, self.reserved)
        try:
            yield
        finally:
            with self._cond:
                self.reserved -= nbytes
                self._cond.notify_all()


_shared: DecodeBudget | None = None
_shared_lock = threading.Lock()


def shared_budget(capacity: int) -> DecodeBudget:
    """The process's one budget, sized ``capacity`` (``limits.max_decode_bytes``; the config is process-wide)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = DecodeBudget(capacity)
        elif _shared.capacity != capacity:
            _shared.resize(capacity)
        return _shared

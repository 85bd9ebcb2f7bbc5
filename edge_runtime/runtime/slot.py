"""A hot-swappable handle on the model serving one name.

Callers borrow the current model with ``with slot.use() as model:``. A swap
publishes the new model at once (new requests go to it), then waits until
every request that borrowed the old one has returned before closing it, so no
request in flight ever sees a closed runtime.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from edge_runtime.errors import ModelNotLoadedError
from edge_runtime.runtime.loaded_model import LoadedModel

__all__ = ["ModelSlot"]


@dataclass
class _Lease:
    model: LoadedModel
    in_flight: int = 0


class ModelSlot:
    """Holds the :class:`LoadedModel` serving one model name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._cond = threading.Condition()
        self._current: _Lease | None = None

    @property
    def version(self) -> int | None:
        """The version serving now (None before the first swap)."""
        lease = self._current
        return None if lease is None else lease.model.version

    @property
    def model(self) -> LoadedModel | None:
        """The serving model, for metadata only: use :meth:`use` to run it."""
        lease = self._current
        return None if lease is None else lease.model

    @contextlib.contextmanager
    def use(self) -> Iterator[LoadedModel]:
        """Borrow the serving model for one request.

        Raises:
            ModelNotLoadedError: no version of this model is loaded yet (or any more).
        """
        with self._cond:
            lease = self._current
            if lease is None:
                raise ModelNotLoadedError(self.name)
            lease.in_flight += 1
        try:
            yield lease.model
        finally:
            with self._cond:
                lease.in_flight -= 1
                if lease.in_flight == 0:
                    self._cond.notify_all()

    def swap(self, new: LoadedModel | None, drain_timeout: float = 60.0) -> LoadedModel | None:
        """Serve ``new`` from now on; drain and close the old model.

        Returns the old model (already closed) or None. If requests on the old
        model do not finish within ``drain_timeout`` seconds, it is left open
        (for the garbage collector) rather than closed under a running call.
        """
        with self._cond:
            old = self._current
            self._current = None if new is None else _Lease(new)
            if old is None:
                return None
            drained = self._cond.wait_for(lambda: old.in_flight == 0, timeout=drain_timeout)
        if drained:
            old.model.close()
        return old.model

    def close(self) -> None:
        """Stop serving and release the model once in-flight requests finish."""
        self.swap(None)

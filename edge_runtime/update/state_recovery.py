"""Rebuild a corrupt or deleted ``state.json`` from what the state dir still proves.

:mod:`~edge_runtime.cache.state` refuses a state file it cannot parse rather
than reset it: a reset would drop the anti-rollback floors and the channel
sequence and so re-open replay of older, still unexpired channel documents.
Refusing alone kept ``serve`` from starting at all, so serve and every CLI
command call :func:`recover_state` first, which rebuilds what can be proven:

- the anti-rollback floor of each model: its highest version under ``models/``;
- the channel sequence: from the last accepted channel document, kept beside
  the state file (``channel.last``, see :func:`keep_channel_document`) and
  re-verified now against the trusted keys, so a planted file cannot raise or
  lower it.

What cannot be proven is lost and said so (:data:`LOST`). The corrupt file is
kept as ``state.json.corrupt-<UTC time>`` (0600) for forensics.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime._util.fsutil import CLOEXEC, NOFOLLOW, atomic_write, fsync_dir, read_capped
from edge_runtime._util.strict_text import load_json
from edge_runtime.cache.state import MAX_STATE_BYTES, STATE_FILE, ModelState, State, decode_state
from edge_runtime.cache.versions import ModelCache
from edge_runtime.errors import CacheError, EdgeRuntimeError
from edge_runtime.update.channel import verified_sequence

__all__ = ["KEPT_CHANNEL_FILE", "LOST", "StateRecovery", "keep_channel_document", "recover_state"]

KEPT_CHANNEL_FILE = "channel.last"
#: What a rebuilt state file cannot know: recorded nowhere else.
LOST = ("pinned versions", "probation records and their boot attempts", "the boot count",
        "failed-version marks")
_MAX_KEPT = 4 << 20  # two base64 documents, each under the channel cap
_log = logging.getLogger(__name__)

Trusted = Callable[[], Mapping[str, Ed25519PublicKey]]


@dataclass(frozen=True)
class StateRecovery:
    """What :func:`recover_state` did: why, what it rebuilt, what is lost, where the old file went."""

    problem: str
    floors: Mapping[str, int]
    channel_sequence: int
    sequence_note: str
    corrupt_copy: Path | None

    def one_line(self) -> str:
        """The warning shown to the operator and sent as the ``state_recovered`` event's reason."""
        floors = ", ".join(f"{n} v{v}" for n, v in sorted(self.floors.items())) or "none"
        kept = f"; the corrupt file is kept as {self.corrupt_copy.name}" if self.corrupt_copy else ""
        return (f"state file rebuilt ({self.problem}): recovered anti-rollback floors from models/ ({floors}) "
                f"and channel sequence {self.channel_sequence} ({self.sequence_note}); "
                f"lost: {', '.join(LOST)}{kept}")


def keep_channel_document(state_dir: Path, document: bytes, signature: bytes) -> None:
    """Keep the last accepted channel document and its signature (one file, 0600) for :func:`recover_state`.

    Not rewritten when unchanged (every poll would wear the flash). A failed
    write is logged, not raised: it only weakens a later recovery, and must
    not stop the update that follows.
    """
    path = state_dir / KEPT_CHANNEL_FILE
    data = json.dumps({"document": base64.b64encode(document).decode(),
                       "signature": base64.b64encode(signature).decode()}, sort_keys=True).encode()
    try:
        with contextlib.suppress(FileNotFoundError):
            if read_capped(path, _MAX_KEPT) == data:
                return
        atomic_write(path, data)
    except OSError as e:
        _log.warning("cannot keep the channel document in %s: %s", path, e.strerror or e)


def recover_state(cache: ModelCache, trusted: Trusted, threshold: int) -> StateRecovery | None:
    """Rebuild ``state.json`` if it is corrupt, or missing on a device that has been used; else None.

    A missing file on a fresh device (no installed version, no kept channel
    document) is left alone. Runs under the state lock, so of a daemon and CLI
    processes starting together exactly one rebuilds.

    Raises:
        CacheError: the state file cannot be read for another reason than
            corruption (permissions, I/O error, a symlink), or the new file
            cannot be written.
    """
    state = cache.state
    with state.locked():
        data: bytes | None = None
        try:
            data = read_capped(state.path, MAX_STATE_BYTES)
            decode_state(data, STATE_FILE)
            return None
        except FileNotFoundError:
            pass
        except CacheError as e:
            problem = e.one_line()
        except OSError as e:
            if e.errno != errno.EFBIG:
                raise CacheError(f"{state.path}: cannot read state file: {e.strerror or e}") from e
            data, problem = b"", f"{STATE_FILE} is over {MAX_STATE_BYTES} bytes"
        kept = state.state_dir / KEPT_CHANNEL_FILE
        floors = {n: max(cache.versions(n)) for n in cache.names() if cache.versions(n)}
        if data is None:
            if not floors and not os.path.lexists(kept):
                return None  # a fresh device
            problem = f"{STATE_FILE} is missing"
        sequence, note = _kept_sequence(kept, trusted, threshold)
        new = State(models={n: ModelState(highest=v) for n, v in floors.items()}, channel_sequence=sequence)
        try:
            aside = _set_aside(state.path) if data is not None else None
            atomic_write(state.path, new.to_json())
        except OSError as e:
            raise CacheError(f"{state.path}: cannot rebuild the state file: {e.strerror or e}") from e
    return StateRecovery(problem, floors, sequence, note, aside)


def _kept_sequence(path: Path, trusted: Trusted, threshold: int) -> tuple[int, str]:
    """(sequence, how it was found) from the kept channel document; (0, why not) if it cannot be proven."""
    try:
        raw = read_capped(path, _MAX_KEPT)
    except FileNotFoundError:
        return 0, "no channel document was kept"
    except OSError as e:
        return 0, f"kept channel document unreadable: {e.strerror or e}"
    try:
        doc = load_json(raw, "kept channel document", error=CacheError)
        if not isinstance(doc, dict) or set(doc) != {"document", "signature"}:
            raise ValueError("not a kept channel document")
        document = base64.b64decode(doc["document"], validate=True)
        signature = base64.b64decode(doc["signature"], validate=True)
    except CacheError as e:
        return 0, f"kept channel document is corrupt: {e.one_line()}"
    except (ValueError, TypeError, binascii.Error) as e:
        return 0, f"kept channel document is corrupt: {e}"
    try:
        sequence = verified_sequence(document, signature, trusted=trusted(), threshold=threshold)
    except EdgeRuntimeError as e:
        return 0, f"kept channel document does not verify: {e.one_line()}"
    return sequence, "from the kept channel document, signature verified"


def _set_aside(path: Path) -> Path:
    """Rename the corrupt file to ``<name>.corrupt-<UTC time>`` (0600, a free name) and return it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(1000):
        aside = path.with_name(f"{path.name}.corrupt-{stamp}" + (f"-{n}" if n else ""))
        if not os.path.lexists(aside):
            break
    path.rename(aside)
    fd = os.open(aside, os.O_RDONLY | NOFOLLOW | CLOEXEC)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return aside

"""Issue 8 §4: every spooled seq is stored or counted, when the disk is full or the file is deleted.

The disk-full cases run on a real, small tmpfs (needs root to mount; skipped otherwise).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.spool import Spool


@contextlib.contextmanager
def small_fs(where: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``where`` (skips the test when mounting is not allowed)."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(fs: Path) -> Path:
    """Write a file until the file system is full; returns it (delete it to free the space)."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return filler


def covered(spool: Spool) -> set[int]:
    seqs = {m.seq for m in spool.peek(100_000)}
    for first, last in spool.dropped_ranges():
        seqs |= set(range(first, last + 1))
    return seqs


def body(seq: int) -> bytes:
    return json.dumps({"seq": seq, "pad": "x" * 2000}).encode()


def test_disk_full_appends_use_their_seq_and_are_counted_then_persisted(tmp_path: Path) -> None:
    with small_fs(tmp_path / "fs", "4m") as fs:
        path = fs / "spool" / "spool.db"
        spool = Spool(path, max_messages=100_000, max_bytes=1 << 30)
        stored = [spool.append("edge/d/telemetry", body) for _ in range(5)]
        filler = fill(fs)
        failures = []
        for _ in range(300):
            try:
                stored.append(spool.append("edge/d/telemetry", body))
            except EdgeRuntimeError as e:
                failures.append(e.one_line())
        assert failures and "full" in failures[-1], failures[-1:]
        assert spool.dropped == len(failures)
        next_seq = spool.stats()["next_seq"]
        assert next_seq == 306  # every attempt used a seq
        assert covered(spool) == set(range(1, next_seq)), "every seq is stored or listed as dropped"
        assert spool.take_lost() == []  # not in the file yet
        os.unlink(filler)
        after = spool.append("edge/d/events", body)
        assert after == next_seq
        lost = spool.take_lost()
        assert sum(b - a + 1 for a, b, _ in lost) == len(failures) and "full" in lost[0][2], lost
        assert spool.take_lost() == []
        spool.close()
        with Spool(path, max_messages=100_000, max_bytes=1 << 30) as again:
            assert again.dropped == len(failures)
            assert covered(again) == set(range(1, after + 1))
            assert again.append("edge/d/events", body) == after + 1


def test_spool_file_deleted_while_open_keeps_its_messages(tmp_path: Path) -> None:
    path = tmp_path / "spool" / "spool.db"
    with Spool(path, max_messages=1000, max_bytes=1 << 24) as spool:
        first = [spool.append("t", body) for _ in range(20)]
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}{suffix}")
        later = [spool.append("t", body) for _ in range(20)]
        assert later == list(range(21, 41)) and path.exists()
        assert [m.seq for m in spool.peek(100)] == first + later
    with Spool(path, max_messages=1000, max_bytes=1 << 24) as again:
        assert [m.seq for m in again.peek(100)] == list(range(1, 41)) and again.dropped == 0
        assert again.append("t", body) == 41


def test_spool_file_replaced_while_open_is_set_aside_and_messages_kept(tmp_path: Path) -> None:
    path = tmp_path / "spool" / "spool.db"
    with Spool(path, max_messages=1000, max_bytes=1 << 24) as spool:
        [spool.append("t", body) for _ in range(5)]
        os.unlink(path)
        path.write_bytes(b"not a database")
        assert spool.append("t", body) == 6
        assert [m.seq for m in spool.peek(100)] == list(range(1, 7))
    assert list(path.parent.glob("spool.db.corrupt-*")), "the foreign file is kept for a post-mortem"

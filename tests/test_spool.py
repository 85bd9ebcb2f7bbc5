"""Spool: order, seq across reopen, bounds, kill -9 durability, corruption recovery, threads."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_runtime.errors import EdgeRuntimeError, InputError
from edge_runtime.mqtt.spool import SEQ_RESERVE, Spool

CHILD = Path(__file__).with_name("spool_child.py")


def payload(seq: int) -> bytes:
    return json.dumps({"seq": seq}).encode()


def open_spool(path: Path, **kw: int) -> Spool:
    return Spool(path, max_messages=kw.get("max_messages", 10_000), max_bytes=kw.get("max_bytes", 1 << 24))


@pytest.fixture()
def db(tmp_path: Path) -> Path:
    return tmp_path / "spool" / "spool.db"


def test_fifo_order_payload_carries_its_seq(db: Path) -> None:
    with open_spool(db) as spool:
        seqs = [spool.append(f"edge/d/{'events' if i % 3 else 'telemetry'}", payload) for i in range(50)]
        assert seqs == list(range(1, 51))
        got = spool.peek(100)
        assert [m.seq for m in got] == seqs
        assert all(json.loads(m.payload)["seq"] == m.seq for m in got)
        assert got[0].topic == "edge/d/telemetry" and got[1].topic == "edge/d/events"
        assert spool.pending == 50
        assert spool.pending_bytes == sum(len(m.payload) + len(m.topic) for m in got)
        assert [m.seq for m in spool.peek(5, after=10)] == [11, 12, 13, 14, 15]


def test_qos_is_stored(db: Path) -> None:
    with open_spool(db) as spool:
        spool.append("t", payload, qos=0)
        spool.append("t", payload, qos=1)
        assert [m.qos for m in spool.peek(10)] == [0, 1]
        with pytest.raises(ValueError):
            spool.append("t", payload, qos=3)


def test_ack_up_to_and_exact(db: Path) -> None:
    with open_spool(db) as spool:
        for _ in range(10):
            spool.append("t", payload)
        assert spool.ack(4) == 4
        assert spool.ack([6, 8, 8, 99]) == 2
        assert spool.ack([]) == 0
        assert [m.seq for m in spool.peek(100)] == [5, 7, 9, 10]
        assert spool.pending == 4
        assert spool.pending_bytes == sum(len(m.payload) + 1 for m in spool.peek(100))
        assert spool.ack(100) == 4
        assert (spool.pending, spool.pending_bytes, spool.peek(10)) == (0, 0, [])


def test_seq_monotonic_across_reopen_even_when_empty(db: Path) -> None:
    with open_spool(db) as spool:
        for _ in range(7):
            spool.append("t", payload)
        spool.ack(7)  # every row deleted: the seq must still not restart
    with open_spool(db) as spool:
        assert spool.pending == 0
        assert spool.append("t", payload) == 8
        assert json.loads(spool.peek(1)[0].payload)["seq"] == 8


def test_build_failure_consumes_nothing(db: Path) -> None:
    def boom(seq: int) -> bytes:
        raise RuntimeError("bad payload")

    with open_spool(db) as spool:
        spool.append("t", payload)
        with pytest.raises(RuntimeError):
            spool.append("t", boom)
        assert spool.append("t", payload) == 2
        assert spool.pending == 2


def test_bound_by_count_drops_oldest_and_counter_survives_reopen(db: Path) -> None:
    with open_spool(db, max_messages=10) as spool:
        for _ in range(25):
            spool.append("t", payload)
        assert spool.pending == 10
        assert [m.seq for m in spool.peek(100)] == list(range(16, 26))
        assert spool.dropped == 15
        assert spool.dropped_ranges() == [(1, 15)]
    with open_spool(db, max_messages=10) as spool:
        assert (spool.pending, spool.dropped, spool.dropped_ranges()) == (10, 15, [(1, 15)])
        spool.ack(20)
        for _ in range(3):
            spool.append("t", payload)  # 8 pending: no drop
        assert spool.dropped == 15
        for _ in range(4):
            spool.append("t", payload)  # 26..32 appended, 21 and 22 dropped
        assert spool.dropped == 17
        assert spool.dropped_ranges() == [(1, 15), (21, 22)]
        assert spool.stats()["dropped_ranges"] == [[1, 15], [21, 22]]


def test_bound_by_bytes_drops_oldest(db: Path) -> None:
    with open_spool(db, max_bytes=1000) as spool:
        for _ in range(30):
            spool.append("t", lambda s: b"x" * 99)  # 100 bytes with the topic
        assert spool.pending_bytes <= 1000
        assert spool.pending == 10
        assert [m.seq for m in spool.peek(100)] == list(range(21, 31))
        spool.append("t", lambda s: b"y" * 449)  # needs 5 slots freed
        assert spool.peek(1)[0].seq == 26
        assert spool.dropped == 25
        assert spool.dropped_ranges() == [(1, 25)]


def test_message_over_the_bound_is_refused_and_accounted(db: Path) -> None:
    with open_spool(db, max_bytes=100) as spool:
        spool.append("t", payload)
        with pytest.raises(InputError):
            spool.append("t", lambda s: b"z" * 200)
        assert [m.seq for m in spool.peek(10)] == [1]
        assert (spool.dropped, spool.dropped_ranges()) == (1, [(2, 2)])
    with open_spool(db, max_bytes=100) as spool:
        assert spool.append("t", payload) == 3  # seq 2 is gone for good, never reused


def test_file_and_dir_modes(db: Path) -> None:
    with open_spool(db) as spool:
        spool.append("t", payload)
        for path in (db, Path(f"{db}-wal")):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
        assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_symlink_at_path_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.db"
    target.write_bytes(b"")
    link = tmp_path / "spool.db"
    link.symlink_to(target)
    with pytest.raises(EdgeRuntimeError):
        open_spool(link)


def test_closed_spool_raises(db: Path) -> None:
    spool = open_spool(db)
    spool.close()
    with pytest.raises(EdgeRuntimeError):
        spool.append("t", payload)


# ------------------------------------------------------------------ kill -9


def _run_and_kill(db: Path, rng: random.Random) -> list[int]:
    """Start the child, SIGKILL it after a random number of appends; return the seqs it printed."""
    proc = subprocess.Popen([sys.executable, str(CHILD), str(db), "1000000"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    target = rng.randint(1, 400)
    lines = []
    deadline = time.monotonic() + 20
    while len(lines) < target and time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, f"child exited early: rc={proc.poll()}"
        lines.append(line)
    time.sleep(rng.random() * 0.01)  # land somewhere inside a later append
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    rest = proc.stdout.read()
    proc.stdout.close()
    complete = b"".join(lines) + rest
    return [int(x) for x in complete.split(b"\n")[:-1]]  # a torn last line is not a returned append


def test_every_returned_append_survives_kill_9(db: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "big")  # random kill points; the seed is in every failure message
    rng = random.Random(seed)
    seen: list[int] = []
    for _ in range(5):
        printed = _run_and_kill(db, rng)
        assert printed, f"the child printed nothing (seed {seed})"
        assert printed == sorted(set(printed)), f"seqs not strictly increasing (seed {seed})"
        assert not seen or printed[0] > seen[-1], f"a seq was reused after a restart (seed {seed})"
        seen += printed
        with open_spool(db, max_messages=1_000_000) as spool:
            stored = {m.seq: m.payload for m in spool.peek(10_000_000)}
            missing = [s for s in seen if s not in stored]
            assert not missing, f"{len(missing)} returned appends lost, first {missing[:5]} (seed {seed})"
            assert all(json.loads(stored[s])["seq"] == s for s in seen)
            assert list(stored) == sorted(stored)
            assert spool.pending == len(stored)


# ------------------------------------------------------------------ corruption


def test_garbage_file_is_moved_aside_and_recreated(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    db.parent.mkdir(mode=0o700)
    db.write_bytes(b"this is not sqlite" * 500)
    with caplog.at_level(logging.WARNING, logger="edge_runtime.mqtt.spool"), open_spool(db) as spool:
        assert spool.append("t", payload) == 1
        assert [m.seq for m in spool.peek(5)] == [1]
    assert "moved aside" in caplog.text
    aside = list(db.parent.glob("spool.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not sqlite")


def _fill_and_corrupt(db: Path, n: int) -> None:
    with open_spool(db, max_messages=100_000) as spool:
        for _ in range(n):
            spool.append("t", lambda s: json.dumps({"seq": s, "pad": "p" * 400}).encode())
    with open(db, "r+b") as fh:  # overwrite b-tree pages in the middle of the file
        fh.seek(4096 * 40)
        fh.write(b"\xab" * 4096 * 10)


def test_damaged_pages_at_open_keep_seqs_and_count_the_loss(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    _fill_and_corrupt(db, 3000)
    with caplog.at_level(logging.WARNING, logger="edge_runtime.mqtt.spool"), \
            open_spool(db, max_messages=100_000) as spool:
        assert "moved aside" in caplog.text
        assert spool.pending == 0
        seq = spool.append("t", payload)
        assert seq > 3000, "numbering restarted after recovery: subscribers would drop new messages as duplicates"
        assert seq <= 3000 + SEQ_RESERVE + 1
        assert spool.dropped >= 3000 - 1  # what the damaged file held is reported as lost
        assert spool.dropped_ranges()[-1][1] == 3000


def test_damage_found_while_running_recovers_without_raising(db: Path) -> None:
    spool = open_spool(db, max_messages=100_000)
    for _ in range(20_000):  # ~10 MB: more than sqlite's page cache, so reads hit the file
        spool.append("t", lambda s: b"q" * 500)
    assert spool._conn is not None
    spool._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(db, "r+b") as fh:
        fh.seek(4096 * 100)
        fh.write(b"\xab" * 4096 * 20)
    assert spool.peek(100_000) == []  # recovered: the damaged backlog is gone, not an exception
    assert spool.dropped == 20_000
    assert spool.dropped_ranges() == [(1, 20_000)]
    assert spool.append("t", payload) == 20_001
    assert [m.seq for m in spool.peek(10)] == [20_001]
    spool.close()


# ------------------------------------------------------------------ threads


def test_four_threads_append_concurrently(db: Path) -> None:
    spool = open_spool(db, max_messages=100_000)
    results: list[list[int]] = [[] for _ in range(4)]
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for _ in range(400):
                results[k].append(spool.append(f"t/{k}", payload))
                if len(results[k]) % 50 == 0:
                    spool.peek(10)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    for seqs in results:
        assert seqs == sorted(seqs)
    every = sorted(s for seqs in results for s in seqs)
    assert every == list(range(1, 1601))
    stored = spool.peek(10_000)
    assert [m.seq for m in stored] == every
    assert all(json.loads(m.payload)["seq"] == m.seq for m in stored)
    spool.close()

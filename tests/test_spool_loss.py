"""Issue 8 §4: every spooled seq is stored or counted, when the disk is full or the file is deleted.

The disk-full cases run on a real, small tmpfs (needs root to mount; skipped otherwise).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import cli
from daemon_helpers import Serve, pack_onnx, wait_for, write_config
from mqtt_broker import Broker, mosquitto_binary

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.mqtt.spool import Spool


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


FILL_CAP = 64 << 20  # never write more than this, whatever the file system says


def fill(fs: Path) -> Path:
    """Write a file until the small test file system at ``fs`` is full; returns it (delete it to free the space).

    Refuses unless ``fs`` is a mount point of a file system under ``FILL_CAP`` (so a tmpfs
    unmounted under the test can never make it fill the real disk), and stops at ``FILL_CAP``
    written regardless.
    """
    st = os.statvfs(fs)
    size = st.f_blocks * st.f_frsize
    if not os.path.ismount(fs) or size >= FILL_CAP:
        raise AssertionError(f"refusing to fill {fs}: not a small test file system (mount point "
                             f"{os.path.ismount(fs)}, {size} bytes)")
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    written = 0
    try:
        while written < FILL_CAP:
            written += os.write(fd, b"\0" * 4096)
        raise AssertionError(f"{fs} took {written} bytes without filling up: not the small file system")
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return filler


def test_fill_refuses_anything_but_a_small_mounted_file_system(tmp_path: Path) -> None:
    # The helper's own guard: a tmpfs unmounted under a test once made it fill the real disk.
    with pytest.raises(AssertionError, match="refusing to fill"):
        fill(tmp_path)
    assert not (tmp_path / "filler").exists()


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


# ------------------------------------------------------------------ the real daemon, broker away

Zoo = Callable[[str], Path]


@contextlib.contextmanager
def _outage_rig(tmp_path: Path, keys: dict[str, Path], zoo: Zoo,
                state_fs: str | None) -> Iterator[tuple[Broker, Serve, Any]]:
    """A daemon with telemetry flowing to a persistent subscriber, then the broker killed.

    Everything it starts is stopped on exit, newest first: the daemon is gone before its
    small file system is unmounted, and the mount lives exactly as long as this block.
    """
    from test_mqtt_daemon import TOP, Watcher, mqtt_config

    with contextlib.ExitStack() as stack:
        root = tmp_path / "device"
        if state_fs is not None:  # the state dir (spool included) on its own small file system
            stack.enter_context(small_fs(root / "state", state_fs))
        broker = Broker(tmp_path / "broker", persistence=True, max_queued_messages=100_000).start()
        stack.callback(broker.stop)
        config, state, port = write_config(root, keys["trust_dir"], top=TOP,
                                           extra=mqtt_config(broker, "telemetry_seconds = 0.05\n"))
        cli("models", "install", pack_onnx(tmp_path / "v1.bundle", zoo("ppocr_cls"), 1, keys["a"], tmp_path),
            "--config", config)
        serve = Serve(config, state, port).start()
        stack.callback(lambda: serve.kill9() if serve.proc and serve.proc.poll() is None else None)
        watcher = Watcher(broker, "edge/dev1/telemetry", "edge/dev1/events", persistent=True)
        stack.callback(watcher.close)
        wait_for(lambda: len(watcher.seqs()) > 5, 30, "telemetry flowing")
        time.sleep(1.5)  # the broker autosaves every second: the watcher's subscription is on disk
        broker.kill()
        yield broker, serve, watcher


def _explained(watcher: Any) -> tuple[set[int], set[int]]:
    """(seqs received, seqs the device said it dropped: telemetry's ranges and messages_dropped events)."""
    dropped: set[int] = set()
    for m in watcher.on("/telemetry") + watcher.on("/events"):
        doc = json.loads(m.payload)
        for first, last in doc.get("spool_dropped_ranges", []) + doc.get("ranges", []):
            dropped |= set(range(first, last + 1))
    return watcher.seqs(), dropped


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")
def test_disk_full_while_broker_away_every_seq_delivered_or_counted(tmp_path: Path, keys: dict[str, Path],
                                                                     zoo: Zoo) -> None:
    with _outage_rig(tmp_path, keys, zoo, "16m") as (broker, serve, watcher):
        filler = fill(serve.state)
        wait_for(lambda: serve.stderr().count("counted as dropped") >= 20, 60, "20 messages lost to the full disk")
        os.unlink(filler)
        broker.start()

        def reported() -> list[dict[str, Any]]:
            return [json.loads(m.payload) for m in watcher.on("/events")
                    if json.loads(m.payload)["kind"] == "messages_dropped"]

        event = wait_for(reported, 60, "a messages_dropped event once the spool works again")[0]
        assert event["count"] >= 20 and "full" in event["reason"], event
        tele = wait_for(lambda: [d for m in watcher.on("/telemetry") if (d := json.loads(m.payload))["spool_dropped"]],
                        30, "telemetry counting the drops")[-1]
        assert tele["spool_dropped"] >= event["count"] and tele["spool_dropped_ranges"], tele
        last = tele["seq"]

        def no_unexplained_gap() -> bool:
            got, dropped = _explained(watcher)
            return set(range(1, last + 1)) <= got | dropped

        wait_for(no_unexplained_gap, 60, "every seq up to the last telemetry received or listed as dropped")
        got, dropped = _explained(watcher)
        assert not got & dropped, "nothing listed as dropped was delivered"
        assert serve.proc is not None and serve.proc.poll() is None, serve.stderr()[-2000:]


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")
def test_spool_file_deleted_under_the_daemon_loses_nothing(tmp_path: Path, keys: dict[str, Path], zoo: Zoo) -> None:
    with _outage_rig(tmp_path, keys, zoo, None) as (broker, serve, watcher):
        spool = serve.state / "mqtt-spool.db"
        time.sleep(1.0)  # a backlog builds up while the broker is away
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{spool}{suffix}")
        wait_for(spool.exists, 10, "the daemon to notice and rescue its spool")
        time.sleep(0.5)
        broker.start()
        tele = wait_for(lambda: [json.loads(m.payload) for m in watcher.on("/telemetry")
                                 if json.loads(m.payload)["seq"] > 40], 60, "telemetry after the outage")[-1]
        wait_for(lambda: set(range(1, tele["seq"] + 1)) <= watcher.seqs(), 60, "every seq delivered")
        assert tele["spool_dropped"] == 0, tele

"""StateStore: typed state.json, strict parsing, atomic writes, no lost updates."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_runtime.cache.state import STATE_SCHEMA, ModelState, Probation, State, StateStore, decode_state
from edge_runtime.errors import CacheError


def bump(name: str) -> Callable[[State], State]:
    return lambda s: s.with_model(name, highest=s.model(name).highest + 1)


def test_missing_file_is_a_fresh_state(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    assert store.load() == State()
    assert store.load().model("m") == ModelState(highest=0, pinned=None, probation=None)
    store.update(lambda s: s)  # nothing changed: nothing written
    assert not store.path.exists()


def test_round_trip_with_schema(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    probation = Probation(
        version=4, previous=3, started_at=1700000000.5, inferences=7, errors=1, boot_attempts=2
    )
    new = store.update(
        lambda s: State(boot_count=9, models={"a": ModelState(4, None, probation), "b": ModelState(2, 1)})
    )
    assert StateStore(tmp_path).load() == new
    doc = json.loads(store.path.read_bytes())
    assert doc["schema"] == STATE_SCHEMA
    assert doc["models"]["a"]["probation"]["boot_attempts"] == 2
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.lock"]  # no temp left


GOOD = {"schema": 1, "boot_count": 0, "models": {"m": {"highest": 3, "pinned": None, "probation": None}}}


def variant(path: tuple[str, ...], value: object) -> bytes:
    doc = json.loads(json.dumps(GOOD))
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"state file is corrupt \(state file is not valid JSON"),
        (b'{"schema": 1, "boot', "not valid JSON"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b"[]", "must be a JSON object"),
        (variant(("schema",), 2), "schema 2 is not supported"),
        (variant(("models", "m", "highest"), -1), r"models\['m'\].highest must be an integer >= 0"),
        (variant(("models", "m", "highest"), "3"), r"highest must be an integer"),
        (variant(("models", "m", "highest"), True), r"highest must be an integer"),
        (variant(("models", "m", "highest"), KeyError), r"highest is missing"),
        (variant(("models", "m", "pinned"), 0), r"pinned must be an integer >= 1"),
        (variant(("models", "m", "probation"), {"version": 2}), r"probation.previous is missing"),
        (variant(("models", "m", "extra"), 1), "unknown key 'extra'"),
        (variant(("models",), []), "models must be a JSON object"),
        (variant(("models", "../x"), GOOD["models"]["m"]), "invalid model name"),  # type: ignore[index]
    ],
)
def test_corrupt_file_is_an_error_not_a_reset(tmp_path: Path, data: bytes, message: str) -> None:
    store = StateStore(tmp_path)
    store.path.write_bytes(data)
    with pytest.raises(CacheError, match=message):
        store.load()
    with pytest.raises(CacheError):
        store.update(bump("m"))
    assert store.path.read_bytes() == data  # the evidence (and the floor) is kept
    assert decode_state(variant(("boot_count",), 5)).boot_count == 5


def test_state_file_symlink_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "elsewhere.json").write_bytes(json.dumps(GOOD).encode())
    store = StateStore(tmp_path / "state")
    store.path.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(CacheError, match="cannot read state file"):
        store.load()


def test_lock_is_reentrant_in_one_thread(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    with store.locked(), store.locked():
        store.update(bump("m"))
    assert store.load().model("m").highest == 1


def test_threads_do_not_lose_updates(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    threads = [
        threading.Thread(target=lambda: [store.update(bump("m")) for _ in range(25)]) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.load().model("m").highest == 200


WORKER = """
import sys
from pathlib import Path
from edge_runtime.cache.state import StateStore
store = StateStore(Path(sys.argv[1]))
print("ready", flush=True)
sys.stdin.readline()  # start both processes' loops together
for _ in range(int(sys.argv[2])):
    store.update(lambda s: s.with_model("m", highest=s.model("m").highest + 1))
"""


def test_two_processes_do_not_lose_floor_bumps(tmp_path: Path) -> None:
    n = 150
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path), str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.close()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert StateStore(tmp_path).load().model("m").highest == 2 * n

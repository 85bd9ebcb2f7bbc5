"""Issue 9 §1: a bad model never takes the CLI or the daemon down.

Real parts throughout: the real LiteRT crashing on a mutant of the real face
detector, a real ONNX memory bomb, a real ``edge-runtime`` CLI and ``serve``
process, a real HTTP channel. Only the timeout uses the child's test-only fault
hook (a model that hangs the runtime on purpose is not something to ship in a test).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_helpers import Device, make_device
from daemon_helpers import Channel, Serve, golden_npz, pack_onnx, wait_for, write_config
from gate_models import crashing_face_model, memory_bomb_model, pack_face_like, pack_ppocr_like
from http_fault_server import FaultServer

from edge_runtime.runtime.gate_child import FAULT_ENV

Zoo = Callable[[str], Path]


def _one_line_error(proc: object) -> str:
    rc, stderr = proc.returncode, proc.stderr  # type: ignore[attr-defined]
    assert rc == 1, (rc, stderr)  # never -11: the crash was the child's
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return str(lines[0])


def _failed(device: Device, name: str) -> list[dict[str, object]]:
    state = json.loads((device.state / "state.json").read_text())
    return list(state["models"].get(name, {}).get("failed", []))


@pytest.fixture()
def bomb(tmp_path: Path, zoo: Zoo, keys: dict[str, Path]) -> Path:
    """ppocr-cls v2 whose ConstantOfShape needs 2 GiB (the golden case is the real model's)."""
    golden_in, golden_out = golden_npz(zoo("ppocr_cls"), tmp_path)
    model = memory_bomb_model(tmp_path / "bomb.onnx", gib=2)
    return pack_ppocr_like(tmp_path / "bomb-v2.bundle", model, golden_in, golden_out, keys["a"], 2)


def test_segfaulting_model_is_one_line_marked_and_not_retried_without_force(
        tmp_path: Path, zoo: Zoo, keys: dict[str, Path]) -> None:
    # 1024 MB: under 512 MB the same mutant's huge buffers fail to allocate before LiteRT gets to crash.
    device = make_device(tmp_path / "dev", keys, "[gates]\nchild_memory_mb = 1024\n")
    face = zoo("face_detection")
    model = crashing_face_model(face, tmp_path / "mutant.tflite")
    bundle = pack_face_like(tmp_path / "face-v1.bundle", model, face, zoo("grace_hopper"), keys["a"], 1, tmp_path)

    line = _one_line_error(device.cli("models", "install", bundle, check=False))
    assert "signal 11 while loading" in line, line
    assert device.models() == []  # nothing committed, nothing active
    failed = _failed(device, "face")
    assert len(failed) == 1 and failed[0]["version"] == 1 and "signal 11" in str(failed[0]["reason"])
    assert len(str(failed[0]["sha256"])) == 64

    again = _one_line_error(device.cli("models", "install", bundle, check=False))
    assert "failed its gate before (signal 11 while loading" in again and "--force" in again, again
    forced = _one_line_error(device.cli("models", "install", "--force", bundle, check=False))
    assert "signal 11 while loading" in forced  # really tried again


def test_memory_bomb_exceeds_the_budget_and_the_floor_stays(tmp_path: Path, zoo: Zoo, keys: dict[str, Path],
                                                            bomb: Path) -> None:
    device = make_device(tmp_path / "dev", keys, "[gates]\nchild_memory_mb = 256\n")
    device.cli("models", "install", pack_onnx(tmp_path / "v1.bundle", zoo("ppocr_cls"), 1, keys["a"], tmp_path))
    line = _one_line_error(device.cli("models", "install", bomb, check=False))
    assert "exceeded 256 MB while" in line, line
    [listed] = device.models()
    # The floor rises only after the gate passed: v2 was never accepted, so v1 is what it guards.
    assert listed["active"] == 1 and listed["versions"] == [1] and listed["floor"] == 1


def test_gate_timeout_kills_the_child_process_group(tmp_path: Path, zoo: Zoo, keys: dict[str, Path]) -> None:
    device = make_device(tmp_path / "dev", keys, "[gates]\nchild_timeout_seconds = 2\n")
    bundle = pack_onnx(tmp_path / "v1.bundle", zoo("ppocr_cls"), 1, keys["a"], tmp_path)
    marker = uuid.uuid4().hex
    from cli_helpers import cli

    proc = cli("models", "install", bundle, "--config", device.config, check=False,
               env={FAULT_ENV: "gating:hang", "EDGE_TEST_MARKER": marker})
    line = _one_line_error(proc)
    assert "gate timed out after 2 s while gating" in line, line
    assert device.models() == []
    assert not _processes_with(f"EDGE_TEST_MARKER={marker}"), "the gate child outlived its deadline"


def test_a_gate_child_dies_with_its_killed_parent(tmp_path: Path, zoo: Zoo, keys: dict[str, Path]) -> None:
    import signal
    import subprocess
    import sys

    from daemon_helpers import REPO

    device = make_device(tmp_path / "dev", keys)
    bundle = pack_onnx(tmp_path / "v1.bundle", zoo("ppocr_cls"), 1, keys["a"], tmp_path)
    marker = f"EDGE_TEST_MARKER={uuid.uuid4().hex}"
    env = dict(os.environ) | {FAULT_ENV: "gating:hang", marker.split("=")[0]: marker.split("=")[1]}
    cli = subprocess.Popen([sys.executable, "-m", "edge_runtime", "models", "install", str(bundle),
                            "--config", str(device.config)], env=env, cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: [p for p in _processes_with(marker) if p != cli.pid], 60, "the gate child", 0.05)
    finally:
        cli.send_signal(signal.SIGKILL)  # the parent cannot kill the child's group any more
        cli.wait(10)
    wait_for(lambda: not _processes_with(marker), 10, "the orphaned gate child to die", 0.05)


def _processes_with(entry: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry.encode() in environ:
            found.append(int(pid))
    return found


def test_activate_of_a_marked_version_is_refused_without_force(tmp_path: Path, keys: dict[str, Path],
                                                               bomb: Path) -> None:
    device = make_device(tmp_path / "dev", keys, "[gates]\nchild_memory_mb = 256\n")
    device.cli("models", "install", "--no-gates", "--no-activate", bomb)
    first = _one_line_error(device.cli("models", "activate", "ppocr-cls", "2", check=False))
    assert "exceeded 256 MB" in first
    refused = _one_line_error(device.cli("models", "activate", "ppocr-cls", "2", check=False))
    assert "ppocr-cls v2 failed its gate before (exceeded 256 MB" in refused and "--force" in refused, refused
    forced = _one_line_error(device.cli("models", "activate", "ppocr-cls", "2", "--force", check=False))
    assert "exceeded 256 MB" in forced and "before" not in forced
    assert device.models()[0]["active"] is None


@pytest.fixture()
def ota_server() -> Iterator[FaultServer]:
    with FaultServer({}) as server:
        yield server


def test_serve_survives_a_memory_bomb_over_ota_and_does_not_fetch_it_again(
        tmp_path: Path, zoo: Zoo, keys: dict[str, Path], ota_server: FaultServer, bomb: Path) -> None:
    channel = Channel(ota_server, keys["a"])
    channel.publish({"ppocr-cls": pack_onnx(tmp_path / "v1.bundle", zoo("ppocr_cls"), 1, keys["a"], tmp_path)})
    extra = (f'[gates]\nchild_memory_mb = 256\n[ota]\nchannel_url = "{channel.url}"\nallow_http = true\n'
             "poll_seconds = 0.3\nretries = 1\nbackoff_max_seconds = 0.2\n")
    config, state, port = write_config(tmp_path / "device", keys["trust_dir"], extra=extra)
    serve = Serve(config, state, port).start()
    try:
        wait_for(lambda: serve.served_version() == 1, 60, "v1 via OTA", 0.2)
        channel.publish({"ppocr-cls": bomb})
        failed = wait_for(lambda: serve.events("update_failed"), 60, "update_failed")[-1]
        assert failed["model"] == "ppocr-cls" and failed["version"] == 2
        assert "exceeded 256 MB while" in failed["reason"], failed
        assert serve.served_version() == 1  # alive, and the old model serves
        polls = len(ota_server.seen("/channel.json"))
        wait_for(lambda: len(ota_server.seen("/channel.json")) >= polls + 3, 30, "three more polls", 0.1)
        assert len(ota_server.seen(f"/{bomb.name}")) == 1, "a version that failed its gate was fetched again"
        assert len(serve.events("update_failed")) == 1
        assert [e["kind"] for e in serve.events() if e.get("version") == 2] == [
            "update_available", "gate_failed", "update_failed"]
        assert serve.served_version() == 1
    finally:
        if serve.proc and serve.proc.poll() is None:
            serve.kill9()


def test_failure_records_round_trip_strictly_and_stay_bounded(tmp_path: Path) -> None:
    from edge_runtime.cache.state import MAX_FAILED_VERSIONS, FailedVersion, State, decode_state
    from edge_runtime.errors import CacheError

    state = State()
    for v in range(1, MAX_FAILED_VERSIONS + 3):
        state = state.with_failure("m", FailedVersion(v, "x" * 900, "", "a" * 64, 1.5))
    failed = decode_state(state.to_json()).model("m").failed
    assert [f.version for f in failed] == list(range(3, MAX_FAILED_VERSIONS + 3))  # the newest kept
    assert len(failed[0].reason) == 500
    assert decode_state(state.without_failure("m", 5).to_json()).model("m").failure(5) is None
    assert b'"failed"' not in State().with_model("m", highest=1).to_json()  # older runtimes still read it
    bad = state.to_json().replace(b'"' + b"a" * 64 + b'"', b'"../etc"', 1)
    with pytest.raises(CacheError, match=r"manifest_sha256 must be a sha256 hex digest"):
        decode_state(bad)

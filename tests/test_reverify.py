"""What is on disk is re-verified, not trusted (issue 9 §3).

A cached version's manifest signature is re-checked against the keys in the
trust dir *now* whenever it is loaded or activated, through the real CLI and a
real ``edge-runtime serve``: a flipped manifest byte or a key removed from the
trust dir is refused with one line, and a daemon falls back to the previous
version with an event that says why.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_helpers import PPOCR_SPEC, Device, cli, make_device
from daemon_helpers import Serve, pack_onnx, ppocr_input, wait_for, write_config

from edge_runtime.bundle.manifest import Gates
from edge_runtime.config.model import ActivationConfig, Config
from edge_runtime.errors import IntegrityError, SignatureError
from edge_runtime.runtime.service import InferenceService
from edge_runtime.telemetry.events import EventBus
from edge_runtime.telemetry.metrics import Metrics
from edge_runtime.update.activation import Activator
from edge_runtime.update.store import ModelStore

Zoo = Callable[[str], Path]
SIGNATURE_NOW = "manifest signature does not verify with the keys trusted now"


def pack(root: Path, zoo: Zoo, version: int, key: Path) -> Path:
    """A ppocr-cls bundle (top_k 2) packed and signed with ``key`` by the real CLI."""
    spec = root / "ppocr.toml"
    spec.write_text(PPOCR_SPEC)
    out = root / f"ppocr-v{version}-{key.name}.bundle"
    cli("bundle", "pack", "--model", zoo("ppocr_cls"), "--name", "ppocr-cls", "--version", version,
        "--key", key, "--spec", spec, "-o", out)
    return out


def flip_top_k(state: Path, version: int) -> None:
    """One bit flipped in the cached manifest: top_k 2 -> 3 (still a valid manifest)."""
    path = state / "models" / "ppocr-cls" / str(version) / "manifest.json"
    data = bytearray(path.read_bytes())
    match = re.search(rb'"top_k":\s*2', data)
    assert match is not None, data
    data[match.end() - 1] ^= 0x01
    path.write_bytes(bytes(data))
    assert json.loads(data)["postprocess"]["top_k"] == 3


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The stderr of a refused CLI call: exactly one line, no traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr


def test_flipped_manifest_byte_fails_verify_and_is_not_served(tmp_path: Path, keys: dict[str, Path],
                                                             zoo: Zoo) -> None:
    device = make_device(tmp_path / "dev", keys)
    device.cli("models", "install", pack(tmp_path, zoo, 1, keys["a"]))
    assert device.cli("models", "verify").returncode == 0
    flip_top_k(device.state, 1)

    out = device.cli("models", "verify", check=False)
    assert out.returncode == 1
    assert f"ppocr-cls v1: UNTRUSTED: ppocr-cls v1 {SIGNATURE_NOW}" in out.stdout
    assert "does not match the signed content" in out.stdout
    rows = json.loads(device.cli("models", "verify", "--json", check=False).stdout)
    assert [(r["version"], r["ok"]) for r in rows] == [(1, False)]

    served = device.cli("run", zoo("grace_hopper"), check=False)
    assert SIGNATURE_NOW in one_line_error(served)


def test_serve_falls_back_when_the_active_manifest_was_altered(tmp_path: Path, keys: dict[str, Path],
                                                               zoo: Zoo) -> None:
    config, state, port = write_config(tmp_path / "dev", keys["trust_dir"])
    for version in (1, 2):
        cli("models", "install", pack(tmp_path, zoo, version, keys["a"]), "--config", config)
    flip_top_k(state, 2)
    serve = Serve(config, state, port).start()
    try:
        serve.wait_ready()
        assert serve.served_version() == 1
        (event,) = serve.events("rolled_back")
        assert (event["version"], event["failed_version"]) == (1, 2)
        assert f"v2 failed to load: ppocr-cls v2 {SIGNATURE_NOW}" in event["reason"]
    finally:
        assert serve.terminate() == 0
    assert "Traceback" not in serve.stderr()


def test_a_key_removed_from_the_trust_dir_stops_its_versions(tmp_path: Path, keys: dict[str, Path],
                                                             zoo: Zoo) -> None:
    config, state, port = write_config(tmp_path / "dev", keys["trust_dir"])
    device = Device(tmp_path / "dev", config, state, keys)
    device.cli("models", "install", pack(tmp_path, zoo, 1, keys["a"]))
    device.cli("models", "install", pack(tmp_path, zoo, 2, keys["a"]))
    device.cli("models", "install", pack(tmp_path, zoo, 3, keys["b"]))
    revoked = keys["trust_dir"] / "b.pub"
    b_pub = revoked.read_bytes()
    revoked.unlink()

    serve = Serve(config, state, port).start()
    try:
        serve.wait_ready()
        assert serve.served_version() == 2  # boot: v3 (signed by b only) falls back to v2
        (event,) = serve.events("rolled_back")
        assert (event["version"], event["failed_version"]) == (2, 3)
        assert f"ppocr-cls v3 {SIGNATURE_NOW}: 0 valid trusted signature(s), 1 required" in event["reason"]
    finally:
        assert serve.terminate() == 0

    (entry,) = device.models()
    assert (entry["active"], entry["previous"]) == (2, 3)
    before = device.tree()
    assert f"v3 {SIGNATURE_NOW}" in one_line_error(device.cli("models", "rollback", "ppocr-cls", check=False))
    assert f"v3 {SIGNATURE_NOW}" in one_line_error(device.cli("models", "activate", "ppocr-cls", "3", check=False))
    assert device.tree() == before  # refused before any link moved

    out = device.cli("models", "verify", check=False)
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert lines[:2] == ["ppocr-cls v1: ok", "ppocr-cls v2: ok"]
    assert lines[2].startswith(f"ppocr-cls v3: UNTRUSTED: ppocr-cls v3 {SIGNATURE_NOW}")

    revoked.write_bytes(b_pub)  # trusted again: the same version activates, nothing was lost
    device.cli("models", "activate", "ppocr-cls", "3")
    assert device.models()[0]["active"] == 3
    assert device.cli("models", "verify").returncode == 0


def test_a_missing_trust_dir_is_one_config_error_and_changes_nothing(tmp_path: Path, keys: dict[str, Path],
                                                                     zoo: Zoo) -> None:
    device = make_device(tmp_path / "dev", keys)
    device.cli("models", "install", pack(tmp_path, zoo, 1, keys["a"]))
    device.cli("models", "install", pack(tmp_path, zoo, 2, keys["a"]))
    before = device.tree()
    moved = keys["trust_dir"].rename(tmp_path / "trust-away")
    assert "trust dir" in one_line_error(device.cli("models", "verify", check=False))
    assert "trust dir" in one_line_error(device.cli("models", "rollback", "ppocr-cls", check=False))
    assert device.tree() == before
    moved.rename(keys["trust_dir"])
    device.cli("models", "rollback", "ppocr-cls")
    assert device.models()[0]["active"] == 1


def test_serve_stays_up_when_no_version_verifies(tmp_path: Path, keys: dict[str, Path], zoo: Zoo) -> None:
    config, state, port = write_config(tmp_path / "dev", keys["trust_dir"])
    for version in (1, 2):
        cli("models", "install", pack(tmp_path, zoo, version, keys["b"]), "--config", config)
    (keys["trust_dir"] / "b.pub").unlink()
    serve = Serve(config, state, port).start()
    try:
        event = wait_for(lambda: serve.events("rollback_failed"), 30, "rollback_failed")[0]
        assert event["version"] == 1  # the fallback that failed too
        assert event["reason"].startswith(f"v2 failed to load: ppocr-cls v2 {SIGNATURE_NOW}")
        assert f"ppocr-cls v1 {SIGNATURE_NOW}" in event["reason"]
        wait_for(serve.live, 30, "the API to answer")
        assert serve.served_version() is None  # nothing untrusted is served, and the daemon lives
    finally:
        assert serve.terminate() == 0
    assert "Traceback" not in serve.stderr()


class Rig:
    """One process: store + service + activator; v1 (signed by a) serving, v2 (signed by b) cached."""

    def __init__(self, root: Path, keys: dict[str, Path], zoo: Zoo) -> None:
        config = Config(state_dir=root / "state", trust_dir=keys["trust_dir"],
                        activation=ActivationConfig(probation_inferences=0, probation_seconds=3600))
        self.store = ModelStore(config)
        self.service = InferenceService(Metrics())
        self.events: list[dict[str, object]] = []
        bus = EventBus(root / "events.jsonl")
        bus.subscribe(self.events.append)
        self.activator = Activator(self.store, self.service, bus, config.activation)
        for v, key in ((1, keys["a"]), (2, keys["b"])):
            self.store.install(pack_onnx(root / f"v{v}.bundle", zoo("ppocr_cls"), v, key, root, gates=Gates()),
                               activate=v == 1)
        assert self.activator.boot("ppocr-cls") == 1

    def served(self) -> int:
        return self.service.infer("ppocr-cls", {"x": ppocr_input()})[0]

    def reasons(self, kind: str) -> list[str]:
        return [str(e["reason"]) for e in self.events if e["kind"] == kind]


def test_activation_and_rollback_of_a_version_whose_key_was_removed_are_refused(
        tmp_path: Path, keys: dict[str, Path], zoo: Zoo) -> None:
    rig = Rig(tmp_path, keys, zoo)
    (keys["trust_dir"] / "b.pub").unlink()
    with pytest.raises(SignatureError, match=f"ppocr-cls v2 {SIGNATURE_NOW}"):
        rig.activator.activate("ppocr-cls", 2)  # the OTA / fleet update path
    assert f"ppocr-cls v2 {SIGNATURE_NOW}: 0 valid trusted signature(s), 1 required" in \
        rig.reasons("activation_failed")[0]
    with pytest.raises(SignatureError, match=SIGNATURE_NOW):
        rig.activator.rollback("ppocr-cls", 2)  # the fleet rollback command
    assert rig.served() == 1 and rig.store.cache.active_version("ppocr-cls") == 1


def test_reload_of_an_altered_active_manifest_keeps_the_old_model(tmp_path: Path, keys: dict[str, Path],
                                                                 zoo: Zoo) -> None:
    rig = Rig(tmp_path, keys, zoo)
    rig.store.cache.activate("ppocr-cls", 2)  # as `models activate --no-gates` does; then the file changes
    path = rig.store.cache.version_dir("ppocr-cls", 2) / "manifest.json"
    altered = path.read_bytes().replace(b'"version":2', b'"version": 2')  # parses the same, signed bytes differ
    assert altered != path.read_bytes()
    path.write_bytes(altered)
    assert rig.activator.sync() == []  # SIGHUP
    assert f"ppocr-cls v2 {SIGNATURE_NOW}: signature by key" in rig.reasons("load_failed")[0]
    assert rig.served() == 1


@pytest.mark.parametrize("plant", ["missing", "symlink", "oversized"])
def test_a_tampered_manifest_sig_file_is_refused_in_one_line(tmp_path: Path, keys: dict[str, Path], zoo: Zoo,
                                                            plant: str) -> None:
    rig = Rig(tmp_path, keys, zoo)
    sig = rig.store.cache.version_dir("ppocr-cls", 1) / "manifest.sig"
    good = tmp_path / "good.sig"
    good.write_bytes(sig.read_bytes())
    sig.unlink()
    if plant == "symlink":  # a valid signature, but through a link out of the cache: never followed
        sig.symlink_to(good)
    elif plant == "oversized":
        sig.write_bytes(b" " * (rig.store.config.limits.max_signature_bytes + 1))
    with pytest.raises(SignatureError, match=r"ppocr-cls v1 manifest signature: .*manifest.sig is unreadable"):
        rig.store.cache.verify_version("ppocr-cls", 1)
    with pytest.raises(SignatureError):
        rig.store.load("ppocr-cls", 1)
    sig.unlink(missing_ok=True)
    sig.write_bytes(good.read_bytes())
    rig.store.cache.verify_version("ppocr-cls", 1)


def test_a_linked_manifest_is_refused(tmp_path: Path, keys: dict[str, Path], zoo: Zoo) -> None:
    rig = Rig(tmp_path, keys, zoo)
    manifest = rig.store.cache.version_dir("ppocr-cls", 1) / "manifest.json"
    copy = tmp_path / "manifest.json"
    copy.write_bytes(manifest.read_bytes())
    manifest.unlink()
    manifest.symlink_to(copy)
    with pytest.raises(IntegrityError, match=r"manifest\.json: unreadable"):
        rig.store.cache.verify_version("ppocr-cls", 1)

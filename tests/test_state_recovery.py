"""Issue 9 §6: a corrupt or deleted state.json is rebuilt (floors from models/, the channel sequence from
the kept, re-verified channel document), serve starts, and an older channel document is still refused."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_helpers import cli
from daemon_helpers import Channel, Serve, pack_onnx, wait_for, write_config
from http_fault_server import FaultServer

Zoo = Callable[[str], Path]
OTA = """
[ota]
channel_url = "{url}"
allow_http = true
poll_seconds = 0.3
retries = 2
backoff_max_seconds = 0.2
"""
GARBAGE = b'{"schema": 1, "boot_count": 3, "models": {"ppocr-cls": {"highest": 2, "pin'


def corrupt_copies(state: Path) -> list[Path]:
    return sorted(state.glob("state.json.corrupt-*"))


@pytest.mark.parametrize("damage", ["corrupt", "deleted"])
def test_serve_rebuilds_state_and_still_refuses_an_older_channel_document(
        tmp_path: Path, keys: dict[str, Path], zoo: Zoo, damage: str) -> None:
    with FaultServer({}) as server:
        channel = Channel(server, keys["a"])
        config, state, port = write_config(tmp_path / "device", keys["trust_dir"], extra=OTA.format(url=channel.url))
        serve = Serve(config, state, port).start()
        try:
            for version in (1, 2):
                bundle = pack_onnx(tmp_path / f"v{version}.bundle", zoo("ppocr_cls"), version, keys["a"], tmp_path)
                channel.publish({"ppocr-cls": bundle})
                wait_for(lambda v=version: serve.served_version() == v, 60, f"v{version} via OTA", 0.2)
        finally:
            assert serve.terminate() == 0
        assert json.loads((state / "state.json").read_bytes())["channel_sequence"] == 2
        if damage == "corrupt":
            (state / "state.json").write_bytes(GARBAGE)
        else:
            (state / "state.json").unlink()
        # An attacker replays the older, still unexpired, validly signed document (sequence 1).
        channel.serve_document(*channel.documents[0])

        serve = Serve(config, state, port).start()
        try:
            serve.wait_ready(60)
            assert serve.served_version() == 2
            [event] = serve.events("state_recovered")
            assert event["channel_sequence"] == 2 and event["floors"] == {"ppocr-cls": 2}
            assert "channel sequence 2 (from the kept channel document, signature verified)" in event["reason"]
            assert "lost: pinned versions" in event["reason"]
            wait_for(lambda: "channel sequence 1 is below 2" in serve.stderr(), 30, "the replay refused", 0.2)
        finally:
            serve.terminate()
    rebuilt = json.loads((state / "state.json").read_bytes())
    assert rebuilt["channel_sequence"] == 2 and rebuilt["models"]["ppocr-cls"]["highest"] == 2
    if damage == "corrupt":
        [aside] = corrupt_copies(state)
        assert aside.read_bytes() == GARBAGE and stat.S_IMODE(aside.stat().st_mode) == 0o600
        assert f"kept as {aside.name}" in event["reason"]
    else:
        assert corrupt_copies(state) == []


def test_cli_rebuilds_a_corrupt_state_file_once_with_one_warning(tmp_path: Path, keys: dict[str, Path],
                                                                 zoo: Zoo) -> None:
    config, state, _ = write_config(tmp_path / "device", keys["trust_dir"])
    bundle = pack_onnx(tmp_path / "v3.bundle", zoo("ppocr_cls"), 3, keys["a"], tmp_path)
    cli("models", "install", bundle, "--config", config)
    (state / "state.json").write_bytes(b"\x00not json")
    listed = cli("models", "list", "--json", "--config", config)
    [line] = listed.stderr.strip().splitlines()
    assert line.startswith("warning: state file rebuilt (") and "(ppocr-cls v3)" in line
    assert "channel sequence 0 (no channel document was kept)" in line
    assert json.loads(listed.stdout)[0]["floor"] == 3
    again = cli("models", "list", "--config", config)
    assert again.stderr == "" and len(corrupt_copies(state)) == 1
    refused = cli("models", "install", bundle, "--config", config, check=False)
    assert refused.returncode == 1 and "anti-rollback floor" in refused.stderr


def test_a_kept_channel_document_that_does_not_verify_gives_no_sequence(tmp_path: Path, keys: dict[str, Path],
                                                                        zoo: Zoo) -> None:
    """A planted ``channel.last`` (not signed by a trusted key) cannot set the sequence."""
    import base64

    from edge_runtime.bundle.signing import load_private_key, sign_document

    config, state, _ = write_config(tmp_path / "device", keys["trust_dir"])
    cli("models", "install", pack_onnx(tmp_path / "v1.bundle", zoo("ppocr_cls"), 1, keys["a"], tmp_path),
        "--config", config)
    doc = b'{"expires": "2099-01-01T00:00:00Z", "models": {}, "schema": 1, "sequence": 99}'
    sig = sign_document(doc, [load_private_key(keys["evil"])])
    (state / "channel.last").write_text(json.dumps({"document": base64.b64encode(doc).decode(),
                                                    "signature": base64.b64encode(sig).decode()}))
    (state / "state.json").unlink()
    line = cli("models", "list", "--config", config).stderr.strip()
    assert "state.json is missing" in line and "channel sequence 0 (kept channel document does not verify" in line
    assert json.loads((state / "state.json").read_bytes())["channel_sequence"] == 0

"""``edge-runtime repo ...`` builds a TUF repository that a device follows: release, refresh, key rotation."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_helpers import cli
from daemon_helpers import pack_onnx
from http_fault_server import FaultServer
from tuf_helpers import make_device, serve_directory

from edge_runtime.bundle.manifest import Gates
from edge_runtime.errors import IncompatibleError, SignatureError

Zoo = Callable[[str], Path]


@pytest.fixture()
def server() -> Iterator[FaultServer]:
    with FaultServer({}) as srv:
        yield srv


def _keys(tmp: Path, *names: str) -> dict[str, Path]:
    out = {}
    for name in names:
        out[name] = tmp / "repo-keys" / name
        out[name].parent.mkdir(exist_ok=True)
        cli("bundle", "keygen", out[name])
    return out


def test_publisher_commands_release_refresh_and_rotate_a_key(tmp_path: Path, keys: dict[str, Path], zoo: Zoo,
                                                             server: FaultServer) -> None:
    k = _keys(tmp_path, "root1", "root2", "targets", "targets2", "snapshot", "timestamp")
    repo = tmp_path / "repo"
    cli("repo", "init", repo, "--root-key", k["root1"], "--root-key", k["root2"], "--root-threshold", "1",
        "--targets-key", k["targets"], "--snapshot-key", k["snapshot"], "--timestamp-key", k["timestamp"])
    assert (repo / "metadata" / "1.root.json").exists() and (repo / "metadata" / "timestamp.json").exists()

    def bundle(version: int) -> Path:
        return pack_onnx(tmp_path / f"v{version}.bundle", zoo("ppocr_cls"), version, keys["a"], tmp_path,
                         gates=Gates())

    def publish(*extra: str) -> None:
        cli("repo", "publish", repo, "--snapshot-key", k["snapshot"], "--timestamp-key", k["timestamp"], *extra)
        serve_directory(server, repo)

    cli("repo", "keys", repo, "--publisher-key", f"{keys['a']}.pub", "--targets-key", k["targets"])
    out = cli("repo", "add", repo, bundle(3), "--targets-key", k["targets"], "--json")
    assert json.loads(out.stdout)["targets"] == ["models/ppocr-cls.bundle"]
    publish()
    device = make_device(tmp_path, keys, zoo, server.url("").rstrip("/"),
                         (repo / "metadata" / "1.root.json").read_bytes())
    assert [r.version for r in device.ota.poll_once()] == [3]
    delivered = tmp_path / "state" / "trust" / "publisher-keys.json"
    assert json.loads(delivered.read_bytes())["threshold"] == 1 and delivered.stat().st_mode & 0o777 == 0o600
    # The cron job: a new timestamp, nothing new to install.
    cli("repo", "refresh-timestamp", repo, "--timestamp-key", k["timestamp"])
    serve_directory(server, repo)
    assert device.ota.poll_once() == []
    # A publisher key leaks: the root rotates the targets role to a new key.
    cli("repo", "rotate", repo, "--role", "targets", "--new-key", k["targets2"], "--root-key", k["root1"])
    cli("repo", "add", repo, bundle(4), "--targets-key", k["targets2"])
    publish()
    assert [r.version for r in device.ota.poll_once()] == [4]
    trusted = json.loads((tmp_path / "state" / "tuf" / "root.json").read_bytes())
    assert trusted["signed"]["version"] == 2
    # What the leaked key signs now is refused.
    cli("repo", "add", repo, bundle(5), "--targets-key", k["targets"])
    publish()
    with pytest.raises(SignatureError):
        device.ota.poll_once()
    assert device.version() == 4
    # And a timestamp left to expire (a cron that stopped) is refused, not trusted forever.
    cli("repo", "add", repo, bundle(6), "--targets-key", k["targets2"])
    publish("--timestamp-days", "-1")
    with pytest.raises(IncompatibleError, match="expired"):
        device.ota.poll_once()
    assert device.version() == 4


def test_repo_commands_refuse_bad_input_with_one_line(tmp_path: Path) -> None:
    k = _keys(tmp_path, "root", "other")
    out = cli("repo", "add", tmp_path / "nowhere", tmp_path / "x.bundle", "--targets-key", k["root"], check=False)
    assert out.returncode != 0 and "not a TUF repository" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    repo = tmp_path / "repo"
    cli("repo", "init", repo, "--root-key", k["root"], "--targets-key", k["other"], "--snapshot-key", k["other"],
        "--timestamp-key", k["other"])
    again = cli("repo", "init", repo, "--root-key", k["root"], "--targets-key", k["other"],
                "--snapshot-key", k["other"], "--timestamp-key", k["other"], check=False)
    assert again.returncode != 0 and "already holds a TUF repository" in again.stderr
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(b"not a tar")
    bad = cli("repo", "add", repo, junk, "--targets-key", k["other"], check=False)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1


def test_an_air_gapped_device_installs_from_a_copied_repository_with_the_same_checks(
        tmp_path: Path, keys: dict[str, Path], zoo: Zoo) -> None:
    import shutil

    k = _keys(tmp_path, "root", "targets", "snapshot", "timestamp")
    repo = tmp_path / "repo"
    cli("repo", "init", repo, "--root-key", k["root"], "--targets-key", k["targets"], "--snapshot-key",
        k["snapshot"], "--timestamp-key", k["timestamp"], "--timestamp-days", "30", "--snapshot-days", "30")
    bundle = pack_onnx(tmp_path / "v3.bundle", zoo("ppocr_cls"), 3, keys["a"], tmp_path, gates=Gates())
    cli("repo", "add", repo, bundle, "--targets-key", k["targets"])
    # Long-lived metadata for a site that stays offline: timestamp and snapshot valid for 30 days.
    cli("repo", "publish", repo, "--snapshot-key", k["snapshot"], "--timestamp-key", k["timestamp"],
        "--snapshot-days", "30", "--timestamp-days", "30")
    trust = tmp_path / "device-trust"
    shutil.copytree(keys["trust_dir"], trust)
    shutil.copy(repo / "metadata" / "1.root.json", trust / "root.json")
    config = tmp_path / "device.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\ntrust_dir = "{trust}"\n')
    usb = tmp_path / "usb" / "repo"
    shutil.copytree(repo, usb)
    # A tampered copy: the bundle's bytes no longer match the signed hash.
    target = next((usb / "targets" / "models").iterdir())
    good = target.read_bytes()
    target.write_bytes(good[:-10] + b"0123456789")
    bad = cli("models", "install", "--from-repo", usb, "--model", "ppocr-cls", "--config", config, check=False)
    listed = cli("models", "list", "--config", config, "--json").stdout
    assert json.loads(listed) == [] and bad.returncode != 0 and "does not match expected hash" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    target.write_bytes(good)
    out = cli("models", "install", "--from-repo", usb, "--model", "ppocr-cls", "--config", config, "--json")
    assert json.loads(out.stdout) == [{"name": "ppocr-cls", "version": 3, "active": True}]
    again = cli("models", "install", "--from-repo", usb, "--config", config)
    assert "nothing newer" in again.stdout
    # Expired metadata on the stick is refused, whatever is on it.
    cli("repo", "refresh-timestamp", repo, "--timestamp-key", k["timestamp"], "--timestamp-days", "-1")
    shutil.copy(repo / "metadata" / "timestamp.json", usb / "metadata" / "timestamp.json")
    expired = cli("models", "install", "--from-repo", usb, "--config", config, check=False)
    assert expired.returncode != 0 and "expired" in expired.stderr and len(expired.stderr.strip().splitlines()) == 1
    usage = cli("models", "install", "--config", config, check=False)
    assert usage.returncode != 0 and "BUNDLE or --from-repo" in usage.stderr

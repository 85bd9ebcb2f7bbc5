"""Issue 9 §6: a ``kill -9``'d CLI install leaves a staging dir that the next CLI command removes,
while a live process's staging dir is never removed (by a CLI nor by a daemon start)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_helpers import PPOCR_SPEC, REPO, Device, cli, make_device

from edge_runtime.bundle.staging_owner import owner_alive, owner_tag, process_start
from edge_runtime.cache.versions import ModelCache

Zoo = Callable[[str], Path]


@pytest.fixture()
def device(tmp_path: Path, keys: dict[str, Path]) -> Device:
    return make_device(tmp_path, keys)


def pack(dev: Device, zoo: Zoo, version: int) -> Path:
    spec = dev.root / "ppocr.toml"
    spec.write_text(PPOCR_SPEC)
    out = dev.root / f"ppocr-v{version}.bundle"
    cli("bundle", "pack", "--model", zoo("ppocr_cls"), "--name", "ppocr-cls", "--version", version,
        "--key", dev.keys["a"], "--spec", spec, "-o", out)
    return out


def staged(dev: Device) -> list[str]:
    return sorted(p.name for p in (dev.state / "staging").iterdir())


def stop_mid_install(dev: Device, zoo: Zoo) -> tuple[subprocess.Popen[bytes], int]:
    """A real ``models install`` (unpack, load, gate), SIGSTOPped while its staging dir exists; and its version.

    It is stopped as soon as its staging dir appears and checked after the stop; a run that
    finished first is tried again with the next version.
    """
    for version in range(1, 11):
        bundle = pack(dev, zoo, version)
        proc = subprocess.Popen([sys.executable, "-m", "edge_runtime", "models", "install", str(bundle),
                                 "--config", str(dev.config)], cwd=REPO, env=dict(os.environ),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None:
            if (dev.state / "staging").is_dir() and any(n.startswith("bundle-") for n in staged(dev)):
                proc.send_signal(signal.SIGSTOP)
                if any(n.startswith("bundle-") for n in staged(dev)):
                    return proc, version
                proc.send_signal(signal.SIGCONT)
            time.sleep(0.001)
        assert proc.wait() == 0
    raise AssertionError("never caught an install with its staging dir")


def test_kill9_cli_install_leftover_removed_by_next_cli_command(device: Device, zoo: Zoo) -> None:
    proc, version = stop_mid_install(device, zoo)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    leftovers = staged(device)
    assert leftovers and all(n.startswith("bundle-") for n in leftovers)
    before = device.models()  # `models list` runs: the killed install left no version ...
    assert all(version not in m["versions"] for m in before)
    assert staged(device) == []  # ... and it removed the dead install's staging dir
    device.cli("models", "install", device.root / f"ppocr-v{version}.bundle")  # installs fine afterwards
    assert [m["active"] for m in device.models()] == [version]


def test_live_install_staging_dir_is_kept_by_cli_and_daemon_start(device: Device, zoo: Zoo) -> None:
    device.cli("models", "list")  # creates the state dir
    proc, version = stop_mid_install(device, zoo)
    try:
        live = staged(device)
        start = process_start(proc.pid)
        assert start is not None and live and all(owner_alive(n) for n in live)
        # The same pid with another start time is a reused pid: its dir is a leftover.
        reused = device.state / "staging" / f"bundle-.pid{proc.pid}-{start + 1}-{owner_tag().split('-')[-1]}.x1"
        reused.mkdir()
        (device.state / "staging" / "bundle-unowned").mkdir()  # as an older version left them
        device.cli("models", "list")
        assert staged(device) == live
        # A daemon start (its cache recovery) keeps it too.
        notes = ModelCache(device.state).recover()
        assert staged(device) == live and not any("staging" in n for n in notes)
    finally:
        proc.send_signal(signal.SIGCONT)
    assert proc.wait(120) == 0  # the stopped install finishes as if nothing happened
    assert [m["active"] for m in device.models()] == [version]
    assert staged(device) == []

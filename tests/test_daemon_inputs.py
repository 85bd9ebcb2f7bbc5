"""Issue 8 §6/§7 through a real `edge-runtime serve`: one daemon per state dir, each result written once,
and a /metrics page that `promtool check metrics` accepts."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from cli_helpers import Device, cli
from daemon_helpers import REPO, Serve, free_port, wait_for, write_config
from test_cli import pack_face

Zoo = Callable[[str], Path]


def _face_device(tmp_path: Path, keys: dict[str, Path], zoo: Zoo, inbox: Path) -> tuple[Path, Path, int]:
    """A config with the face model installed and one folder pipeline ``inbox`` on ``inbox``."""
    inbox.mkdir(exist_ok=True)
    extra = (f'[[pipelines]]\nmodel = "face"\nname = "inbox"\n[pipelines.source]\ntype = "folder"\n'
             f'path = "{inbox}"\npoll_seconds = 0.1\n')
    config, state, port = write_config(tmp_path / "device", keys["trust_dir"], extra=extra)
    dev = Device(tmp_path, config, state, keys)
    cli("models", "install", pack_face(dev, zoo, 1), "--config", config)
    return config, state, port


def test_second_daemon_on_one_state_dir_refuses_naming_the_first(tmp_path: Path, keys: dict[str, Path],
                                                                  zoo: Zoo) -> None:
    config, state, port = _face_device(tmp_path, keys, zoo, tmp_path / "inbox")
    first = Serve(config, state, port).start()
    try:
        first.wait_ready(60)
        assert first.proc is not None
        lock = state / "daemon.lock"
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600
        # Same state dir, another API port: refused at once, one line naming the first daemon.
        other = tmp_path / "other.toml"
        other.write_text(config.read_text().replace(f":{port}", f":{free_port()}"))
        second = subprocess.run([sys.executable, "-m", "edge_runtime", "serve", "--config", str(other)],
                                capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
        assert second.returncode != 0
        assert f"another edge-runtime daemon (pid {first.proc.pid}) already runs on state dir {state}" \
            in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        # The CLI still changes the cache next to the running daemon (its own short state lock).
        listed = json.loads(cli("models", "list", "--json", "--config", config).stdout)
        assert [m["name"] for m in listed] == ["face"]
        # kill -9 frees the lock: the next daemon starts.
        first.kill9()
        again = Serve(config, state, port).start()
        try:
            again.wait_ready(60)
        finally:
            again.terminate()
    finally:
        if first.proc and first.proc.poll() is None:
            first.kill9()


def test_each_result_is_written_once_and_metrics_pass_promtool(tmp_path: Path, keys: dict[str, Path],
                                                               zoo: Zoo) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: tools/test.sh installs it (apt-get install prometheus)"
    inbox = tmp_path / "inbox"
    config, state, port = _face_device(tmp_path, keys, zoo, inbox)
    serve = Serve(config, state, port).start()
    try:
        serve.wait_ready(60)
        # Before any input: the pipeline's counters exist at 0 (alerts and rate() see the first increment).
        status, text = serve.get("/metrics")
        page = text.decode()
        for sample in ('edge_frames_dropped_total{pipeline="inbox"} 0', 'edge_source_errors_total{pipeline="inbox"} 0',
                       'edge_inference_errors_total{model="face"} 0'):
            assert sample in page.splitlines(), f"{sample!r} missing from\n{page}"
        shutil.copy(zoo("grace_hopper"), inbox / "one.jpg")
        wait_for(lambda: '"one.jpg"' in serve.stdout(), 60, "the result on stdout")
        status, text = serve.get("/metrics")
        assert status == 200 and "edge_inference_latency_seconds_bucket" in text.decode()
        checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60,
                                 check=False)
        assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), \
            (checked.stdout + checked.stderr).decode()
    finally:
        assert serve.terminate() == 0
    results = [line for line in serve.stdout().splitlines() if '"one.jpg"' in line]
    assert len(results) == 1 and json.loads(results[0])["key"] == "one.jpg"
    assert '"one.jpg"' not in serve.stderr()  # not a second copy on stderr (both reach the journal)
    assert os.path.exists(state / "daemon.lock")

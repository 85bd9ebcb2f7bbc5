"""Soak: kill -9 `edge-runtime serve` at random points of OTA installs, many times over.

Usage: python tools/soak_ota_kill.py [--cycles 200] [--max-delay 1.5] [--seed 1]

The test suite runs 50 such cycles; this runs as many as asked, the way a
fleet would see it: a publisher key, bundles of the ppocr cls model (one
version per cycle), a channel written by tools/make_channel.py and served by a
plain HTTP server on loopback, and a real daemon polling it. Each cycle
publishes the next version, waits a random time (download, verify, unpack,
gates, link swap or probation may be under way), kills the daemon with SIGKILL
and starts it again. After every restart the version that answers through the
API must be the one the cache has active, and that version's files must hash
to their manifest. Any other outcome stops the soak with the cycle named.

Prints a table: cycles, restarts, how often the update survived the kill, the
time from restart to the first answered inference, and failures (always 0,
or the script exits 1).
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from ppocr_bench_kit import free_port, http_folder, make_publisher, pack_ppocr

from edge_runtime.bundle.manifest import Gates
from edge_runtime.cache.versions import ModelCache

TOOLS = Path(__file__).resolve().parent
_X = np.zeros((1, 3, 48, 192), np.float32)
_BODY = json.dumps({"inputs": [{"name": "x", "shape": list(_X.shape), "datatype": "FP32",
                                "data": _X.ravel().tolist()}]}).encode()


def _served_version(port: int) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v2/models/ppocr-cls/infer", body=_BODY, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
    except OSError:
        return None
    return int(json.loads(data)["model_version"]) if response.status == 200 else None


def _publish(work: Path, key: Path, sequence: int, bundle: Path) -> None:
    subprocess.run([sys.executable, str(TOOLS / "make_channel.py"), "--key", str(key), "--sequence", str(sequence),
                    "--expires-in-hours", "2", "--out", str(work / "www"), str(bundle)],
                   check=True, capture_output=True)


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "edge_runtime", "serve", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=out)


def soak(cycles: int, max_delay: float, seed: int, work: Path) -> dict[str, float]:
    """Run the soak in ``work``; return the table's numbers. Raises RuntimeError on the first bad cycle."""
    rng = random.Random(seed)
    key, trust = make_publisher(work)
    (work / "bundles").mkdir()
    state = work / "state"
    port = free_port()

    def bundle(version: int) -> Path:
        return pack_ppocr(work / "bundles" / f"ppocr-cls-{version}.bundle", "ppocr-cls", version, key,
                          Gates(latency_ms_p95=5000.0))

    (work / "www").mkdir()
    with http_folder(work / "www") as base:
        config = work / "config.toml"
        config.write_text(f'state_dir = "{state}"\ntrust_dir = "{trust}"\n'
                          f'[api]\nlisten = "127.0.0.1:{port}"\n'
                          "[activation]\nprobation_inferences = 10\nprobation_seconds = 30.0\nmax_boot_attempts = 2\n"
                          f'[ota]\nchannel_url = "{base}/channel.json"\nallow_http = true\npoll_seconds = 0.3\n'
                          "retries = 2\nbackoff_max_seconds = 0.2\n")
        _publish(work, key, 1, bundle(1))
        proc = _start(config, work / "serve.err")
        advanced, restart_ms = 0, []
        try:
            _wait(lambda: _served_version(port) == 1, 120, "v1 to serve", proc, work)
            served = 1
            for cycle in range(1, cycles + 1):
                _publish(work, key, cycle + 1, bundle(cycle + 1))
                time.sleep(rng.uniform(0.0, max_delay))
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                t0 = time.monotonic()
                proc = _start(config, work / "serve.err")
                version = _wait(lambda: _served_version(port), 120, f"serving after kill #{cycle}", proc, work)
                restart_ms.append((time.monotonic() - t0) * 1e3)
                active = ModelCache(state).active_version("ppocr-cls")
                if active != version:
                    raise RuntimeError(f"cycle {cycle}: API serves v{version} but the cache has v{active} active")
                ModelCache(state).verify_version("ppocr-cls", version)
                advanced += version > served
                served = version
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
    restart_ms.sort()
    return {"cycles": cycles, "advanced": advanced, "final_version": served,
            "restart_p50_ms": restart_ms[len(restart_ms) // 2], "restart_max_ms": restart_ms[-1]}


def _wait(probe: Callable[[], int | bool | None], timeout: float, what: str, proc: subprocess.Popen[bytes],
          work: Path) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (work / "serve.err").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"serve exited with {proc.returncode} waiting for {what}:\n{tail}")
        value = probe()
        if value:
            return int(value)
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--max-delay", type=float, default=1.5, help="kill within this many seconds of publishing")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = soak(args.cycles, args.max_delay, args.seed, Path(tmp))
        except RuntimeError as e:
            print(f"FAILED: {e}", file=sys.stderr)
            return 1
    print(f"{'cycles (kill -9 during an OTA install)':<44}{result['cycles']:>10}")
    print(f"{'restarts serving the cache-active version':<44}{result['cycles']:>10}")
    print(f"{'cycles where the update survived the kill':<44}{result['advanced']:>10}")
    print(f"{'version serving at the end':<44}{result['final_version']:>10}")
    print(f"{'restart -> first answer, median (ms)':<44}{result['restart_p50_ms']:>10.0f}")
    print(f"{'restart -> first answer, max (ms)':<44}{result['restart_max_ms']:>10.0f}")
    print(f"{'failures':<44}{0:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

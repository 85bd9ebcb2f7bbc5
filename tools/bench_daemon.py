"""Daemon costs: idle CPU, RSS over a bare script, and the latency pause of a hot swap.

Usage: python tools/bench_daemon.py [--idle-seconds 10] [--swaps 5]

1. Idle: `edge-runtime serve` with ppocr cls loaded and the API up, no traffic:
   CPU time over a window (% of one core) and RSS, against a bare Python script
   that loads the same model in onnxruntime and runs it once.
2. Swap pause: a client sends requests back to back through the API; the
   steady p99 is measured, then versions are swapped (`models activate` + SIGHUP,
   the path a fleet `reload` takes) while the client keeps going. The largest
   latency seen during each swap window is compared with the steady p99.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from ppocr_bench_kit import free_port, make_publisher, pack_ppocr

from edge_runtime.config.model import Config
from edge_runtime.devtools.model_zoo import fetch
from edge_runtime.update.store import ModelStore

_BARE = """
import sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
s.run(None, {"x": np.zeros((1, 3, 48, 192), np.float32)})
print(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
"""


def _proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return int(fh.read().split("VmRSS:")[1].split()[0]) / 1024


def _setup(work: Path, threads: int, spin_wait: bool) -> tuple[Path, int, Path]:
    key, trust = make_publisher(work)
    state = work / "state"
    store = ModelStore(Config(state_dir=state, trust_dir=trust))
    for v in (1, 2):
        store.install(pack_ppocr(work / f"v{v}.bundle", "ppocr", v, key), activate=True, gates=False)
    store.cache.activate("ppocr", 1)
    port = free_port()
    config = work / "config.toml"
    config.write_text(f'state_dir = "{state}"\ntrust_dir = "{trust}"\n[api]\nlisten = "127.0.0.1:{port}"\n'
                      f"[backend]\nthreads = {threads}\nspin_wait = {str(spin_wait).lower()}\n")
    return config, port, state


def _bodies() -> dict[str, tuple[bytes, dict[str, str]]]:
    """The same [1,3,48,192] tensor as an OIP JSON request and as a binary-extension request."""
    x = np.random.default_rng(0).standard_normal((1, 3, 48, 192)).astype(np.float32)
    as_json = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                      "data": x.ravel().tolist()}]}).encode()
    header = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    return {
        "binary": (header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                          "Content-Type": "application/octet-stream"}),
        "json": (as_json, {"Content-Type": "application/json"}),
    }


def _request(conn: http.client.HTTPConnection, request: tuple[bytes, dict[str, str]]) -> float:
    body, headers = request
    t0 = time.perf_counter()
    conn.request("POST", "/v2/models/ppocr/infer", body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise RuntimeError(f"request failed: {response.status}")
    return (time.perf_counter() - t0) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="backend.threads (0 = runtime default)")
    parser.add_argument("--spin-wait", action="store_true", help="backend.spin_wait = true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config, port, _ = _setup(work, args.threads, args.spin_wait)
        proc = subprocess.Popen([sys.executable, "-m", "edge_runtime", "serve", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                    conn.request("GET", "/v2/health/ready")
                    if conn.getresponse().status == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("daemon did not become ready")
                time.sleep(0.2)
            time.sleep(2.0)  # let start-up work settle
            cpu0, t0 = _proc_cpu_seconds(proc.pid), time.monotonic()
            time.sleep(args.idle_seconds)
            cpu = (_proc_cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0) * 100
            rss = _rss_mb(proc.pid)
            bare = int(subprocess.run([sys.executable, "-c", _BARE, str(fetch("ppocr_cls"))], capture_output=True,
                                      text=True, check=True).stdout.strip()) / 1024
            print(f"idle daemon, ppocr cls loaded, API up, no traffic (backend.threads = {args.threads}, "
                  f"spin_wait = {args.spin_wait})")
            print(f"{'metric':34} {'value':>10}  target")
            print(f"{'CPU over ' + str(args.idle_seconds) + ' s (% of one core)':34} {cpu:10.3f}  < 1 %")
            print(f"{'daemon RSS (MB)':34} {rss:10.1f}")
            print(f"{'bare script RSS (MB)':34} {bare:10.1f}")
            print(f"{'daemon - bare (MB)':34} {rss - bare:10.1f}  <= 30 MB")

            target = 1
            for encoding, request in _bodies().items():
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                steady = [_request(conn, request) for _ in range(400)]
                p99 = float(np.percentile(steady[50:], 99))
                stop = threading.Event()
                samples: list[tuple[float, float]] = []

                def client(req: tuple[bytes, dict[str, str]] = request, done: threading.Event = stop,
                           out: list[tuple[float, float]] = samples) -> None:
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    while not done.is_set():
                        out.append((time.monotonic(), _request(c, req)))

                thread = threading.Thread(target=client, daemon=True)
                thread.start()
                print(f"\nswap pause, {encoding} tensor requests back to back; steady p99 {p99:.2f} ms")
                print(f"{'swap':5} {'to':>3} {'max in window (ms)':>19} {'x steady p99':>13}")
                worst = 0.0
                for i in range(args.swaps):
                    target = 3 - target
                    subprocess.run([sys.executable, "-m", "edge_runtime", "models", "activate", "ppocr",
                                    str(target), "--no-gates", "--config", str(config)], check=True,
                                   capture_output=True)
                    start = time.monotonic()
                    os.kill(proc.pid, signal.SIGHUP)
                    time.sleep(2.0)
                    peak = max(ms for t, ms in samples if t >= start)
                    worst = max(worst, peak)
                    print(f"{i + 1:5} {target:3} {peak:19.2f} {peak / p99:13.2f}")
                stop.set()
                thread.join(10)
                print(f"worst swap pause {worst:.2f} ms = {worst / p99:.2f} x steady p99 (target < 2x)")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())

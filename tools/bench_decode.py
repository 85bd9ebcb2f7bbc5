"""Peak memory of concurrent big-image decodes through the inference API, with and without the decode budget.

Usage: python tools/bench_decode.py [--megapixels 49] [--clients 8]

For each ``[limits] max_decode_bytes`` setting a fresh daemon process (spawn)
serves ppocr cls (a real bundle, packed and installed like ``bundle pack`` +
``models install``). After one small warm-up image (OpenCV loaded), ``--clients``
threads here each POST the same PNG of ``--megapixels`` at once. The table
gives the daemon's RSS before, its peak RSS (VmHWM) after, the statuses, the
slowest reply, and the budget's own peak reservation.

"unbounded" is a budget of 1 TB: every decode runs at once, as before the
budget existed. The PNG is a gradient, so it is small on the wire and still
decodes to width x height x 3 bytes.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import math
import multiprocessing
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import cv2
import numpy as np
from ppocr_bench_kit import install_ppocr_classifier

from edge_runtime.api_server import ApiServer
from edge_runtime.config import ApiConfig, BackendConfig, Config, Limits
from edge_runtime.decode_budget import shared_budget
from edge_runtime.metrics import Metrics
from edge_runtime.model_store import ModelStore
from edge_runtime.preprocess import decode_cost
from edge_runtime.serving import InferenceService

NAME = "ppocr-cls"
INFER = f"/v2/models/{NAME}/infer"
MB = 1 << 20


def _config(work: Path, max_decode_bytes: int) -> Config:
    return Config(state_dir=work / "state", trust_dir=work / "trust",
                  limits=Limits(max_decode_bytes=max_decode_bytes),
                  backend=BackendConfig(providers=("CPUExecutionProvider",), threads=1))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _daemon(pipe: Connection, work: str, max_decode_bytes: int, max_request_bytes: int) -> None:
    config = _config(Path(work), max_decode_bytes)
    service = InferenceService(Metrics())
    service.add_slot(NAME).swap(ModelStore(config).load(NAME))
    api = ApiConfig(listen="127.0.0.1:0", max_request_bytes=max_request_bytes, max_concurrency=16)
    with ApiServer(api, service, service.metrics) as server:
        pipe.send(server.address)
        while pipe.recv() == "mem":
            budget = shared_budget(max_decode_bytes)
            pipe.send((_status_kb("VmRSS") * 1024, _status_kb("VmHWM") * 1024, budget.peak))


def _png(megapixels: float) -> bytes:
    side = int(math.sqrt(megapixels * 1e6))
    row = np.linspace(0, 255, side, dtype=np.uint8)
    ok, png = cv2.imencode(".png", np.broadcast_to(row[None, :, None], (side, side, 3)).copy(),
                           [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise SystemExit("cannot encode the PNG")
    return png.tobytes()


def _post(address: tuple[str, int], body: bytes) -> tuple[int, float]:
    conn = http.client.HTTPConnection(*address, timeout=300)
    t0 = time.perf_counter()
    conn.request("POST", INFER, body, {"Content-Type": "image/png"})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status, time.perf_counter() - t0


def _run(work: Path, label: str, max_decode_bytes: int, png: bytes, clients: int) -> list[str]:
    ctx = multiprocessing.get_context("spawn")  # a clean process per setting: VmHWM is per process
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_daemon, args=(child, str(work), max_decode_bytes, len(png) + MB), daemon=True)
    proc.start()
    try:
        address = parent.recv()
        _post(address, _png(0.1))  # warm-up: OpenCV imported, model run once
        parent.send("mem")
        rss_before, _, _ = parent.recv()
        results: list[tuple[int, float]] = []
        barrier = threading.Barrier(clients)

        def client() -> None:
            barrier.wait()
            results.append(_post(address, png))

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        parent.send("mem")
        _, hwm, peak_reserved = parent.recv()
        parent.send("stop")
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    statuses = collections.Counter(status for status, _ in results)
    shown = " ".join(f"{n}x{status}" for status, n in sorted(statuses.items()))
    return [label, f"{rss_before / MB:.0f}", f"{hwm / MB:.0f}", f"{(hwm - rss_before) / MB:.0f}", shown,
            f"{max(s for _, s in results):.2f}", f"{peak_reserved / MB:.0f}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=49.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    png = _png(args.megapixels)
    decoded, cost = int(math.sqrt(args.megapixels * 1e6)) ** 2 * 3, decode_cost(png)
    settings = [("unbounded (as before)", 1 << 40), (f"{(cost + MB) // MB} MB (one at a time)", cost + MB),
                (f"{(2 * cost + MB) // MB} MB (two at a time)", 2 * cost + MB),
                (f"default {Limits().max_decode_bytes // MB} MB", Limits().max_decode_bytes)]
    print(f"{args.clients} concurrent POSTs of a {args.megapixels:g} MP PNG ({len(png) / MB:.1f} MB on the wire, "
          f"{decoded / MB:.0f} MB decoded, {cost / MB:.0f} MB reserved each) to ppocr cls; "
          "peak = the daemon process's VmHWM")
    header = ["max_decode_bytes", "RSS before MB", "peak RSS MB", "peak - before MB", "statuses",
              "slowest s", "budget peak MB"]
    rows = [header]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        install_ppocr_classifier(work, _config(work, Limits().max_decode_bytes), NAME)
        for label, max_decode_bytes in settings:
            rows.append(_run(work, label, max_decode_bytes, png, args.clients))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths,
                                                                                                        strict=True))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

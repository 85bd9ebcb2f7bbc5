"""Offline spool + forwarder costs: drain rate to a real mosquitto, append cost, telemetry CPU.

Usage: python tools/bench_spool.py [--messages 20000] [--appends 5000] [--telemetry 300]

1. Drain: ``--messages`` telemetry-sized messages are spooled, then the
   forwarder drains them over the daemon's MqttLink to a local mosquitto
   (ephemeral loopback port, default ``max_queued_messages 1000``) while a QoS 1
   subscriber in another process counts them. Once with ``flush_rate`` 1e6 (the
   ceiling) and once at the default 3000/s. Reported: drain msgs/s (until the
   last PUBACK and delete), what the subscriber received (mosquitto drops QoS 1
   messages beyond its queue for a subscriber that falls behind) and its rate.
2. Append: microseconds per ``Spool.append`` of a telemetry document with
   ``synchronous`` NORMAL (the default) and FULL (fsync per append).
3. Telemetry: process CPU time to sample system stats, snapshot metrics, build
   the JSON, spool it, publish it and delete it after its PUBACK (the forwarder
   thread and the link's threads included), as % of one core at one message
   per 10 s; plus the idle CPU of link + forwarder with nothing to send.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge_runtime.config.model import MqttConfig
from edge_runtime.mqtt.forwarder import Forwarder
from edge_runtime.mqtt.link import MqttLink
from edge_runtime.mqtt.spool import Spool
from edge_runtime.telemetry.metrics import Metrics
from edge_runtime.telemetry.report import SystemStats, build_telemetry

# The same real-broker fixture the tests use (tests/ is not a package, hence the path).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
Broker: Any = importlib.import_module("mqtt_broker").Broker

TOPIC = "edge/bench/telemetry"


def _subscriber(port: int, ready: Any, conn: Connection) -> None:
    """Child process: a QoS 1 subscriber that counts; answers 'stats' requests with (count, first, last)."""
    state = {"n": 0, "first": 0.0, "last": 0.0}

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        state["first"] = state["first"] or now
        state["n"], state["last"] = state["n"] + 1, now

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-sub", protocol=MQTTProtocolVersion.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *a: ready.set()
    client.on_connect = lambda c, *a: c.subscribe(TOPIC, qos=1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    while True:
        request = conn.recv()
        if request == "stop":
            break
        conn.send((state["n"], state["first"], state["last"]))
        if request == "reset":
            state.update(n=0, first=0.0, last=0.0)
    client.loop_stop()
    client.disconnect()


def _metrics() -> Metrics:
    metrics = Metrics()
    for name in ("ppocr-cls", "face-detect"):
        metrics.set_version(name, 3)
        for i in range(1024):
            metrics.observe(name, 1.0 + (i % 50) / 10)
    metrics.drop("cam0", 12)
    metrics.queue_depth("cam0", 1)
    return metrics


def _document(seq: int, metrics: Metrics, stats: SystemStats, spool_stats: dict[str, Any]) -> bytes:
    return build_telemetry(seq, device="bench", metrics_snapshot=metrics.snapshot(),
                           models={"ppocr-cls": 3, "face-detect": 3}, stats=dict(stats.sample()), spool=spool_stats)


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def _ask(conn: Connection, request: str) -> tuple[int, float, float]:
    conn.send(request)
    count, first, last = conn.recv()
    return int(count), float(first), float(last)


def _drain_once(work: Path, broker: Any, n: int, payload: bytes, conn: Connection, rate: float) -> tuple[str, ...]:
    spool = Spool(work / f"drain-{int(rate)}" / "spool.db", max_messages=200_000, max_bytes=1 << 30)
    for _ in range(n):
        spool.append(TOPIC, lambda s: payload)
    config = MqttConfig(enabled=True, host="127.0.0.1", port=broker.port, flush_rate=rate)
    link = MqttLink(config, f"bench-{int(rate)}")
    forwarder = Forwarder(spool, link, flush_rate=rate, max_inflight=config.max_inflight,
                          connected=lambda: link.connected)
    link.start()
    _wait(lambda: link.connected, 10)
    _ask(conn, "reset")
    start = time.monotonic()
    forwarder.start()
    _wait(lambda: spool.pending == 0, 120)
    drained = time.monotonic() - start
    _wait(lambda: _ask(conn, "stats")[0] >= n, 3)
    got, first, last = _ask(conn, "stats")
    forwarder.stop()
    link.stop()
    spool.close()
    sub_rate = (got - 1) / (last - first) if got > 1 and last > first else 0.0
    label = "ceiling (1e6)" if rate > 1e5 else f"{rate:.0f}"
    return (label, f"{n / drained:,.0f}", f"{got:,}/{n:,}", f"{sub_rate:,.0f}")


def bench_append(work: Path, n: int, payload: bytes) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for mode, count in (("NORMAL", n), ("FULL", max(200, n // 10))):
        spool = Spool(work / f"append-{mode}" / "spool.db", max_messages=1_000_000, max_bytes=1 << 30,
                      synchronous=mode)
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            spool.append(TOPIC, lambda s: payload)
            times.append((time.perf_counter() - t0) * 1e6)
        cycle = []
        for _ in range(min(count, 1000)):  # steady state online: append, then delete after PUBACK
            t0 = time.perf_counter()
            seq = spool.append(TOPIC, lambda s: payload)
            spool.ack(seq)
            cycle.append((time.perf_counter() - t0) * 1e6)
        spool.close()
        times.sort()
        rows.append((mode, f"{count}", f"{statistics.median(times):.0f}", f"{times[int(len(times) * 0.99)]:.0f}",
                     f"{statistics.fmean(times):.0f}", f"{statistics.median(cycle):.0f}"))
    return rows


def bench_telemetry(work: Path, broker: Any, n: int, interval: float) -> list[tuple[str, ...]]:
    spool = Spool(work / "telemetry" / "spool.db", max_messages=100_000, max_bytes=64 << 20)
    config = MqttConfig(enabled=True, host="127.0.0.1", port=broker.port)
    link = MqttLink(config, "bench-telemetry")
    forwarder = Forwarder(spool, link, flush_rate=config.flush_rate, max_inflight=config.max_inflight,
                          connected=lambda: link.connected)
    link.on_connect(forwarder.wake)
    link.start()
    _wait(lambda: link.connected, 10)
    forwarder.start()
    metrics, stats = _metrics(), SystemStats(work)
    size = len(_document(1, metrics, stats, spool.stats()))
    time.sleep(0.5)
    idle_wall, idle_cpu = time.monotonic(), time.process_time()
    time.sleep(5.0)
    idle = (time.process_time() - idle_cpu) / (time.monotonic() - idle_wall)
    cpu0 = time.process_time()
    wall0 = time.monotonic()
    for _ in range(n):
        spool.append(TOPIC, partial(_document, metrics=metrics, stats=stats,
                                    spool_stats=spool.stats()))  # stats before append: build runs under its lock
        forwarder.wake()
        _wait(lambda: spool.pending == 0, 10)
    wall = time.monotonic() - wall0
    # The link's threads keep ticking meanwhile: take their idle share out.
    per_message = (time.process_time() - cpu0 - idle * wall) / n
    forwarder.stop()
    link.stop()
    spool.close()
    return [
        ("telemetry document (bytes)", f"{size}"),
        ("CPU per telemetry message (ms)", f"{per_message * 1e3:.3f}"),
        (f"% of one core at one per {interval:g} s", f"{per_message / interval * 100:.4f}"),
        ("idle link + forwarder (% of one core)", f"{idle * 100:.3f}"),
    ]


def _table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--appends", type=int, default=5_000)
    parser.add_argument("--telemetry", type=int, default=300)
    parser.add_argument("--interval", type=float, default=10.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-spool-") as tmp:
        work = Path(tmp)
        payload = _document(123456, _metrics(), SystemStats(work), {"pending": 0, "dropped": 0})
        with Broker(work / "broker") as broker:
            ready = multiprocessing.Event()
            parent, child = multiprocessing.Pipe()
            sub = multiprocessing.Process(target=_subscriber, args=(broker.port, ready, child), daemon=True)
            sub.start()
            if not ready.wait(10):
                raise SystemExit("subscriber did not subscribe")
            try:
                drain = [_drain_once(work, broker, args.messages, payload, parent, rate) for rate in (1e6, 3000.0)]
                telemetry = bench_telemetry(work, broker, args.telemetry, args.interval)
            finally:
                parent.send("stop")
                sub.join(5)
        append = bench_append(work, args.appends, payload)
    _table(f"(a) drain {args.messages:,} spooled messages of {len(payload)} B, QoS 1, max_inflight 50, "
           "mosquitto max_queued_messages 1000", ("flush_rate", "drain msg/s", "subscriber got", "subscriber msg/s"),
           drain)
    _table(f"(b) Spool.append of {len(payload)} B (microseconds)",
           ("synchronous", "appends", "median", "p99", "mean", "append+ack median"), append)
    _table("(c) telemetry cost", ("metric", "value"), telemetry)
    return 0


if __name__ == "__main__":
    sys.exit(main())

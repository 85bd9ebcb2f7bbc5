"""Fleet commands cannot be replayed from the broker: a real `edge-runtime serve` against a real mosquitto.

Retained commands never run (first connect and reconnects), unsigned commands have
an age limit, a flood is shed without stalling the device or its log, replies
wait for the link, and an id reused for another command is called out.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cli_helpers import cli
from daemon_helpers import Serve, pack_onnx, ppocr_input, wait_for, write_config
from mqtt_broker import Broker, mosquitto_binary
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from test_mqtt_daemon import DEVICE, TOP, Operator, Watcher, _try, mqtt_config

from edge_runtime._util.log_limit import RepeatFilter
from edge_runtime.commands.dispatch import CLOCK_FLOOR, Dispatcher
from edge_runtime.commands.ledger import CommandLedger
from edge_runtime.commands.parse import Command, Reply

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")
Zoo = Callable[[str], Path]


def start_device(tmp_path: Path, keys: dict[str, Path], zoo: Zoo, broker: Broker, extra: str = "",
                 versions: tuple[int, ...] = (1, 2), sections: str = "") -> Serve:
    config, state, port = write_config(tmp_path / "device", keys["trust_dir"],
                                       extra=mqtt_config(broker, extra) + sections, top=TOP)
    for v in versions:
        cli("models", "install", pack_onnx(tmp_path / f"v{v}.bundle", zoo("ppocr_cls"), v, keys["a"], tmp_path),
            "--config", config)
    serve = Serve(config, state, port).start()
    serve.wait_ready()
    return serve


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker") as b:
        yield b


def command(args: dict[str, Any] | None = None, *, ts: float | None = None, cid: str | None = None) -> bytes:
    return json.dumps({"id": cid or uuid.uuid4().hex[:12], "ts": time.time() if ts is None else ts,
                       "args": args or {}}).encode()


def publish(broker: Broker, topic: str, payload: bytes, *, retain: bool = False) -> None:
    client = broker.client(f"pub-{uuid.uuid4().hex[:6]}")
    client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def kick(broker: Broker, client_id: str) -> None:
    """Take over the daemon's client id: the broker drops the daemon's connection, which reconnects."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    time.sleep(0.3)
    client.disconnect()
    client.loop_stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_retained_commands_never_run_and_stale_unsigned_ones_are_refused(
        tmp_path: Path, keys: dict[str, Path], zoo: Zoo, broker: Broker, protocol: str) -> None:
    # Fresh timestamps: only the retain flag can stop these (the age limit would let them through).
    publish(broker, "edge/all/cmd/rollback", command({"model": "ppocr-cls"}), retain=True)
    publish(broker, f"edge/{DEVICE}/cmd/rollback", command({"model": "ppocr-cls"}), retain=True)
    serve = start_device(tmp_path, keys, zoo, broker, f'protocol = "{protocol}"\n')
    op = Operator(broker)
    try:
        def refused() -> int:
            return int(op.command("status")["data"]["commands"]["refused_retained"])

        wait_for(lambda: refused() >= 2, 20, "both retained commands refused on the first connect")
        assert serve.served_version() == 2
        for n in (4, 6):  # each reconnect replays the retained store: refused every time
            kick(broker, f"edge-{DEVICE}")
            wait_for(lambda n=n: refused() >= n, 30, f"retained commands refused again after reconnect ({n})")
            assert serve.served_version() == 2
        assert "refused a retained command on edge/all/cmd/rollback" in serve.stderr()
        # Unsigned commands have an age limit too: a year-old or future ts is refused, a fresh one runs.
        for ts in (time.time() - 365 * 86400, time.time() + 3600):
            cid = uuid.uuid4().hex[:12]
            reply = op.send("rollback", command({"model": "ppocr-cls"}, ts=ts, cid=cid), reply_id=cid)
            assert reply is not None and reply["ok"] is False and "expired timestamp" in reply["message"], reply
        assert serve.served_version() == 2
        assert op.command("rollback", {"model": "ppocr-cls"})["ok"] and serve.served_version() == 1
    finally:
        op.close()
        serve.kill9()


def test_reusing_an_id_with_different_args_is_called_out_not_answered_with_the_first_reply(
        tmp_path: Path, keys: dict[str, Path], zoo: Zoo, broker: Broker) -> None:
    serve = start_device(tmp_path, keys, zoo, broker)
    op = Operator(broker)
    try:
        cid = "reused-id"
        first = op.send("rollback", command({"model": "ppocr-cls", "version": 1}, cid=cid), reply_id=cid)
        assert first is not None and first["ok"] and serve.served_version() == 1
        op.replies.pop(cid)
        same = op.send("rollback", command({"model": "ppocr-cls", "version": 1}, cid=cid), reply_id=cid)
        assert same is not None and same["ok"] and same["data"]["duplicate"] is True and "conflict" not in same["data"]
        op.replies.pop(cid)
        other = op.send("rollback", command({"model": "ppocr-cls", "version": 2}, cid=cid), reply_id=cid)
        assert other is not None and other["ok"] is False, other
        assert other["data"] == {"duplicate": True, "conflict": "id reused with different args"}
        assert "new id" in other["message"] and serve.served_version() == 1
    finally:
        op.close()
        serve.kill9()


def test_flood_of_pings_is_shed_and_an_operator_is_answered_right_after(
        tmp_path: Path, keys: dict[str, Path], zoo: Zoo, broker: Broker) -> None:
    serve = start_device(tmp_path, keys, zoo, broker, versions=(1,))
    op = Operator(broker)
    flooder = broker.client("flooder")
    try:
        assert op.command("ping")["ok"]
        before = len(serve.stderr())
        now = time.time()
        infos = [flooder.publish(f"edge/{DEVICE}/cmd/ping", b'{"id":"f%d","ts":%f}' % (i, now), qos=0)
                 for i in range(20_000)]  # a bounded burst on loopback; the loop ends by itself
        code, _ = serve.infer("ppocr-cls", ppocr_input())
        assert code == 200  # inference is served while the flood arrives
        for info in infos[-100:]:
            info.wait_for_publish(30)
        flood_end = time.monotonic()
        # An operator whose ping met the tail of the flood (dropped, no reply) asks again each second.
        reply = wait_for(lambda: _try(lambda: op.command("ping", timeout=1.0)), 30, "an operator ping answered")
        answered = time.monotonic() - flood_end
        assert reply["ok"], reply
        assert answered < 5.0, f"operator ping answered {answered:.1f} s after the flood"
        counts = op.command("status")["data"]["commands"]
        # How much of a QoS 0 burst reaches the device is the broker's business (it drops what the device
        # cannot read in time: 8,244 of 20,000 once on a loaded machine); what the device does with what it
        # sees is the point: it sheds nearly all of it at intake.
        seen = counts["dropped_rate"] + counts["accepted"]
        assert seen > 2_000 and counts["dropped_rate"] > 0.9 * seen, counts
        code, _ = serve.infer("ppocr-cls", ppocr_input())
        assert code == 200  # inference still serves
        flood_log = serve.stderr()[before:]
        assert len(flood_log) < 8000, f"{len(flood_log)} bytes of log for the flood:\n{flood_log[-2000:]}"
    finally:
        flooder.disconnect()
        flooder.loop_stop()
        op.close()
        serve.kill9()


def test_a_reply_ready_while_the_broker_is_down_is_sent_when_it_is_back(
        tmp_path: Path, keys: dict[str, Path], zoo: Zoo) -> None:
    from http_fault_server import FaultServer, Route

    broker = Broker(tmp_path / "broker", persistence=True).start()
    serve = start_device(tmp_path, keys, zoo, broker, versions=(1,),
                         sections="[ota]\nallow_http = true\nretries = 0\n")
    # A persistent subscriber: the broker keeps its subscription across the restart and queues for it.
    watcher = Watcher(broker, f"edge/{DEVICE}/reply/#", persistent=True)
    # A bundle server that sends one byte every 0.1 s: the update runs about 8 s, across the outage.
    with FaultServer({"/slow.bundle": Route(body=b"x" * 80, fault="drip", drip_seconds=0.1)}) as server:
        try:
            wait_for(lambda: "mqtt: connected" in serve.stderr(), 20, "daemon connected")
            # The broker autosaves every second: wait until a save that came after the subscription is on disk
            # (a fixed sleep was too short on a loaded machine; the reply then had no queue to wait in).
            subscribed = time.time()
            db = broker.dir / "mosquitto.db"
            wait_for(lambda: db.exists() and db.stat().st_mtime > subscribed + 0.1, 20, "the subscription saved")
            publish(broker, f"edge/{DEVICE}/cmd/update",
                    command({"url": server.url("/slow.bundle")}, cid="slow-update"))
            wait_for(lambda: server.seen("/slow.bundle"), 15, "the update to start downloading")
            broker.kill()
            wait_for(lambda: "reply to edge/dev1/reply/slow-update waits for the MQTT link" in serve.stderr(), 30,
                     "the update's reply kept while the link is down")
            broker.start()
            reply = wait_for(lambda: [json.loads(m.payload) for m in watcher.on("/reply/slow-update")], 30,
                             "the kept reply after the broker came back")[0]
            assert reply["id"] == "slow-update" and reply["ok"] is False  # "x" * 80 is no bundle
            assert "slow-update lost" not in serve.stderr()
        finally:
            watcher.close()
            serve.kill9()
            broker.stop()


# ---------------------------------------------------------------------- pieces with injected faults


def test_device_clock_before_the_floor_answers_only_ping_and_status(tmp_path: Path) -> None:
    ledger = CommandLedger(tmp_path / "commands.db", 3600.0)
    ran: list[str] = []

    def handler(c: Command) -> Reply:
        ran.append(c.verb)
        return Reply(True, c.verb)

    clock = 100.0  # a Pi without RTC, before NTP: 1970
    dispatcher = Dispatcher({v: handler for v in ("ping", "status", "rollback")}, ledger=ledger, auth=None,
                            signed_verbs=(), max_bytes=1 << 16, max_depth=32, device="d", max_age_seconds=300.0,
                            clock=lambda: clock)
    assert dispatcher.handle("ping", command(ts=1_800_000_000.0)).ok
    assert dispatcher.handle("status", command(ts=50.0)).ok
    reply = dispatcher.handle("rollback", command({"model": "m"}, ts=100.0))
    assert not reply.ok and "clock is not set" in reply.message and ran == ["ping", "status"]
    clock = CLOCK_FLOOR + 1000  # synchronised: age checks apply and the command runs
    assert dispatcher.handle("rollback", command({"model": "m"}, ts=CLOCK_FLOOR + 990)).ok
    assert ran == ["ping", "status", "rollback"]
    ledger.close()


def test_repeat_filter_folds_repeats_into_one_summary_per_window() -> None:
    now = [0.0]
    seen: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = ListHandler()
    repeat = RepeatFilter(handler, burst=3, window_seconds=10.0, clock=lambda: now[0])
    handler.addFilter(repeat)
    log = logging.getLogger("edge_runtime.test_flood")
    log.addHandler(handler)
    log.propagate = False
    try:
        for i in range(10_000):
            log.warning("dropped message %d", i)
        log.warning("something else")
        assert seen == ["dropped message 0", "dropped message 1", "dropped message 2", "something else"]
        assert repeat.holding.is_set()  # wakes the flush thread
        now[0] = 11.0
        repeat.flush()
        assert seen[-1] == "dropped message 9999 (repeated 9,997 times in the last 10 s)"
        assert not repeat.holding.is_set()  # nothing held back: the flush thread sleeps until there is
        log.warning("dropped message %d", 1)  # a new window: passes again
        assert seen[-1] == "dropped message 1" and len(seen) == 6
    finally:
        log.removeHandler(handler)
        log.propagate = True

"""Forwarder: window, ack-after-PUBACK, resend from the first unacknowledged, pacing; real mosquitto outages."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from mqtt_broker import Broker, Collector, mosquitto_binary
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge_runtime.errors import LinkError
from edge_runtime.mqtt.forwarder import Forwarder, TokenBucket
from edge_runtime.mqtt.spool import Spool

TOPIC = "edge/dev1/telemetry"
# The collector runs in this process (sharing the GIL with the forwarder and the link): at 3000/s
# it falls 1000 messages behind and mosquitto drops QoS 1 messages for it (max_queued_messages).
RATE = 1500.0
needs_mosquitto = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def fill(spool: Spool, n: int, topic: str = TOPIC) -> None:
    for _ in range(n):
        spool.append(topic, lambda s: json.dumps({"seq": s}).encode())


@pytest.fixture()
def spool(tmp_path: Path) -> Iterator[Spool]:
    with Spool(tmp_path / "spool" / "spool.db", max_messages=100_000, max_bytes=1 << 26) as s:
        yield s


# ------------------------------------------------------------------ with a fake link


class FakeDelivery:
    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.acked = threading.Event()
        self.failed = False

    def wait(self, timeout: float) -> bool:
        return not self.failed and self.acked.wait(timeout)


class FakeLink:
    """A Publisher whose PUBACKs the test hands out; ``up`` False makes publish raise LinkError."""

    def __init__(self, auto_ack: bool = False, refuse: int = 0) -> None:
        self.up = True
        self.auto_ack = auto_ack
        self.refuse = refuse  # the broker refuses this seq (failed delivery while connected)
        self.sent: list[FakeDelivery] = []
        self.lock = threading.Lock()

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> FakeDelivery:
        if not self.up:
            raise LinkError("not connected")
        assert qos == 1 and not retain
        delivery = FakeDelivery(json.loads(payload)["seq"])
        delivery.failed = delivery.seq == self.refuse
        if self.auto_ack:
            delivery.acked.set()
        with self.lock:
            self.sent.append(delivery)
        return delivery

    def seqs(self) -> list[int]:
        with self.lock:
            return [d.seq for d in self.sent]

    def cut(self) -> None:
        """Connection lost, as MqttLink reports it: pending deliveries fail."""
        with self.lock:
            self.up = False
            for d in self.sent:
                d.failed = d.failed or not d.acked.is_set()

    def ack_through(self, seq: int) -> None:
        with self.lock:
            for d in self.sent:
                if d.seq <= seq:
                    d.acked.set()


def test_window_and_ack_only_after_puback(spool: Spool) -> None:
    fill(spool, 100)
    link = FakeLink()
    fwd = Forwarder(spool, link, flush_rate=1e6, max_inflight=8, connected=lambda: link.up)
    fwd.start()
    try:
        wait_for(lambda: len(link.sent) == 8, 5, "a full window")
        time.sleep(0.3)
        assert link.seqs() == list(range(1, 9)), "published past max_inflight"
        assert spool.pending == 100, "acked before any PUBACK"
        link.ack_through(3)
        wait_for(lambda: len(link.sent) == 11, 5, "the window to slide by 3")
        wait_for(lambda: spool.pending == 97, 5, "3 rows deleted")
        assert [m.seq for m in spool.peek(1)] == [4]
        link.auto_ack = True
        link.ack_through(11)
        wait_for(lambda: spool.pending == 0, 10, "the spool to drain")
        assert link.seqs() == list(range(1, 101))
        assert fwd.stats.acked == 100
    finally:
        fwd.stop()


def test_link_failure_resends_from_first_unacknowledged(spool: Spool) -> None:
    fill(spool, 50)
    link = FakeLink()  # like a fresh client per connection: it never re-sends the old window itself
    fwd = Forwarder(spool, link, flush_rate=1e6, max_inflight=10, connected=lambda: link.up, resume_grace=0.3)
    fwd.start()
    try:
        wait_for(lambda: len(link.sent) == 10, 5, "a full window")
        link.ack_through(4)
        wait_for(lambda: spool.pending == 46, 5, "seq 1-4 deleted")
        link.up = False  # the broker went away; 5..10 never got their PUBACK
        wait_for(lambda: fwd.stats.aborted >= 1, 5, "the drain to stop")
        assert [m.seq for m in spool.peek(1)] == [5]
        link.up, link.auto_ack = True, True
        first_after = len(link.sent)
        fwd.wake()
        wait_for(lambda: spool.pending == 0, 10, "the spool to drain after reconnect")
        resent = link.seqs()[first_after:]
        assert resent == list(range(5, 51)), "resend must start at the first unacknowledged seq, in order"
    finally:
        fwd.stop()


def test_window_the_link_resends_itself_is_not_published_again(spool: Spool) -> None:
    fill(spool, 30)
    link = FakeLink()
    fwd = Forwarder(spool, link, flush_rate=1e6, max_inflight=10, connected=lambda: link.up, resume_grace=5.0)
    fwd.start()
    try:
        wait_for(lambda: len(link.sent) == 10, 5, "a full window")
        link.ack_through(2)
        wait_for(lambda: spool.pending == 28 and len(link.sent) == 12, 5, "seq 1-2 deleted, 11-12 sent")
        link.up = False
        wait_for(lambda: fwd.stats.aborted >= 1, 5, "the drain to stop")
        link.up = True
        fwd.wake()
        time.sleep(0.3)
        assert len(link.sent) == 12, "newer messages went out before the old window was settled"
        link.auto_ack = True
        link.ack_through(12)  # what paho does: re-send its window on reconnect and get the PUBACKs
        wait_for(lambda: spool.pending == 0, 5, "the drain to finish")
        assert link.seqs() == list(range(1, 31)), "no duplicates, no reordering"
    finally:
        fwd.stop()


def test_failed_window_is_republished_at_once_after_reconnect(spool: Spool) -> None:
    fill(spool, 30)
    link = FakeLink()
    fwd = Forwarder(spool, link, flush_rate=1e6, max_inflight=10, connected=lambda: link.up, resume_grace=60.0)
    fwd.start()
    try:
        wait_for(lambda: len(link.sent) == 10, 5, "a full window")
        link.ack_through(3)
        wait_for(lambda: spool.pending == 27 and len(link.sent) == 13, 5, "seq 1-3 deleted, 11-13 sent")
        link.cut()
        wait_for(lambda: fwd.stats.aborted >= 1, 5, "the drain to stop")
        link.up, link.auto_ack = True, True
        fwd.wake()
        wait_for(lambda: spool.pending == 0, 3, "the drain to finish without waiting out resume_grace")
        assert link.seqs()[13:] == list(range(4, 31)), "re-publish must start at the first unacknowledged seq"
        assert fwd.stats.refused == 0
    finally:
        fwd.stop()


def test_a_message_the_broker_keeps_refusing_is_given_up(spool: Spool) -> None:
    fill(spool, 6)
    link = FakeLink(auto_ack=True, refuse=3)
    fwd = Forwarder(spool, link, flush_rate=1e6, max_inflight=1, connected=lambda: link.up)
    fwd.start()
    try:
        wait_for(lambda: spool.pending == 0, 5, "the drain to get past the refused message")
        assert link.seqs() == [1, 2, 3, 3, 3, 4, 5, 6]
        assert fwd.stats.refused == 1
    finally:
        fwd.stop()


def test_missing_puback_times_out_and_resends(spool: Spool) -> None:
    fill(spool, 3)
    link = FakeLink()
    fwd = Forwarder(spool, link, flush_rate=1e6, max_inflight=10, connected=lambda: True, ack_timeout=0.3)
    fwd.start()
    try:
        wait_for(lambda: link.seqs()[:4] == [1, 2, 3, 1], 5, "a resend after the ack timeout")
        link.auto_ack = True
        link.ack_through(3)
        wait_for(lambda: spool.pending == 0, 5, "the spool to drain")
    finally:
        fwd.stop()


def test_idle_blocks_and_wakes(spool: Spool) -> None:
    calls = []

    def connected() -> bool:
        calls.append(time.monotonic())
        return True

    link = FakeLink(auto_ack=True)
    fwd = Forwarder(spool, link, flush_rate=1e6, max_inflight=10, connected=connected)
    fwd.start()
    try:
        time.sleep(2.5)
        assert len(calls) <= 4, f"idle loop polled {len(calls)} times in 2.5 s"
        fill(spool, 1)
        t0 = time.monotonic()
        fwd.wake()
        wait_for(lambda: spool.pending == 0, 2, "the woken forwarder to send")
        assert time.monotonic() - t0 < 0.5, "wake() did not cut the idle wait short"
    finally:
        fwd.stop()
    assert not fwd.alive


def test_token_bucket_paces_with_injected_clock() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    bucket = TokenBucket(rate=100.0, burst=5, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        bucket.take()
    assert slept == [], "a burst of 5 is allowed"
    for _ in range(100):
        bucket.take()
    assert now[0] - 100.0 == pytest.approx(1.0, abs=1e-6), "100 more takes need one second at 100/s"
    now[0] += 10.0  # idle for a while: the allowance does not grow past the burst
    for _ in range(5):
        bucket.take()
    before = len(slept)
    bucket.take()
    assert len(slept) == before + 1


# ------------------------------------------------------------------ with a real mosquitto


class PahoLink:
    """The smallest real Publisher: paho-mqtt QoS 1 over loopback (the daemon's MqttLink lives elsewhere)."""

    def __init__(self, port: int, reconnect_after: float = 0.05) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fwd-{uuid.uuid4().hex[:8]}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.max_inflight_messages_set(65535)  # the forwarder owns the window
        self.client.reconnect_delay_set(reconnect_after, max(reconnect_after, 0.3))
        self.on_connect: list[Callable[[], None]] = []
        self.client.on_connect = lambda *a: [fn() for fn in self.on_connect]
        self.published_at: list[float] = []
        self.infos: list[tuple[int, mqtt.MQTTMessageInfo]] = []
        self.client.connect_async("127.0.0.1", port, keepalive=5)
        self.client.loop_start()

    def connected(self) -> bool:
        return bool(self.client.is_connected())

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> PahoDelivery:
        if not self.client.is_connected():
            raise LinkError("MQTT link is down")
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise LinkError(f"publish failed: {mqtt.error_string(info.rc)}")
        self.published_at.append(time.monotonic())
        self.infos.append((json.loads(payload)["seq"], info))
        return PahoDelivery(info)

    def drop_connection(self) -> None:
        """A network cut: the socket dies under paho, the broker stays up."""
        sock = self.client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class PahoDelivery:
    def __init__(self, info: mqtt.MQTTMessageInfo) -> None:
        self.info = info

    def wait(self, timeout: float) -> bool:
        if timeout > 0:
            try:
                self.info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as e:
                raise LinkError(str(e)) from e
        return bool(self.info.is_published())


def received_seqs(collector: Collector) -> list[int]:
    return [json.loads(m.payload)["seq"] for m in collector.on(TOPIC)]


def first_occurrences(seqs: list[int]) -> list[int]:
    seen: set[int] = set()
    out = []
    for s in seqs:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[Broker]:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto not installed")
    with Broker(tmp_path / "broker") as b:
        yield b


@needs_mosquitto
def test_backlog_from_an_outage_arrives_complete_and_in_order(spool: Spool, broker: Broker) -> None:
    link = PahoLink(broker.port)
    gate = threading.Event()  # the subscriber must be listening before the backlog goes out
    fwd = Forwarder(spool, link, flush_rate=RATE, max_inflight=50, connected=lambda: gate.is_set() and link.connected())
    link.on_connect.append(fwd.wake)
    fwd.start()
    collector = None
    try:
        wait_for(link.connected, 10, "the link to connect")
        broker.kill()
        wait_for(lambda: not link.connected(), 10, "the link to notice the outage")
        fill(spool, 5000)
        fwd.wake()
        broker.start()
        collector = Collector(broker, TOPIC, client_id="sub-outage")
        wait_for(link.connected, 10, "the link to reconnect")
        gate.set()
        fwd.wake()
        wait_for(lambda: spool.pending == 0, 30, "the backlog to drain")
        wait_for(lambda: len(set(received_seqs(collector))) >= 5000, 10, "the subscriber to get every seq")
        got = received_seqs(collector)
        assert first_occurrences(got) == list(range(1, 5001)), "gap or reordering"
        assert spool.dropped == 0
    finally:
        fwd.stop()
        link.close()
        if collector is not None:
            collector.close()


@needs_mosquitto
def test_network_cut_mid_drain_leaves_no_gap(spool: Spool, broker: Broker) -> None:
    collector = Collector(broker, TOPIC, client_id="sub-cut")
    link = PahoLink(broker.port)
    wait_for(link.connected, 10, "the link to connect")
    fill(spool, 4000)
    fwd = Forwarder(spool, link, flush_rate=RATE, max_inflight=50, connected=link.connected)
    link.on_connect.append(fwd.wake)
    fwd.start()
    try:
        wait_for(lambda: len(collector.on(TOPIC)) >= 1000, 10, "the drain to be under way")
        link.drop_connection()
        wait_for(lambda: fwd.stats.aborted >= 1, 10, "the forwarder to notice the cut")
        assert spool.pending > 0, "the cut came too late to test anything"
        wait_for(lambda: spool.pending == 0, 30, "the drain to finish after reconnect")
        wait_for(lambda: len(set(received_seqs(collector))) >= 4000, 10, "every seq at the subscriber")
        assert first_occurrences(received_seqs(collector)) == list(range(1, 4001))
    finally:
        fwd.stop()
        link.close()
        collector.close()


@needs_mosquitto
def test_broker_killed_mid_drain_resends_everything_it_did_not_acknowledge(spool: Spool, broker: Broker) -> None:
    collector = Collector(broker, TOPIC, client_id="sub-kill-1")
    # paho re-sends its own unacknowledged window as soon as it reconnects: give the new
    # subscriber time to subscribe first, as a fleet watcher that never went away would have.
    link = PahoLink(broker.port, reconnect_after=1.0)
    wait_for(link.connected, 10, "the link to connect")
    fill(spool, 5000)
    gate = threading.Event()
    gate.set()
    fwd = Forwarder(spool, link, flush_rate=RATE, max_inflight=50, connected=lambda: gate.is_set() and link.connected())
    link.on_connect.append(fwd.wake)
    fwd.start()
    second = None
    try:
        wait_for(lambda: len(collector.on(TOPIC)) >= 1500, 10, "the drain to be under way")
        gate.clear()
        broker.kill()
        wait_for(lambda: not link.connected(), 10, "the link to notice")
        # What the dead broker acknowledged is the broker's responsibility from then on
        # (it had no persistence): only those seqs may be missing at the subscriber.
        acked_by_dead_broker = {seq for seq, info in link.infos if info.is_published()}
        first_list = received_seqs(collector)
        before = set(first_list)
        collector.close()
        assert spool.pending > 0, "the kill came too late to test anything"
        deleted = set(range(1, 5001)) - {m.seq for m in spool.peek(10_000)}
        assert deleted <= acked_by_dead_broker, "a row left the spool without its PUBACK"
        broker.start()
        second = Collector(broker, TOPIC, client_id="sub-kill-2")
        wait_for(link.connected, 10, "the link to reconnect")
        gate.set()
        fwd.wake()
        wait_for(lambda: spool.pending == 0, 30, "the drain to finish after the restart")
        time.sleep(0.3)
        after = set(received_seqs(second))
        missing = set(range(1, 5001)) - before - after
        assert missing <= acked_by_dead_broker, f"lost without a PUBACK: {sorted(missing - acked_by_dead_broker)[:10]}"
        unacked = set(range(1, 5001)) - acked_by_dead_broker
        assert unacked <= after, "a message the dead broker never acknowledged was not resent"
        # One subscriber's view across the outage: first sightings must never go backwards.
        seen = first_occurrences([*first_list, *received_seqs(second)])
        assert seen == sorted(seen), "a seq arrived after a newer one"
    finally:
        fwd.stop()
        link.close()
        if second is not None:
            second.close()


@needs_mosquitto
def test_publish_rate_respects_flush_rate(spool: Spool, broker: Broker) -> None:
    collector = Collector(broker, TOPIC, client_id="sub-rate")
    link = PahoLink(broker.port)
    wait_for(link.connected, 10, "the link to connect")
    rate, n = 400.0, 800
    fill(spool, n)
    fwd = Forwarder(spool, link, flush_rate=rate, max_inflight=50, connected=link.connected)
    fwd.start()
    try:
        wait_for(lambda: spool.pending == 0, 20, "the drain")
        wait_for(lambda: len(collector.on(TOPIC)) >= n, 10, "the subscriber to get everything")
        times = link.published_at
        assert len(times) == n
        observed = (n - 1) / (times[-1] - times[0])
        assert observed <= rate * 1.1, f"{observed:.0f} msg/s against a flush_rate of {rate:.0f}"
        assert observed >= rate * 0.7, f"{observed:.0f} msg/s: pacing far slower than asked"
        # No burst anywhere: the bucket allows 10 ms worth; 10 more absorb scheduling jitter between
        # the bucket releasing a message and the adapter timestamping it on a loaded machine.
        window, burst = 0.5, max(1.0, rate * 0.01)
        worst = max(sum(1 for u in times if t <= u < t + window) for t in times)
        assert worst <= rate * window * 1.1 + burst + 10, f"{worst} publishes within {window} s"
        arrivals = [m.timestamp for m in collector.on(TOPIC)]
        assert (n - 1) / (arrivals[-1] - arrivals[0]) <= rate * 1.1
    finally:
        fwd.stop()
        link.close()
        collector.close()

"""MqttLink against a real mosquitto on an ephemeral port: round trips (MQTT 5 and 3.1.1), Last Will,
outages and resubscription, backoff, TLS / mTLS, passwords, the watchdog and the payload cap."""

from __future__ import annotations

import logging
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from daemon_helpers import wait_for
from mqtt_broker import Broker, Collector, mosquitto_binary
from paho.mqtt.packettypes import PacketTypes
from tls_helpers import make_pki

from edge_runtime.config.model import MqttConfig
from edge_runtime.errors import ConfigError, LinkError
from edge_runtime.mqtt.link import Message, MqttLink, max_packet_bytes
from edge_runtime.mqtt.parts import backoff_delay
from edge_runtime.mqtt.session import new_properties
from edge_runtime.mqtt.tls import MAX_PASSWORD_BYTES, read_password

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")

REPO = Path(__file__).resolve().parent.parent


@dataclass
class _Broker(Broker):
    """The shared fixture plus a password file."""

    passwords: Path | None = None

    def config_text(self) -> str:
        text = super().config_text()
        if self.passwords is not None:
            text = text.replace("allow_anonymous true", "allow_anonymous false") + f"password_file {self.passwords}\n"
        return text



def make_config(broker: Broker, **overrides: Any) -> MqttConfig:
    values: dict[str, Any] = {"enabled": True, "host": "127.0.0.1", "port": broker.port, "keepalive_seconds": 5,
                              "reconnect_min_seconds": 0.05, "reconnect_max_seconds": 0.4}
    values.update(overrides)
    return MqttConfig(**values)


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[_Broker]:
    b = _Broker(tmp_path / "broker")
    with b:
        yield b


@pytest.fixture()
def links() -> Iterator[list[MqttLink]]:
    """Links to stop at teardown, so a failing test leaves no threads behind."""
    made: list[MqttLink] = []
    yield made
    for link in made:
        link.stop(timeout=2)


def started(links: list[MqttLink], config: MqttConfig, client_id: str = "dev1", *, connect: bool = True,
            subscribe: dict[str, Callable[[Message], None]] | None = None, **kwargs: Any) -> MqttLink:
    link = MqttLink(config, client_id, **kwargs)
    links.append(link)
    for topic_filter, handler in (subscribe or {}).items():
        link.subscribe(topic_filter, handler)
    link.start()
    if connect:
        wait_for(lambda: link.connected, what=f"link connected (last error: {link.last_error})")
    return link


def payloads(collector: Collector, topic: str) -> list[bytes]:
    return [bytes(m.payload) for m in collector.on(topic)]


def close(*collectors: Collector) -> None:
    for collector in collectors:  # disconnect first: Collector.close() waits out paho's 1 s select
        collector.client.disconnect()
        collector.client.loop_stop()


# -- round trips -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_request_reply_round_trip(broker: _Broker, links: list[MqttLink], protocol: str) -> None:
    seen: list[Message] = []

    def on_request(message: Message) -> None:
        seen.append(message)
        topic = message.response_topic or "edge/dev1/reply/fallback"
        link.publish(topic, b"pong:" + message.payload, qos=1, correlation_data=message.correlation_data)

    link = started(links, make_config(broker, protocol=protocol), subscribe={"edge/dev1/cmd/+": on_request})
    replies = Collector(broker, "edge/dev1/reply/#", client_id="fleet")
    props = new_properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "edge/dev1/reply/42"
    props.CorrelationData = b"\x00corr-42"
    props.UserProperty = [("sig", "abc")]
    replies.client.publish("edge/dev1/cmd/ping", b"hello", qos=1, properties=props)
    wait_for(lambda: replies.messages, what="reply")

    reply = replies.messages[0]
    assert bytes(reply.payload) == b"pong:hello"
    message = seen[0]
    assert (message.topic, message.payload, message.qos, message.retain) == ("edge/dev1/cmd/ping", b"hello", 1, False)
    if protocol == "5":
        assert message.response_topic == "edge/dev1/reply/42"
        assert message.correlation_data == b"\x00corr-42"
        assert message.user_properties == (("sig", "abc"),)
        assert reply.topic == "edge/dev1/reply/42"
        assert getattr(reply.properties, "CorrelationData", None) == b"\x00corr-42"
    else:  # 3.1.1 has no properties: the fallback topic, and publish() ignores correlation data
        assert (message.response_topic, message.correlation_data, message.user_properties) == (None, None, ())
        assert reply.topic == "edge/dev1/reply/fallback"
    close(replies)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_commands_published_while_away_are_delivered_when_back(broker: _Broker, links: list[MqttLink],
                                                               protocol: str) -> None:
    config = make_config(broker, protocol=protocol)
    first = started(links, config, subscribe={"edge/dev1/cmd/+": lambda m: None})
    first.stop(timeout=5)
    sender = broker.client("sender")
    sender.publish("edge/dev1/cmd/ping", b"sent-while-away", qos=1).wait_for_publish(5)
    got: list[bytes] = []
    started(links, config, subscribe={"edge/dev1/cmd/+": lambda m: got.append(m.payload)})
    wait_for(lambda: got == [b"sent-while-away"], what="the queued command after the reconnect")
    sender.disconnect()


def test_session_expiry_zero_means_a_clean_session(broker: _Broker, links: list[MqttLink]) -> None:
    config = make_config(broker, session_expiry_seconds=0)
    started(links, config, subscribe={"edge/dev1/cmd/+": lambda m: None}).stop(timeout=5)
    sender = broker.client("sender")
    sender.publish("edge/dev1/cmd/ping", b"sent-while-away", qos=1).wait_for_publish(5)
    got: list[bytes] = []
    started(links, config, subscribe={"edge/dev1/cmd/+": lambda m: got.append(m.payload)})
    sender.publish("edge/dev1/cmd/ping", b"sent-after", qos=1).wait_for_publish(5)
    wait_for(lambda: got, what="the command sent after the reconnect")
    assert got == [b"sent-after"]
    sender.disconnect()


def test_publish_while_down_raises_and_lifecycle_is_checked(tmp_path: Path) -> None:
    link = MqttLink(make_config(Broker(tmp_path)), "dev1")  # never started: nothing listens
    with pytest.raises(LinkError, match="not connected"):
        link.publish("t", b"x")
    with pytest.raises(ValueError, match="QoS"):
        link.publish("t", b"x", qos=3)
    assert not link.alive and not link.connected
    link.stop()
    link.stop()  # idempotent
    with pytest.raises(LinkError, match="stopped"):
        link.start()


def test_tls_files_without_tls_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.ca_file.*tls is false"):
        MqttLink(MqttConfig(ca_file=tmp_path / "ca.pem"), "dev1")
    with pytest.raises(LinkError, match=r"cannot load mqtt\.ca_file"):
        MqttLink(MqttConfig(tls=True, ca_file=tmp_path / "missing.pem"), "dev1")


# -- Last Will and clean stop --------------------------------------------------------------------------------------

_VICTIM = """
import sys, time
from edge_runtime.config.model import MqttConfig
from edge_runtime.mqtt.link import MqttLink
link = MqttLink(MqttConfig(enabled=True, host="127.0.0.1", port=int(sys.argv[1]), keepalive_seconds=5),
                "victim", will=("edge/victim/status", b"offline-will"))
link.start()
deadline = time.monotonic() + 10
while not link.connected and time.monotonic() < deadline:
    time.sleep(0.01)
ok = link.connected and link.publish("edge/victim/status", b"online", qos=1, retain=True).wait(5)
print("ready" if ok else "failed: " + link.last_error, flush=True)
time.sleep(60)
"""


def test_will_is_published_when_the_process_is_killed(broker: _Broker, tmp_path: Path) -> None:
    watcher = Collector(broker, "edge/victim/status", client_id="watcher")
    script = tmp_path / "victim.py"
    script.write_text(_VICTIM)
    proc = subprocess.Popen([sys.executable, str(script), str(broker.port)], stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        wait_for(lambda: payloads(watcher, "edge/victim/status") == [b"online"], what="online status")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: b"offline-will" in payloads(watcher, "edge/victim/status"), what="the will")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    late = Collector(broker, "edge/victim/status", client_id="late")  # the will was retained
    wait_for(lambda: payloads(late, "edge/victim/status") == [b"offline-will"], what="retained will")
    close(watcher, late)


def test_clean_stop_publishes_final_status_and_no_will(broker: _Broker, links: list[MqttLink]) -> None:
    watcher = Collector(broker, "edge/dev1/status", client_id="watcher")
    link = started(links, make_config(broker), will=("edge/dev1/status", b"offline-will"))
    assert link.publish("edge/dev1/status", b"online", qos=1, retain=True).wait(5)
    link.stop(final=("edge/dev1/status", b"offline-clean"), timeout=5)
    assert not link.alive and not link.connected
    wait_for(lambda: b"offline-clean" in payloads(watcher, "edge/dev1/status"), what="final status")
    time.sleep(0.3)  # a will would follow the disconnect at once; give it the chance to (wrongly) arrive
    assert payloads(watcher, "edge/dev1/status") == [b"online", b"offline-clean"]
    late = Collector(broker, "edge/dev1/status", client_id="late")
    wait_for(lambda: payloads(late, "edge/dev1/status") == [b"offline-clean"], what="retained final status")
    close(watcher, late)


# -- outages, backoff, watchdog ------------------------------------------------------------------------------------


def test_reconnects_and_resubscribes_after_broker_restart(broker: _Broker, links: list[MqttLink]) -> None:
    got: list[bytes] = []
    ups: list[int] = []
    link = MqttLink(make_config(broker), "dev1")
    links.append(link)
    link.subscribe("edge/dev1/cmd/+", lambda m: got.append(m.payload))
    link.on_connect(lambda: ups.append(1))
    link.start()
    wait_for(lambda: link.connected)
    assert link.alive
    broker.kill()  # no persistence: the restarted broker knows no subscriptions
    wait_for(lambda: not link.connected, what="link noticing the outage")
    delivery_while_down = pytest.raises(LinkError, match="not connected")
    with delivery_while_down:
        link.publish("edge/dev1/events", b"x", qos=1)
    broker.start()
    wait_for(lambda: link.connected, what="reconnect")
    assert link.alive and link.connections == 2
    wait_for(lambda: len(ups) == 2, what="on_connect after the reconnect")
    sender = broker.client("sender")
    sender.publish("edge/dev1/cmd/ping", b"after-restart", qos=1)
    wait_for(lambda: got == [b"after-restart"], what="message after resubscribe")
    sender.disconnect()


def test_pending_deliveries_fail_when_the_connection_is_lost(broker: _Broker, links: list[MqttLink]) -> None:
    link = started(links, make_config(broker))
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGSTOP)  # accepts bytes, never acknowledges
    try:
        delivery = link.publish("edge/dev1/events", b"x", qos=1)
        assert not delivery.wait(0.2) and not delivery.failed
    finally:
        broker.kill()
    assert not delivery.wait(5)
    assert delivery.failed and "connection lost" in delivery.reason


@pytest.mark.parametrize(("attempt", "low", "high"), [(0, 0.1, 0.2), (1, 0.2, 0.4), (2, 0.4, 0.8), (3, 0.4, 0.8),
                                                      (50, 0.4, 0.8), (5000, 0.4, 0.8)])
def test_backoff_delay_bounds(attempt: int, low: float, high: float) -> None:
    rng = random.Random(attempt)
    delays = [backoff_delay(attempt, 0.1, 0.8, rng) for _ in range(200)]
    assert low <= min(delays) and max(delays) <= high
    assert max(delays) - min(delays) > (high - low) / 2  # jittered across the whole window


def test_backoff_grows_caps_jitters_and_resets_after_success(tmp_path: Path, links: list[MqttLink]) -> None:
    broker = _Broker(tmp_path / "broker")  # not started yet: every attempt is refused
    delays: list[float] = []

    def sleep(seconds: float) -> None:
        delays.append(seconds)
        time.sleep(seconds / 20)

    link = started(links, make_config(broker, reconnect_min_seconds=0.1, reconnect_max_seconds=0.8), connect=False,
                   rng=random.Random(1), sleep=sleep)
    wait_for(lambda: len(delays) >= 12, what="retries")
    assert "connection refused" in link.last_error and not link.connected
    bounds = [(0.1, 0.2), (0.2, 0.4)] + [(0.4, 0.8)] * 10
    assert all(lo <= d <= hi for d, (lo, hi) in zip(delays, bounds, strict=False)), delays
    assert len({round(d, 6) for d in delays[2:12]}) > 5  # capped ones are jittered, not all 0.8
    with broker:
        wait_for(lambda: link.connected, what="connect once the broker is up")
        seen = len(delays)
    wait_for(lambda: len(delays) > seen, what="retry after the outage")
    assert 0.1 <= delays[seen] <= 0.2  # reset to the first step after a successful connection


def test_watchdog_restarts_a_dead_network_thread(broker: _Broker, links: list[MqttLink],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    clients: list[mqtt.Client] = []

    class SpyClient(mqtt.Client):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            clients.append(self)

    got: list[bytes] = []
    caplog.set_level(logging.INFO, logger="edge_runtime.mqtt.link")
    watcher = Collector(broker, "edge/dev1/status", client_id="watcher")
    link = started(links, make_config(broker), subscribe={"edge/dev1/cmd/+": lambda m: got.append(m.payload)},
                   watchdog_seconds=0.05, client_class=SpyClient, will=("edge/dev1/status", b"offline-will"))
    clients[-1].loop_stop()  # paho's network thread ends; the socket stays open and nobody reads it
    wait_for(lambda: link.connections == 2 and link.connected, what="restart by the watchdog")
    assert link.alive
    assert "watchdog: network thread died" in caplog.text
    # The dead connection was dropped without DISCONNECT: while the link was away the device was offline.
    wait_for(lambda: payloads(watcher, "edge/dev1/status") == [b"offline-will"], what="will of the dead connection")
    close(watcher)
    sender = broker.client("sender")
    sender.publish("edge/dev1/cmd/ping", b"after-watchdog", qos=1)
    wait_for(lambda: got == [b"after-watchdog"], what="message after the restart")
    sender.disconnect()


def test_raising_and_slow_handlers_never_stall_the_network(broker: _Broker, links: list[MqttLink],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()
    got: list[bytes] = []
    acked_in_callback: list[bool] = []

    def handler(message: Message) -> None:
        got.append(message.payload)
        if message.payload == b"raise":
            raise RuntimeError("handler bug")
        if message.payload == b"slow":
            release.wait(10)

    link = MqttLink(make_config(broker), "dev1", watchdog_seconds=0.05)
    links.append(link)
    link.subscribe("edge/dev1/cmd/+", handler)
    # on_connect callbacks run off the network thread, so they may wait for their own PUBACK.
    link.on_connect(lambda: acked_in_callback.append(link.publish("edge/dev1/status", b"on", qos=1).wait(5)))
    link.start()
    wait_for(lambda: acked_in_callback == [True], what="publish acknowledged inside on_connect")
    sender = broker.client("sender")
    for payload in (b"raise", b"after-raise", b"slow"):
        sender.publish("edge/dev1/cmd/x", payload, qos=1)
    wait_for(lambda: got == [b"raise", b"after-raise", b"slow"], what="handlers")
    assert link.publish("edge/dev1/events", b"while-slow", qos=1).wait(5)  # handler blocked, network is not
    release.set()
    assert link.connected and link.connections == 1
    assert "handler for edge/dev1/cmd/x raised" in caplog.text
    sender.disconnect()


def test_idle_link_uses_almost_no_cpu(broker: _Broker, links: list[MqttLink]) -> None:
    started(links, make_config(broker))
    before = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - before < 0.05  # the whole process: link threads wake about once a second


# -- payload cap ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_oversized_payload_never_reaches_handlers(broker: _Broker, links: list[MqttLink], protocol: str) -> None:
    config = make_config(broker, protocol=protocol, max_input_bytes=1024, max_command_bytes=256)
    assert max_packet_bytes(config) == 1024 + 65536
    got: list[int] = []
    link = started(links, config, subscribe={"edge/dev1/input/#": lambda m: got.append(len(m.payload))})
    sender = broker.client("sender")
    sender.publish("edge/dev1/input/a", b"x" * 100_000, qos=1)
    sender.publish("edge/dev1/input/a", b"small", qos=1)
    wait_for(lambda: 5 in got, what="the small message")
    assert got == [5]
    # MQTT 5: the broker honours our Maximum Packet Size and never sends it; 3.1.1: we drop it on receipt.
    assert link.dropped == (0 if protocol == "5" else 1)
    sender.disconnect()


# -- TLS -----------------------------------------------------------------------------------------------------------


def test_tls_with_test_ca(tmp_path: Path, links: list[MqttLink]) -> None:
    pki = make_pki(tmp_path / "pki")
    with _Broker(tmp_path / "broker", tls=pki) as broker:
        link = started(links, make_config(broker, tls=True, ca_file=pki.ca))
        assert link.publish("edge/dev1/events", b"over tls", qos=1).wait(5)


def test_mtls_accepts_client_cert_and_refuses_a_client_without_one(tmp_path: Path, links: list[MqttLink]) -> None:
    pki = make_pki(tmp_path / "pki")
    with _Broker(tmp_path / "broker", tls=pki, require_certificate=True) as broker:
        good = started(links, make_config(broker, tls=True, ca_file=pki.ca, cert_file=pki.client_cert,
                                          key_file=pki.client_key), "dev-good")
        assert good.publish("edge/dev-good/events", b"mtls", qos=1).wait(5)
        bad = started(links, make_config(broker, tls=True, ca_file=pki.ca), "dev-bad", connect=False)
        wait_for(lambda: bad.last_error.startswith("TLS to"), what="TLS refusal")
        assert "client certificate" in bad.last_error
        assert bad.connections == 0 and not bad.connected and bad.alive


@pytest.mark.parametrize("listener", ["unknown-ca", "wrong-host", "plaintext"])
def test_untrusted_or_plaintext_broker_is_refused(tmp_path: Path, links: list[MqttLink], listener: str) -> None:
    served = make_pki(tmp_path / "served", hosts=("broker.example",) if listener == "wrong-host" else ("127.0.0.1",))
    trusted = served if listener == "wrong-host" else make_pki(tmp_path / "other")
    with _Broker(tmp_path / "broker", tls=None if listener == "plaintext" else served) as broker:
        link = started(links, make_config(broker, tls=True, ca_file=trusted.ca), connect=False)
        wait_for(lambda: link.last_error.startswith("TLS to"), what="TLS failure")
        if listener == "unknown-ca":
            assert "certificate verify failed" in link.last_error
        elif listener == "wrong-host":  # right CA, but issued for another name
            assert "certificate verify failed: IP address mismatch" in link.last_error
        else:  # plaintext MQTT is right there, and the link still never speaks it
            broker.client("plain").disconnect()
        time.sleep(0.3)  # several more attempts (backoff <= 0.4 s): none may fall back
        assert link.connections == 0 and not link.connected
        assert link.last_error.startswith(f"TLS to 127.0.0.1:{broker.port}")


# -- credentials ---------------------------------------------------------------------------------------------------

SECRET = "s3cr3t-Pa55word-xyzzy"


@pytest.fixture()
def password_broker(tmp_path: Path) -> Iterator[_Broker]:
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed")
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "device", SECRET], check=True,
                   capture_output=True)
    b = _Broker(tmp_path / "broker", passwords=passwords)
    with b:
        yield b


def test_password_from_file_and_credentials_dir_never_shown(password_broker: _Broker, tmp_path: Path,
                                                            links: list[MqttLink],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    password_file = tmp_path / "mqtt-password"
    password_file.write_text(SECRET + "\n")  # the trailing newline is not part of it
    by_file = started(links, make_config(password_broker, username="device", password_file=password_file), "a")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text(SECRET)
    by_cred = started(links, make_config(password_broker, username="device"), "b", credentials_dir=str(creds))
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "mqtt-password").write_text("not-" + SECRET)
    refused = started(links, make_config(password_broker, username="device"), "c", connect=False,
                      credentials_dir=str(wrong))
    wait_for(lambda: "refused the connection" in refused.last_error, what="auth refusal")
    assert refused.connections == 0
    anonymous = started(links, make_config(password_broker), "d", connect=False, credentials_dir=str(tmp_path))
    wait_for(lambda: "refused the connection" in anonymous.last_error, what="anonymous refusal")
    for link in (by_file, by_cred, refused, anonymous):
        for text in (repr(link), str(link), repr(vars(link)), link.last_error):
            assert SECRET not in text
    for link in list(links):
        link.stop()
    assert SECRET not in caplog.text
    assert "refused the connection" in caplog.text  # the log was captured at all


def test_password_file_caps_and_errors_never_leak(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_text(SECRET * (MAX_PASSWORD_BYTES // len(SECRET) + 1))
    binary = tmp_path / "binary"
    binary.write_bytes(SECRET.encode() + b"\xff")
    for path, match in ((big, "larger than"), (binary, "not UTF-8"), (tmp_path / "missing", "cannot read")):
        with pytest.raises(LinkError, match=match) as info:
            read_password(MqttConfig(password_file=path), None)
        assert SECRET not in str(info.value) and SECRET not in repr(info.value.__cause__)
    assert read_password(MqttConfig(), str(tmp_path)) is None  # no credential provided: anonymous
    with pytest.raises(ConfigError, match="password_credential"):
        read_password(MqttConfig(password_credential="../etc/shadow"), str(tmp_path))


def test_empty_credential_means_no_password_but_empty_password_file_is_an_error(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_bytes(b"\n")  # what `install -m 0600 /dev/null` plus an editor leaves
    assert read_password(MqttConfig(), str(creds)) is None
    empty = tmp_path / "pw"
    empty.write_bytes(b"")
    with pytest.raises(LinkError, match="empty"):
        read_password(MqttConfig(password_file=empty), None)

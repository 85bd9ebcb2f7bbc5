"""A real mosquitto broker on an ephemeral loopback port, started and stopped by tests.

    with Broker(tmp_path) as broker:            # plain MQTT on 127.0.0.1:<port>
        client = broker.client("watcher")        # a connected paho client (MQTT 5)
    broker.kill(); broker.start()                # outage: kill -9, restart on the same port
    Broker(tmp_path, tls=make_tls(...), require_certificate=True)   # TLS / mTLS listener

``persistence=True`` keeps the broker's queue across restarts (in ``dir``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

__all__ = ["Broker", "Collector", "mosquitto_binary"]


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if Path(p).exists()), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    """One mosquitto process; ``start``/``kill``/``stop`` may be called repeatedly."""

    dir: Path
    persistence: bool = False
    tls: Any = None  # http_fault_server.TlsFiles (ca, cert, key)
    require_certificate: bool = False
    max_queued_messages: int = 1000
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None

    def config_text(self) -> str:
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                 # As root mosquitto drops to the `mosquitto` user, which cannot read pytest's tmp dirs.
                 *(["user root"] if os.geteuid() == 0 else []),
                 f"max_queued_messages {self.max_queued_messages}", "log_dest stderr", "log_type error",
                 "log_type warning"]
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.dir}/", "autosave_interval 1"]
        if self.tls is not None:
            lines += [f"cafile {self.tls.ca}", f"certfile {self.tls.cert}", f"keyfile {self.tls.key}"]
            if self.require_certificate:
                lines += ["require_certificate true", "use_identity_as_username false"]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> Broker:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto)")
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "mosquitto.conf"
        conf.write_text(self.config_text())
        log = open(self.dir / "mosquitto.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {(self.dir / 'mosquitto.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def kill(self) -> None:
        """Kill -9: an outage with no goodbye (sessions and wills handled as on a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, client_id: str, *, protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
               on_message: Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None] | None = None) -> mqtt.Client:
        """A started paho client connected to this broker (plain TCP)."""
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        if on_message is not None:
            client.on_message = on_message
        connected = threading.Event()
        client.on_connect = lambda *a: connected.set()
        client.connect("127.0.0.1", self.port, keepalive=30)
        client.loop_start()
        if not connected.wait(10):
            raise RuntimeError("test client could not connect")
        return client


class Collector:
    """Subscribes a test client to topics and records every message (thread-safe)."""

    def __init__(self, broker: Broker, *topics: str, client_id: str = "collector") -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self._lock = threading.Lock()
        self.client = broker.client(client_id, on_message=self._on_message)
        for topic in topics:
            self.client.subscribe(topic, qos=1)
        time.sleep(0.1)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(message)

    def on(self, topic_prefix: str) -> list[mqtt.MQTTMessage]:
        with self._lock:
            return [m for m in self.messages if m.topic.startswith(topic_prefix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

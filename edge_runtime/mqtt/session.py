"""One MQTT connection of :class:`~edge_runtime.mqtt.link.MqttLink`: a fresh paho client, its
callbacks and its unacknowledged deliveries. Discarded when the connection ends; the link makes
a new one for the next attempt, so nothing from a lost connection is re-sent behind its back.

The callbacks run on paho's network thread. Each catches its own exceptions and none blocks:
messages go to the owner (which queues them for the handler thread), acknowledgements resolve
:class:`~edge_runtime.mqtt.parts.Delivery` handles.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from typing import Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_runtime.mqtt.parts import Delivery, Message

__all__ = ["Session", "SessionOwner", "new_properties"]

_log = logging.getLogger("edge_runtime.mqtt.link")  # one logger for the whole link, whichever module speaks


class SessionOwner(Protocol):
    """What a session needs from its link."""

    def subscriptions(self) -> list[tuple[str, int]]:
        """Every (filter, QoS) to (re)subscribe after CONNACK."""
        ...

    def session_up(self, session: Session) -> None:
        """CONNACK accepted and resubscription acknowledged."""
        ...

    def message_arrived(self, message: Message) -> None:
        """An incoming message (network thread: must not block)."""
        ...


def new_properties(packet_type: int) -> Properties:
    """An empty MQTT 5 property set for ``packet_type`` (paho's constructor is untyped)."""
    return Properties(packet_type)  # type: ignore[no-untyped-call]


class Session:
    """A connection's state. ``ready`` (CONNACK + SUBACK) is what the link calls connected."""

    def __init__(self, client: mqtt.Client, owner: SessionOwner, *, where: str, v5: bool, tls: bool,
                 client_cert: bool) -> None:
        self.client = client
        self.thread: threading.Thread | None = None
        self.acked = False
        self.ready = False
        self.ended = threading.Event()
        self.end_reason = ""
        self.leaving = False  # the link is closing it on purpose (stop)
        self._owner = owner
        self._where = where
        self._v5 = v5
        self._tls = tls
        self._client_cert = client_cert
        self._lock = threading.Lock()
        self._pending: dict[int, Delivery] = {}
        self._early: dict[int, str | None] = {}  # acks that beat track(): mid -> failure (None = delivered)
        self._sub_mid = -1  # the resubscription sent on CONNACK
        self._sub_requests: dict[int, list[str]] = {}  # SUBSCRIBE mid -> filters, to name refusals
        self._paho_error = ""  # paho's last error log line: the detail behind "connection lost"
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_disconnect = self._on_disconnect
        client.on_log = self._on_log

    @property
    def live(self) -> bool:
        """Connected and not ended: publishing is possible."""
        return self.ready and not self.ended.is_set()

    def start_network(self) -> None:
        """Start paho's network thread (after a successful ``connect``)."""
        self.client.loop_start()
        # paho has no public accessor for its network thread; the watchdog needs it to notice its death.
        self.thread = self.client._thread

    def track(self, mid: int, topic: str) -> Delivery:
        """The delivery handle for a publish paho accepted as ``mid``."""
        delivery = Delivery(topic)
        # on_publish may already have run: it cannot wait for us (paho holds its message lock around the
        # callback while publish() needs that lock), so it parks early acks in _early and we collect here.
        with self._lock:
            if mid in self._early:
                delivery.finish(self._early.pop(mid))
            elif self.ended.is_set():
                delivery.finish(f"connection lost ({self.end_reason})")
            else:
                self._pending[mid] = delivery
        return delivery

    def subscribe(self, topic_filter: str, qos: int) -> None:
        """Subscribe now (a filter added while connected); a failure means the session is ending anyway."""
        _, mid = self.client.subscribe(topic_filter, qos)
        if mid is not None:
            with self._lock:
                self._sub_requests[mid] = [topic_filter]

    def end(self, reason: str) -> None:
        """Mark the session over (the first reason wins) and fail its unacknowledged deliveries."""
        with self._lock:
            if not self.ended.is_set():
                self.end_reason = reason
                self.ended.set()
            pending = list(self._pending.values())
            self._pending.clear()
            self._early.clear()
        for delivery in pending:
            delivery.finish(f"connection lost before acknowledgement ({self.end_reason})")

    def close(self) -> None:
        """Tear down without DISCONNECT (unless stop() already sent one), so the broker sends the will."""
        sock = self.client.socket()
        if isinstance(sock, socket.socket):  # SSLSocket included
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # paho's select sees EOF and its loop ends by itself
        if self.thread is not None and self.thread.is_alive() and self.thread is not threading.current_thread():
            self.client.loop_stop()
        if sock is not None:
            sock.close()
        self.end(self.end_reason or "connection closed")

    # -- paho callbacks (network thread) -------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags, reason: ReasonCode,
                    properties: Properties | None) -> None:
        try:
            if reason.is_failure:
                self.end(f"broker {self._where} refused the connection: {reason}")
                return
            self.acked = True
            subs = self._owner.subscriptions()
            if not subs:
                self._up()
                return
            rc, mid = client.subscribe(subs)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                self.end(f"subscribe failed: {mqtt.error_string(rc)}")
                return
            with self._lock:
                self._sub_mid = mid
                self._sub_requests[mid] = [topic_filter for topic_filter, _ in subs]
        except Exception:
            _log.exception("mqtt: error in on_connect")

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, reasons: list[ReasonCode],
                      properties: Properties | None) -> None:
        try:
            with self._lock:
                filters = self._sub_requests.pop(mid, [])
                resubscribed = mid == self._sub_mid
            for topic_filter, reason in zip(filters, reasons, strict=False):
                if reason.is_failure:
                    _log.warning("mqtt: broker refused the subscription to %s: %s", topic_filter, reason)
            if resubscribed and not self.ready:
                self._up()
        except Exception:
            _log.exception("mqtt: error in on_subscribe")

    def _up(self) -> None:
        self.ready = True
        self._owner.session_up(self)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            try:
                topic = msg.topic
            except UnicodeDecodeError:
                _log.warning("mqtt: dropped a message whose topic is not UTF-8")
                return
            props = msg.properties if self._v5 else None
            user_properties = getattr(props, "UserProperty", None) or []
            self._owner.message_arrived(Message(
                topic=topic, payload=bytes(msg.payload), qos=msg.qos, retain=bool(msg.retain),
                response_topic=getattr(props, "ResponseTopic", None),
                correlation_data=getattr(props, "CorrelationData", None),
                user_properties=tuple((str(k), str(v)) for k, v in user_properties),
            ))
        except Exception:
            _log.exception("mqtt: error in on_message")

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: ReasonCode,
                    properties: Properties) -> None:
        try:
            failure = f"broker refused it: {reason}" if reason.is_failure else None
            with self._lock:
                delivery = self._pending.pop(mid, None)
                if delivery is None:
                    self._early[mid] = failure
            if delivery is not None:
                delivery.finish(failure)
        except Exception:
            _log.exception("mqtt: error in on_publish")

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: mqtt.DisconnectFlags,
                       reason: ReasonCode, properties: Properties | None) -> None:
        try:
            error = self._paho_error
            if self._tls and not self.acked:
                # TLS 1.3 completes the client's side of the handshake before the broker checks our
                # certificate: a refusal shows up as an alert or an EOF on the first read.
                hint = "" if self._client_cert else "; does the broker require a client certificate?"
                self.end(f"TLS to {self._where}: refused before CONNACK ({error or reason}){hint}")
                return
            why = str(reason)
            if not flags.is_disconnect_packet_from_server and why == "Unspecified error":
                why = "connection lost"  # paho's word for EOF or a socket error
            self.end(f"disconnected from {self._where}: {why}" + (f" ({error})" if error else ""))
        except Exception:
            _log.exception("mqtt: error in on_disconnect")

    def _on_log(self, client: mqtt.Client, userdata: object, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            text = " ".join(text.split())
            self._paho_error = text[: text.rfind(" (_ssl.c:")] if " (_ssl.c:" in text else text

"""The daemon's MQTT connection: one supervised paho-mqtt 2.x client that keeps itself up.

    link = MqttLink(config.mqtt, "edge-dev1", will=("edge/dev1/status", b'{"state":"offline"}'))
    link.subscribe("edge/dev1/cmd/+", on_command)      # re-subscribed on every connect
    link.on_connect(lambda: link.publish("edge/dev1/status", online, qos=1, retain=True))
    link.start()                                       # returns at once; connects in the background
    link.publish("edge/dev1/events", data, qos=1).wait(5.0)   # LinkError("not connected") while down
    link.stop(final=("edge/dev1/status", b'{"state":"offline"}'))

Threads:

- ``mqtt-supervisor`` connects (TCP + TLS handshake + CONNECT), waits for the
  session to end, and reconnects after a capped, jittered exponential backoff
  (reset once a connection came all the way up). It is also the watchdog: it
  notices when paho's network thread died without a disconnect (an exception
  escaped a callback, the loop was stopped behind our back) or the broker never
  answered CONNECT, tears that connection down and starts over.
- paho's network thread (``loop_start``), one per connection: reads, writes,
  keepalive (a half-open link is noticed after about 1.5 keepalive periods).
  Every callback we give it catches its own exceptions and never blocks.
- ``mqtt-dispatch`` runs subscription handlers and ``on_connect`` callbacks,
  one at a time in arrival order (see :class:`~edge_runtime.mqtt.parts.Dispatcher`).
  Handlers may publish and wait for the acknowledgement; a handler that raises
  is logged and skipped; when handlers fall far behind, messages are dropped and
  counted instead of stalling the network thread.

Each connection uses a fresh paho client (:mod:`edge_runtime.mqtt.session`):
nothing from a lost connection is re-sent behind the caller's back; its pending
deliveries fail (``Delivery.failed``) and the caller (spool, forwarder) decides.
The broker-side session is kept for ``session_expiry_seconds`` (MQTT 5 Session
Expiry; with 3.1.1 a non-clean session, which the broker keeps until its own
expiry), so QoS 1 messages to our subscriptions that arrive while the device is
away (fleet commands) are delivered when it is back; 0 asks for a clean session
on every connect. Subscriptions are sent again on every connect either way.

A connection torn down by the link itself is closed without DISCONNECT so the
broker publishes the Last Will: while the link is away the device *is* offline.
Only :meth:`MqttLink.stop` says goodbye with a clean DISCONNECT, after
publishing the final status itself.

TLS (:mod:`edge_runtime.mqtt.tls`) is all or nothing: with ``tls = true`` every
attempt is TLS >= 1.2 with the broker's certificate and host name verified;
a failure is reported in ``last_error`` ("TLS to HOST:PORT: ...") and retried,
never downgraded. The password is read once and never logged or shown in a repr.
With MQTT 5 the CONNECT carries Maximum Packet Size (:func:`max_packet_bytes`),
so the broker drops larger messages for us; with 3.1.1 they are dropped on receipt.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_runtime.config.model import MqttConfig
from edge_runtime.errors import LinkError
from edge_runtime.mqtt.parts import Delivery, Dispatcher, Message, backoff_delay
from edge_runtime.mqtt.session import Session, new_properties
from edge_runtime.mqtt.tls import build_ssl_context, check_tls_config, describe_connect_error, read_password

__all__ = ["Delivery", "Message", "MqttLink", "max_packet_bytes"]

_log = logging.getLogger(__name__)
_PACKET_HEADROOM = 64 << 10  # topic, properties and framing around the largest payload we accept
_DISPATCH_MAX_ITEMS = 1000
Handler = Callable[[Message], None]


def max_packet_bytes(config: MqttConfig) -> int:
    """The largest packet we accept: ``max(max_command_bytes, max_input_bytes) + 64 KiB``."""
    return max(config.max_command_bytes, config.max_input_bytes) + _PACKET_HEADROOM


class MqttLink:
    """A self-healing MQTT client for the daemon (see the module doc for threads and guarantees)."""

    def __init__(self, config: MqttConfig, client_id: str, *, will: tuple[str, bytes] | None = None,
                 credentials_dir: str | None = None, rng: random.Random | None = None,
                 sleep: Callable[[float], object] | None = None, watchdog_seconds: float = 1.0,
                 client_class: type[mqtt.Client] = mqtt.Client) -> None:
        """Prepare the link; nothing touches the network until :meth:`start`.

        ``will`` becomes a retained QoS 1 Last Will. The password is read here, once,
        from ``config.password_file`` or ``<credentials_dir>/<config.password_credential>``
        (``credentials_dir`` defaults to ``$CREDENTIALS_DIRECTORY``). ``rng``, ``sleep``
        (the backoff wait), ``watchdog_seconds`` and ``client_class`` are for tests.

        Raises:
            ConfigError: TLS files configured without ``tls``, or a bad credential name.
            LinkError: the password or a TLS file cannot be read.
        """
        check_tls_config(config)
        self._config = config
        self._client_id = client_id
        self._will = will
        self._password = read_password(config, credentials_dir)
        if config.tls:
            build_ssl_context(config)  # unreadable CA/cert/key: fail at start-up, not on every retry
        elif self._password is not None:
            _log.warning("mqtt: a password is configured but mqtt.tls is false: it crosses the network in clear")
        self._where = f"{config.host}:{config.port}"
        self._v5 = config.protocol == "5"
        self._max_packet = max_packet_bytes(config)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._sleep = sleep
        self._watch_interval = watchdog_seconds
        self._client_class = client_class
        self._lock = threading.Lock()
        self._subs: dict[str, tuple[int, list[Handler]]] = {}
        self._connect_callbacks: list[Callable[[], None]] = []
        self._session: Session | None = None
        self._halt = threading.Event()
        self._started = False
        self._stopped = False
        self._supervisor: threading.Thread | None = None
        self._dispatcher = Dispatcher(_DISPATCH_MAX_ITEMS, 2 * self._max_packet)
        self._connections = 0
        self._dropped_oversize = 0
        self.last_error = ""

    def __repr__(self) -> str:
        state = "connected" if self.connected else "down"
        return f"MqttLink({self._where}, client_id={self._client_id!r}, {state})"

    # -- public API -----------------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Connected, subscriptions re-established: publishing now goes out."""
        session = self._session
        return session is not None and session.live

    @property
    def alive(self) -> bool:
        """Started, not stopped, and the supervisor (which restarts everything else) and handler thread run."""
        supervisor = self._supervisor
        return (self._started and not self._stopped and supervisor is not None and supervisor.is_alive()
                and self._dispatcher.alive)

    @property
    def connections(self) -> int:
        """How many times the link came up (first connect included)."""
        return self._connections

    @property
    def dropped(self) -> int:
        """Incoming messages dropped: over the size cap, or handlers too far behind."""
        return self._dropped_oversize + self._dispatcher.dropped

    def start(self) -> None:
        """Start connecting in the background (returns at once); reconnects until :meth:`stop`.

        Raises:
            LinkError: the link was already stopped (build a new one).
        """
        with self._lock:
            if self._stopped:
                raise LinkError("MQTT link already stopped")
            if self._started:
                return
            self._started = True
        self._dispatcher.start()
        self._supervisor = threading.Thread(target=self._supervise, name="mqtt-supervisor", daemon=True)
        self._supervisor.start()

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """If connected, publish ``final`` (retained, QoS 1, waiting up to ``timeout`` for PUBACK), then
        DISCONNECT cleanly so the broker discards the will; then stop all threads. Never raises."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            session = self._session
        if session is not None and session.live:
            if final is not None:
                try:
                    if not self.publish(final[0], final[1], qos=1, retain=True).wait(_left(deadline)):
                        _log.warning("mqtt: final status on %s not acknowledged", final[0])
                except LinkError as e:
                    _log.warning("mqtt: final status on %s not sent: %s", final[0], e)
            session.leaving = True
            session.client.disconnect()
            session.ended.wait(_left(deadline))
        elif session is not None:  # still handshaking: end it now rather than at the next watchdog tick
            session.leaving = True
            session.end("stopped")
        self._halt.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(_left(deadline))
        self._dispatcher.stop(_left(deadline))
        _log.info("mqtt: stopped")

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False,
                response_topic: str | None = None, correlation_data: bytes | None = None,
                user_properties: tuple[tuple[str, str], ...] | list[tuple[str, str]] = ()) -> Delivery:
        """Send one message; the returned :class:`Delivery` tells when it is acknowledged.

        Response topic, correlation data and user properties are MQTT 5 only (ignored with 3.1.1).

        Raises:
            LinkError: not connected, or paho's outgoing queue is full (callers spool or drop).
            ValueError: ``qos`` not 0-2, or the topic is empty or has wildcards (a programming error).
        """
        if qos not in (0, 1, 2):
            raise ValueError(f"invalid QoS {qos!r}")
        session = self._session
        if session is None or not session.live:
            raise LinkError("not connected")
        properties: Properties | None = None
        if self._v5 and (response_topic or correlation_data is not None or user_properties):
            properties = new_properties(PacketTypes.PUBLISH)
            if response_topic:
                properties.ResponseTopic = response_topic
            if correlation_data is not None:
                properties.CorrelationData = correlation_data
            if user_properties:
                properties.UserProperty = list(user_properties)
        info = session.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                raise LinkError("not connected")
            raise LinkError(f"publish to {topic}: {mqtt.error_string(info.rc)}")
        return session.track(info.mid, topic)

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Call ``handler`` (on the dispatch thread) for each message matching ``topic_filter``.

        Remembered and re-subscribed on every connect; subscribing now also takes effect at
        once when connected. Several handlers may share a filter. A message matching several
        filters may reach a handler more than once.

        Raises:
            ValueError: empty filter or ``qos`` not 0-2.
        """
        if not topic_filter or qos not in (0, 1, 2):
            raise ValueError(f"invalid subscription {topic_filter!r} (QoS {qos!r})")
        with self._lock:
            old_qos, handlers = self._subs.get(topic_filter, (qos, []))
            self._subs[topic_filter] = (max(old_qos, qos), [*handlers, handler])
            session = self._session
            live = session is not None and session.acked and not session.ended.is_set()
        if session is not None and live:
            session.subscribe(topic_filter, qos)

    def on_connect(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` (on the dispatch thread) after every successful connect and resubscribe."""
        with self._lock:
            self._connect_callbacks.append(fn)

    # -- supervisor thread ----------------------------------------------------------------------------------------

    def _supervise(self) -> None:
        attempt = 0
        while not self._stopped:
            try:
                if self._connect_once():
                    attempt = 0  # it came all the way up: the next outage starts from the short delay
            except Exception as e:  # a bug here must not end reconnecting (and `alive` with it)
                _log.exception("mqtt: supervisor error")
                self.last_error = f"internal error: {type(e).__name__}: {e}"
            if self._stopped:
                break
            delay = backoff_delay(attempt, self._config.reconnect_min_seconds, self._config.reconnect_max_seconds,
                                  self._rng)
            attempt += 1
            _log.warning("mqtt: %s; reconnecting in %.1f s", self.last_error, delay)
            if self._sleep is not None:
                self._sleep(delay)
            else:
                self._halt.wait(delay)

    def _connect_once(self) -> bool:
        """One connection from attempt to teardown; True if it came all the way up."""
        session = self._open()
        if session is None:
            return False
        self._watch(session)
        with self._lock:
            if self._session is session:
                self._session = None
        session.close()
        if not session.leaving:
            self.last_error = session.end_reason
        return session.ready

    def _open(self) -> Session | None:
        """Connect a fresh client (TCP, TLS handshake, CONNECT) and start its network thread."""
        config = self._config
        try:
            client = self._new_client()
        except LinkError as e:
            self.last_error = str(e)
            return None
        session = Session(client, self, where=self._where, v5=self._v5, tls=config.tls,
                          client_cert=config.cert_file is not None)
        kwargs: dict[str, Any] = {}
        if self._v5:
            properties = new_properties(PacketTypes.CONNECT)
            properties.MaximumPacketSize = self._max_packet  # the broker drops bigger packets instead of sending
            if config.session_expiry_seconds > 0:
                properties.SessionExpiryInterval = int(config.session_expiry_seconds)
            kwargs = {"clean_start": config.session_expiry_seconds == 0, "properties": properties}
        try:
            client.connect(config.host, config.port, keepalive=config.keepalive_seconds, **kwargs)
        except (OSError, ValueError) as e:  # ssl.SSLError and socket errors are OSErrors
            self.last_error = describe_connect_error(e, config.host, config.port, tls=config.tls)
            return None
        with self._lock:
            if self._stopped:  # stop() ran during the handshake; it cannot see this session: close it here
                session.leaving = True
                session.end("stopped")
            self._session = session
        session.start_network()
        return session

    def _new_client(self) -> mqtt.Client:
        config = self._config
        if self._v5:
            client = self._client_class(CallbackAPIVersion.VERSION2, client_id=self._client_id,
                                        protocol=MQTTProtocolVersion.MQTTv5, reconnect_on_failure=False)
        else:
            client = self._client_class(CallbackAPIVersion.VERSION2, client_id=self._client_id,
                                        clean_session=config.session_expiry_seconds == 0,
                                        protocol=MQTTProtocolVersion.MQTTv311, reconnect_on_failure=False)
        client.connect_timeout = float(min(config.keepalive_seconds, 30))
        client.max_inflight_messages_set(config.max_inflight)
        client.max_queued_messages_set(max(1000, 4 * config.max_inflight))
        if self._will is not None:
            client.will_set(self._will[0], self._will[1], qos=1, retain=True)
        if config.username or self._password is not None:
            client.username_pw_set(config.username, self._password.reveal() if self._password else None)
        if config.tls:
            client.tls_set_context(build_ssl_context(config))  # rebuilt per attempt: picks up renewed certs
        return client

    def _watch(self, session: Session) -> None:
        """Return when the session ended, its network thread died, it never came up, or stop() finished."""
        deadline = time.monotonic() + self._config.keepalive_seconds
        while not session.ended.wait(self._watch_interval):
            if self._halt.is_set():
                return  # stop() is done with it (its DISCONNECT went out, or timed out)
            self._dispatcher.ensure_running()
            if session.thread is None or not session.thread.is_alive():
                _log.warning("mqtt: watchdog: network thread died; restarting the link")
                session.end("network thread died")
            elif not session.ready and time.monotonic() > deadline:
                session.end(f"no answer to CONNECT from {self._where} within {self._config.keepalive_seconds} s")

    # -- SessionOwner: called by the session on the network thread; must not block ----------------------------------

    def subscriptions(self) -> list[tuple[str, int]]:
        """Every remembered (filter, QoS), for the resubscription after CONNACK."""
        with self._lock:
            return [(topic_filter, qos) for topic_filter, (qos, _) in self._subs.items()]

    def session_up(self, session: Session) -> None:
        """Count the connection, log it, queue the on_connect callbacks."""
        with self._lock:
            self._connections += 1
            callbacks = list(self._connect_callbacks)
        _log.info("mqtt: connected to %s as %s (MQTT %s%s)", self._where, self._client_id, self._config.protocol,
                  ", TLS" if self._config.tls else "")
        for fn in callbacks:
            self._dispatcher.submit("on_connect callback", fn, droppable=False)

    def message_arrived(self, message: Message) -> None:
        """Drop it if over the cap (MQTT 3.1.1 has no Maximum Packet Size), else queue its handlers."""
        size = len(message.payload)
        if size > self._max_packet:
            self._dropped_oversize += 1
            _log.warning("mqtt: dropped a %d-byte message on %s (cap %d bytes)", size, message.topic,
                         self._max_packet)
            return
        with self._lock:
            handlers = [h for f, (_, hs) in self._subs.items() if _matches(f, message.topic) for h in hs]
        for handler in handlers:
            self._dispatcher.submit(f"handler for {message.topic}", partial(handler, message), size)


def _matches(topic_filter: str, topic: str) -> bool:
    if topic_filter.startswith("$share/"):  # $share/<group>/<filter>
        topic_filter = topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    return mqtt.topic_matches_sub(topic_filter, topic)


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())

"""The operator's side of the MQTT contract (DESIGN.md): send commands, watch devices, staged rollouts.

    with FleetClient(config.mqtt) as client:            # an MqttLink with a random client id, no will
        client.subscribe(f"{client.prefix}/+/status")   # every subscription is made before open()
        client.open(replies=True)                        # returns once connected and subscribed
        command_id, payload = build_command("ping", {}, Target(device="cam-7"))
        client.send(Target(device="cam-7"), "ping", command_id, payload)
        for reply in client.replies({command_id: "cam-7"}, deadline): ...

Replies come back, with MQTT 5, on a response topic unique to this client
(``<prefix>/fleet/<client-id>/reply``) with the command id as correlation data;
with MQTT 3.1.1 on ``<prefix>/<device>/reply/<id>``. The device that answered is
taken from a ``device`` user property, else the reply's ``data.device``, else
the reply topic, else the device the command was sent to (None for a group).

A rollout (:func:`rollout`) sends ``update`` to the devices of one wave, each
addressed on its own topic with its own command id, waits for every reply, and
stops before the next wave when more than ``max_failures`` devices of a wave
failed: the devices of later waves never receive anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import queue
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime._util.strict_text import load_json
from edge_runtime.commands.auth import new_command, sign_command
from edge_runtime.commands.parse import Reply, check_verb, command_from_object
from edge_runtime.config.model import MqttConfig
from edge_runtime.errors import CommandError, LinkError
from edge_runtime.mqtt.link import Message, MqttLink

__all__ = [
    "CONNECT_TIMEOUT", "IDENT", "KINDS", "FleetClient", "FleetReply", "Target", "WatchMessage", "build_command",
    "classify", "watch_filters",
]

_log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 10.0
"""Seconds to reach the broker (and have the subscriptions acknowledged), and to get a PUBACK."""
KINDS = ("status", "telemetry", "events", "results", "reply")
"""What ``fleet watch`` can show, by the topic level after the device id."""
_KIND_SUFFIX = {"status": "status", "telemetry": "telemetry", "events": "events", "results": "results/+",
                "reply": "reply/+"}
IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # config device_id / groups: one topic level


def _check_ident(what: str, value: str) -> None:
    if not IDENT.fullmatch(value):
        raise CommandError(f"{what} {value[:64]!r} must match {IDENT.pattern}")


@dataclass(frozen=True)
class Target:
    """Who a command goes to: one ``device``, one ``group``, or (neither) every device."""

    device: str | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        if self.device is not None and self.group is not None:
            raise CommandError("a command goes to a device or a group, not both")
        for what, value in (("device", self.device), ("group", self.group)):
            if value is not None:
                _check_ident(what, value)

    def topic(self, prefix: str, verb: str) -> str:
        """The command topic for ``verb``."""
        where = self.device if self.device is not None else f"group/{self.group}" if self.group is not None else "all"
        return f"{prefix}/{where}/cmd/{verb}"

    def __str__(self) -> str:
        return f"device {self.device}" if self.device else f"group {self.group}" if self.group else "any device"


def build_command(verb: str, args: Mapping[str, Any], target: Target, *, command_id: str | None = None,
                  keys: Sequence[Ed25519PrivateKey] = ()) -> tuple[str, bytes]:
    """The command id and payload: plain ``{id, ts, args}``, or with ``keys`` a signed envelope bound to
    ``target`` (see :mod:`edge_runtime.commands.auth`).

    Raises:
        CommandError: unknown verb, a bad id, args that are not plain JSON, or a key problem.
    """
    check_verb(verb)
    if keys:
        inner = new_command(verb, args, command_id=command_id, device=target.device, group=target.group)
        return str(inner["id"]), sign_command(inner, keys)
    doc = {"id": command_id or uuid.uuid4().hex, "ts": round(time.time(), 3), "args": dict(args)}
    command_from_object(doc, verb)  # the device's own rules: a bad --id fails here, not on every device
    try:
        payload = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise CommandError(f"command args are not plain JSON: {e}") from e
    return str(doc["id"]), payload


@dataclass(frozen=True)
class FleetReply:
    """One device's answer to a command (``device`` None when nothing says which device it was)."""

    device: str | None
    id: str | None
    ok: bool
    message: str
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``{"device", "id", "ok", "message", "data"}``."""
        return {**dataclasses.asdict(self), "data": dict(self.data)}


@dataclass(frozen=True)
class WatchMessage:
    """A device message as ``fleet watch`` shows it; ``payload`` is parsed JSON, else text."""

    topic: str
    device: str
    kind: str
    retained: bool
    payload: Any

    def to_dict(self) -> dict[str, Any]:
        """``{"topic", "device", "kind", "retained", "payload"}``."""
        return dataclasses.asdict(self)


class FleetClient:
    """A short-lived operator connection: an :class:`MqttLink` (no will) feeding one inbox.

    ``link_factory`` builds the link from the config and client id (tests inject faults there).
    """

    def __init__(self, config: MqttConfig, *, client_id: str | None = None,
                 link_factory: Callable[[MqttConfig, str], MqttLink] = MqttLink) -> None:
        """Prepare the link (no network yet). Raises ConfigError, LinkError: as :class:`MqttLink`."""
        self.config = config
        self.prefix = config.prefix
        self.client_id = client_id or f"fleet-{secrets.token_hex(6)}"
        self.v5 = config.protocol == "5"
        self.reply_topic = f"{self.prefix}/fleet/{self.client_id}/reply" if self.v5 else None
        # A one-off random client id: a session kept at the broker after we leave would only be litter.
        self._link = link_factory(dataclasses.replace(config, session_expiry_seconds=0.0), self.client_id)
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._opened = False

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def subscribe(self, topic_filter: str) -> None:
        """Queue messages matching ``topic_filter`` for :meth:`next_message`; only before :meth:`open`."""
        if self._opened:
            raise RuntimeError("subscribe before open(): later subscriptions are not acknowledged before use")
        self._link.subscribe(topic_filter, self._inbox.put, qos=1)

    def open(self, *, replies: bool = False, timeout: float = CONNECT_TIMEOUT) -> None:
        """Connect; with ``replies`` also subscribe to command replies. Returns once every subscription is
        acknowledged, so a reply or retained message cannot slip past.

        Raises:
            LinkError: the broker was not reached within ``timeout`` (the message says why).
        """
        if replies:
            self.subscribe(self.reply_topic or f"{self.prefix}/+/reply/+")
        self._opened = True
        self._link.start()
        deadline = time.monotonic() + timeout
        while not self._link.connected:
            if time.monotonic() > deadline:
                why = self._link.last_error or "no answer"
                raise LinkError(f"cannot reach the MQTT broker {self.config.host}:{self.config.port} "
                                f"within {timeout:g} s: {why}")
            time.sleep(0.02)

    def close(self) -> None:
        """Disconnect cleanly (never raises)."""
        self._link.stop()

    def next_message(self, deadline: float | None) -> Message | None:
        """The next queued message, waiting until ``deadline`` (monotonic; None: forever); None at the deadline."""
        while (left := 0.5 if deadline is None else min(0.5, deadline - time.monotonic())) > 0:
            with contextlib.suppress(queue.Empty):  # short waits keep Ctrl-C responsive
                return self._inbox.get(timeout=left)
        return None

    def send(self, target: Target, verb: str, command_id: str, payload: bytes, *,
             timeout: float = CONNECT_TIMEOUT) -> None:
        """Publish a command (QoS 1, MQTT 5: our response topic + the id as correlation data) and wait
        for the broker's acknowledgement.

        Raises:
            LinkError: not connected, or the broker did not acknowledge within ``timeout``.
        """
        delivery = self._link.publish(target.topic(self.prefix, verb), payload, qos=1, response_topic=self.reply_topic,
                                      correlation_data=command_id.encode() if self.v5 else None)
        if not delivery.wait(timeout):
            raise LinkError(f"{verb} for {target} not acknowledged by the broker: {delivery.reason or 'timed out'}")

    def replies(self, ids: Mapping[str, str | None], deadline: float) -> Iterator[FleetReply]:
        """Yield the replies to the commands ``ids`` (id -> the device it was sent to, None for a group)
        as they arrive, until ``deadline`` (monotonic). Other messages are dropped."""
        while (message := self.next_message(deadline)) is not None:
            reply = self._reply(message, ids)
            if reply is not None:
                yield reply

    def _reply(self, message: Message, ids: Mapping[str, str | None]) -> FleetReply | None:
        parts = message.topic.split("/")
        if self.reply_topic is not None and message.topic == self.reply_topic:
            key, from_topic = (message.correlation_data or b"").decode("utf-8", "replace"), None
        elif len(parts) == 4 and parts[0] == self.prefix and parts[2] == "reply":
            key, from_topic = parts[3], parts[1]
        else:
            return None
        try:
            reply = Reply.from_json(message.payload)
        except CommandError:
            _log.warning("ignored a message on %s that is not a command reply", message.topic)
            return None
        command_id = reply.id if reply.id is not None and reply.id in ids else key
        if command_id not in ids or reply.data.get("in_progress"):
            return None  # not ours, or the interim answer to a redelivered command: the real one follows
        props = dict(message.user_properties)
        named = reply.data.get("device")
        device = props.get("device") or (named if isinstance(named, str) else None) or from_topic or ids[command_id]
        return FleetReply(device, command_id, reply.ok, reply.message, reply.data)


def watch_filters(prefix: str, device: str, kinds: Sequence[str]) -> list[str]:
    """The topic filters for ``kinds`` of ``device`` (``+``: every device).

    Raises:
        CommandError: an unknown kind or a bad device id.
    """
    if device != "+":
        _check_ident("device", device)
    unknown = [k for k in kinds if k not in _KIND_SUFFIX]
    if unknown or not kinds:
        raise CommandError(f"unknown kind {unknown[0] if unknown else ''!r} (known: {', '.join(KINDS)})")
    return [f"{prefix}/{device}/{_KIND_SUFFIX[k]}" for k in dict.fromkeys(kinds)]


def classify(prefix: str, message: Message) -> WatchMessage | None:
    """``message`` as ``fleet watch`` shows it; None when it is not a device topic."""
    parts = message.topic.split("/")
    if len(parts) < 3 or parts[0] != prefix or parts[2] not in _KIND_SUFFIX:
        return None
    try:
        payload: Any = load_json(message.payload, "payload", error=CommandError)
    except CommandError:  # shown as text: not strict JSON (a repeated key would show one reading of two)
        payload = message.payload.decode("utf-8", "replace")
    return WatchMessage(message.topic, parts[1], parts[2], message.retain, payload)

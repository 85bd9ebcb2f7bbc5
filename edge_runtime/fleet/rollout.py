"""Staged rollouts over the fleet: discover devices from retained status, plan waves, update wave by wave.

A wave fails when more than ``max_failures`` of its devices do not reply ok with
the new version active; later waves are then left untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime._util.strict_text import load_json
from edge_runtime.errors import CommandError, LinkError
from edge_runtime.fleet.client import IDENT, FleetClient, FleetReply, Target, build_command

__all__ = ["DeviceOutcome", "DeviceStatus", "RolloutResult", "discover", "plan_waves", "rollout", "select_devices"]

_log = logging.getLogger(__name__)
_WAVE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", re.ASCII)  # \d alone takes any script's digits


@dataclass(frozen=True)
class DeviceStatus:
    """A device's retained status: ``state`` (online/offline), model versions, groups."""

    device: str
    state: str
    versions: Mapping[str, int | None]
    groups: tuple[str, ...]


def discover(client: FleetClient, *, settle: float = 0.5, max_wait: float = 5.0) -> dict[str, DeviceStatus]:
    """Read the retained ``<prefix>/+/status`` messages (subscribed before :meth:`FleetClient.open`).

    MQTT has no end-of-retained marker: reading stops once none arrived for ``settle``
    seconds (or after ``max_wait``). The device id comes from the topic, not the payload.
    """
    found: dict[str, DeviceStatus] = {}
    end = time.monotonic() + max_wait
    while (message := client.next_message(min(end, time.monotonic() + settle))) is not None:
        parts = message.topic.split("/")
        if len(parts) != 3 or parts[0] != client.prefix or parts[2] != "status" or not IDENT.fullmatch(parts[1]):
            continue  # an id that cannot be a topic level cannot be sent a command either
        try:
            doc = load_json(message.payload, "status", error=CommandError)
            versions = {str(k): v for k, v in dict(doc.get("versions") or {}).items()}
            groups = tuple(map(str, doc.get("groups", ())))
            found[parts[1]] = DeviceStatus(parts[1], str(doc["state"]), versions, groups)
        except (CommandError, ValueError, TypeError, KeyError, AttributeError):
            _log.warning("ignored a malformed status from %s", parts[1])
    return found


def select_devices(statuses: Mapping[str, DeviceStatus], *, group: str | None = None,
                   devices: Sequence[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The devices to update and the group members skipped (device -> why).

    ``devices`` keep their order (the operator picks the canary); a group's online
    members are sorted by id, its offline ones skipped.

    Raises:
        CommandError: a named device is not online, or no member of ``group`` is.
    """
    if devices is not None:
        missing = [f"{d} ({statuses[d].state})" if d in statuses else f"{d} (no status seen)"
                   for d in devices if d not in statuses or statuses[d].state != "online"]
        if missing:
            raise CommandError(f"not online, nothing sent: {', '.join(missing)}")
        return list(dict.fromkeys(devices)), {}
    members = sorted(s.device for s in statuses.values() if group in s.groups)
    online = [d for d in members if statuses[d].state == "online"]
    if not online:
        raise CommandError(f"no online device in group {group} ({len(members)} member(s) seen, none online)")
    return online, {d: statuses[d].state for d in members if d not in online}


def plan_waves(devices: Sequence[str], spec: str) -> list[list[str]]:
    """Split ``devices`` into waves. ``spec`` lists cumulative sizes, each a count or a percentage
    (rounded up): ``1,25%,100%`` is one canary, then up to a quarter, then the rest. Devices past
    the last size are in no wave. Empty waves are dropped.

    Raises:
        CommandError: a size is malformed, zero, or over 100%.
    """
    waves: list[list[str]] = []
    done = 0
    for token in spec.split(","):
        match = _WAVE.fullmatch(token)
        if match is None or float(match[1]) <= 0 or (match[2] and float(match[1]) > 100):
            raise CommandError(f"bad wave size {token.strip()[:32]!r} in --waves (e.g. 1,25%,100%)")
        if not match[2] and "." in match[1]:
            raise CommandError(f"bad wave size {token.strip()!r}: a count must be whole")
        size = math.ceil(float(match[1]) * len(devices) / 100) if match[2] else int(match[1])
        upto = min(len(devices), max(done, size))
        if upto > done:
            waves.append(list(devices[done:upto]))
            done = upto
    return waves


@dataclass(frozen=True)
class DeviceOutcome:
    """How ``update`` went on one device: ``ok`` when it replied ok with the new version active."""

    device: str
    wave: int
    ok: bool
    message: str
    model: str | None = None
    version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{"device", "wave", "ok", "message", "model", "version"}``."""
        return dataclasses.asdict(self)


@dataclass
class RolloutResult:
    """Every outcome so far; ``stopped_at`` is the wave that failed too often (None: all waves ran)."""

    waves: list[list[str]]
    outcomes: list[DeviceOutcome] = field(default_factory=list)
    stopped_at: int | None = None

    @property
    def untouched(self) -> list[str]:
        """Devices of waves that never ran: they received nothing."""
        sent = {o.device for o in self.outcomes}
        return [d for wave in self.waves for d in wave if d not in sent]

    @property
    def ok(self) -> bool:
        """Every planned device updated."""
        return self.stopped_at is None and all(o.ok for o in self.outcomes) and not self.untouched

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {"status": "stopped" if self.stopped_at is not None else "completed", "stopped_at": self.stopped_at,
                "waves": self.waves, "updated": [o.device for o in self.outcomes if o.ok],
                "failed": {o.device: o.message for o in self.outcomes if not o.ok}, "untouched": self.untouched}


def _outcome(device: str, wave: int, reply: FleetReply) -> DeviceOutcome:
    model, version = reply.data.get("model"), reply.data.get("version")
    model = model if isinstance(model, str) else None
    version = version if isinstance(version, int) and not isinstance(version, bool) else None
    if reply.ok and reply.data.get("active") is True and version is not None:
        return DeviceOutcome(device, wave, True, reply.message, model, version)
    why = reply.message if not reply.ok else f"new version not active ({reply.message})"
    return DeviceOutcome(device, wave, False, why, model, version)


def rollout(client: FleetClient, waves: Sequence[Sequence[str]], args: Mapping[str, Any], *, timeout: float,
            max_failures: int = 0, keys: Sequence[Ed25519PrivateKey] = (),
            on_outcome: Callable[[DeviceOutcome], None] = lambda outcome: None) -> RolloutResult:
    """Send ``update`` with ``args`` wave by wave (``client`` opened with replies); each device gets its own
    command (signed for it with ``keys``) and has ``timeout`` seconds from its wave's start to reply.
    Stops before the next wave once more than ``max_failures`` devices of a wave failed.

    Raises:
        CommandError: a device id, ``args`` or ``keys`` make no valid command (before anything is sent).
    """
    result = RolloutResult([list(w) for w in waves])
    run = secrets.token_hex(4)
    everyone = [Target(device=d) for wave in result.waves for d in wave]  # a bad id must not stop it half-way
    if everyone:
        build_command("update", args, everyone[0], command_id=f"rollout-{run}-{everyone[0].device}", keys=keys)
    for number, wave in enumerate(result.waves, start=1):
        deadline = time.monotonic() + timeout
        pending: dict[str, str] = {}
        for device in wave:
            target = Target(device=device)
            command_id, payload = build_command("update", args, target, command_id=f"rollout-{run}-{device}",
                                                keys=keys)
            try:
                client.send(target, "update", command_id, payload)
            except LinkError as e:
                outcome = DeviceOutcome(device, number, False, f"not sent: {e.one_line()}")
                result.outcomes.append(outcome)
                on_outcome(outcome)
                continue
            pending[command_id] = device
        for reply in client.replies(pending, deadline) if pending else ():
            if reply.id in pending:
                result.outcomes.append(outcome := _outcome(pending.pop(str(reply.id)), number, reply))
                on_outcome(outcome)
            if not pending:
                break
        for device in pending.values():
            result.outcomes.append(outcome := DeviceOutcome(device, number, False, f"no reply within {timeout:g} s"))
            on_outcome(outcome)
        if sum(not o.ok for o in result.outcomes if o.wave == number) > max_failures:
            result.stopped_at = number
            break
    return result

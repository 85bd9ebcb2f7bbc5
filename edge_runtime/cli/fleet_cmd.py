"""``edge-runtime fleet send|watch|rollout``: operator tools over the MQTT contract.

The broker (host, port, protocol, TLS, credentials, prefix) comes from the
``[mqtt]`` section of ``--config``; ``--broker HOST:PORT`` overrides the address.
``send`` and ``watch`` print one JSON line per message (ready for ``jq``);
``rollout`` prints one line per device and a summary (JSON lines with ``--json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime._util.strict_text import load_json, parse_decimal
from edge_runtime.bundle.signing import load_private_key
from edge_runtime.cli.common import Context, verb_parser
from edge_runtime.commands.parse import VERBS
from edge_runtime.config.model import MqttConfig
from edge_runtime.errors import CommandError, ConfigError
from edge_runtime.fleet.client import KINDS, FleetClient, Target, build_command, classify, watch_filters
from edge_runtime.fleet.rollout import DeviceOutcome, discover, plan_waves, rollout, select_devices

__all__ = ["register"]


def _line(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()  # a stream: each line matters as soon as it arrives


def _shown(text: str) -> str:
    """Device-supplied text for a terminal: no escape sequences, one bounded line."""
    return "".join(c if c.isprintable() else "?" for c in text[:500])


def _broker(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    try:
        number = parse_decimal(port, "port", max_digits=5, error=ConfigError)
    except ConfigError:
        number = 0
    if not sep or not host or not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT, got {value!r}")
    return host.strip("[]"), number  # [::1]:1883


def _client(ctx: Context, args: argparse.Namespace) -> FleetClient:
    config: MqttConfig = ctx.config.mqtt
    if args.broker is not None:
        config = dataclasses.replace(config, host=args.broker[0], port=args.broker[1])
    if not getattr(args, "verbose", False):
        # The link logs every reconnect attempt; a CLI run reports the last reason once, in its error line.
        # Other warnings (a subscription the broker's ACL refused) still show.
        logging.getLogger("edge_runtime.mqtt.link").addFilter(lambda r: "reconnecting in" not in str(r.msg))
    return FleetClient(config)


def _command_args(args: argparse.Namespace) -> dict[str, Any]:
    merged = load_json(args.args, "--args", error=CommandError)  # strict, as the device reads it
    if not isinstance(merged, dict):
        raise CommandError("--args must be a JSON object")
    for item in args.arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CommandError(f"--arg {item[:64]!r} must be KEY=VALUE")
        try:  # numbers, booleans, null, objects as JSON; anything else (a URL, a name) as text
            merged[key] = load_json(value, "--arg", error=CommandError)
        except CommandError:
            merged[key] = value
    return merged


def _keys(paths: list[Path] | None) -> list[Ed25519PrivateKey]:
    return [load_private_key(p) for p in paths or ()]


def _send(ctx: Context, args: argparse.Namespace) -> int:
    target = Target(device=args.device, group=args.group)
    command_id, payload = build_command(args.verb, _command_args(args), target, command_id=args.id,
                                        keys=_keys(args.sign))
    expect = 1 if target.device is not None else args.expect
    replies = []
    with _client(ctx, args) as client:
        client.open(replies=True)
        client.send(target, args.verb, command_id, payload)
        seen: set[tuple[str, bytes]] = set()
        for reply in client.replies({command_id: target.device}, time.monotonic() + args.timeout):
            key = (reply.device or "", json.dumps(reply.to_dict(), sort_keys=True, default=str).encode())
            if reply.device is not None and key in seen:
                continue  # a QoS 1 redelivery of the same answer
            seen.add(key)
            replies.append(reply)
            _line(reply.to_dict())
            if expect is not None and len(replies) >= expect:
                break
    if not replies:
        raise CommandError(f"no reply from {target} within {args.timeout:g} s")
    if expect is not None and len(replies) < expect:
        raise CommandError(f"only {len(replies)} of {expect} expected replies from {target} within {args.timeout:g} s")
    failed = [r for r in replies if not r.ok]
    if failed:
        raise CommandError(f"{len(failed)} of {len(replies)} replies not ok: {_shown(failed[0].message)}")
    return 0


def _watch(ctx: Context, args: argparse.Namespace) -> int:
    with _client(ctx, args) as client:
        for topic_filter in watch_filters(client.prefix, args.device, args.kind.split(",")):
            client.subscribe(topic_filter)
        client.open()
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        shown = 0
        try:
            while args.count is None or shown < args.count:
                message = client.next_message(deadline)
                if message is None:
                    break
                watched = classify(client.prefix, message)
                if watched is not None:
                    _line(watched.to_dict())
                    shown += 1
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a watch ends
    return 0


def _rollout(ctx: Context, args: argparse.Namespace) -> int:
    if (args.url is None) == (args.target is None):
        raise CommandError("give --target PATH (a TUF target) or --url URL, one of them")
    update: dict[str, Any] = {"target": args.target} if args.target is not None else {"url": args.url}
    if (args.sha256 is not None or args.size is not None) and args.target is not None:
        raise CommandError("--sha256/--size go with --url: a TUF target's length and hashes are signed")
    if args.sha256 is not None:
        update["sha256"] = args.sha256.lower()
    if args.size is not None:
        update["size"] = args.size
    keys = _keys(args.sign)
    named = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices is not None else None
    if named == []:
        raise CommandError("--devices names no device")
    with _client(ctx, args) as client:
        client.subscribe(f"{client.prefix}/+/status")
        client.open(replies=True)
        targets, skipped = select_devices(discover(client), group=args.group, devices=named)
        waves = plan_waves(targets, args.waves)
        unplanned = targets[sum(map(len, waves)):]  # past the last wave size: left alone on purpose
        if not ctx.json:
            for device, state in sorted(skipped.items()):
                print(f"skipped {device}: {state}", flush=True)

        def report(o: DeviceOutcome) -> None:
            if ctx.json:
                _line(o.to_dict())
            else:
                print(f"wave {o.wave} {o.device}: {'ok' if o.ok else 'FAILED'}: {_shown(o.message)}", flush=True)

        result = rollout(client, waves, update, timeout=args.timeout, max_failures=args.max_failures, keys=keys,
                         on_outcome=report)
    summary = {**result.to_dict(), "skipped": skipped, "unplanned": unplanned}
    updated, failed, untouched = len(summary["updated"]), len(summary["failed"]), len(result.untouched)
    if ctx.json:
        _line({"summary": summary})
    else:
        state = f"stopped after wave {result.stopped_at}" if result.stopped_at is not None else "completed"
        print(f"rollout {state}: {updated} updated, {failed} failed, {untouched} untouched, "
              f"{len(skipped)} skipped (offline), {len(unplanned)} in no wave", flush=True)
    if result.stopped_at is not None:
        raise CommandError(f"rollout stopped in wave {result.stopped_at}: more than {args.max_failures} device(s) "
                           f"failed; {untouched} device(s) left untouched")
    if not result.ok:
        raise CommandError(f"rollout completed, but {failed + untouched} of {updated + failed + untouched} "
                           "device(s) not updated")
    return 0


def _number(kind: type[int] | type[float], *, minimum: float = 0, inclusive: bool = False) -> Any:
    def parse(value: str) -> int | float:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
        if number < minimum or (number == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'at least' if inclusive else 'above'} {minimum}, got {value!r}")
        return number
    return parse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", type=_broker, default=None, metavar="HOST:PORT",
                   help="broker address (default: [mqtt] host/port of --config)")


def register(verbs: Any) -> None:
    """Add the ``fleet`` verb and its sub-verbs."""
    fleet = verbs.add_parser("fleet", help="send commands to devices, watch them, roll out updates (MQTT)")
    sub = fleet.add_subparsers(dest="fleet_verb", metavar="SUBVERB", required=True)

    p = verb_parser(sub, "send", "send one command; print each device's reply as a JSON line")
    _common(p)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", metavar="ID", help="one device (waits for its reply)")
    target.add_argument("--group", metavar="G", help="every device in group G")
    target.add_argument("--all", action="store_true", help="every device")
    p.add_argument("verb", choices=VERBS, metavar="VERB", help=f"one of: {', '.join(VERBS)}")
    p.add_argument("--args", default="{}", metavar="JSON", help="the command's args as a JSON object")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="one arg (VALUE as JSON when it parses, else text); repeatable, overrides --args")
    p.add_argument("--id", default=None, help="command id (default: random)")
    p.add_argument("--sign", action="append", type=Path, metavar="KEYFILE",
                   help="operator private key: send a signed command (repeat for k-of-n)")
    p.add_argument("--timeout", type=_number(float), default=10.0, metavar="S",
                   help="seconds to wait for replies; group/all wait this long unless --expect (default %(default)s)")
    p.add_argument("--expect", type=_number(int), default=None, metavar="N",
                   help="group/all: stop after N replies (fewer by the timeout: exit 1)")
    p.set_defaults(handler=_send)

    p = verb_parser(sub, "watch", "print device status/telemetry/events/results/replies as JSON lines")
    _common(p)
    p.add_argument("--device", default="+", metavar="ID", help="one device (default: + = every device)")
    p.add_argument("--kind", default=",".join(KINDS), metavar="KINDS",
                   help="comma-separated, from: %(default)s (default: all)")
    p.add_argument("--count", type=_number(int), default=None, metavar="N", help="exit after N messages")
    p.add_argument("--timeout", type=_number(float), default=None, metavar="S", help="exit after S seconds")
    p.set_defaults(handler=_watch)

    p = verb_parser(sub, "rollout", "update online devices wave by wave; stop when a wave fails")
    _common(p)
    p.add_argument("--target", help="TUF target path (models/<name>.bundle) the devices resolve in their repository")
    p.add_argument("--url", help="bundle URL the devices download (devices without a TUF repository)")
    p.add_argument("--sha256", default=None, metavar="HEX", help="expected bundle sha256 (checked by devices)")
    p.add_argument("--size", type=_number(int), default=None, metavar="N", help="expected bundle size in bytes")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--group", metavar="G", help="the online devices whose status lists group G")
    who.add_argument("--devices", metavar="A,B,C", help="these devices, in this order (all must be online)")
    p.add_argument("--waves", default="1,25%,100%", metavar="SIZES",
                   help="cumulative wave sizes, counts or percentages (default %(default)s)")
    p.add_argument("--sign", action="append", type=Path, metavar="KEYFILE", help="operator private key (repeat)")
    p.add_argument("--timeout", type=_number(float), default=300.0, metavar="S",
                   help="seconds each wave's devices have to reply (default %(default)s)")
    p.add_argument("--max-failures", type=_number(int, inclusive=True), default=0, metavar="K",
                   help="stop when more than K devices of a wave fail (default %(default)s)")
    p.set_defaults(handler=_rollout)

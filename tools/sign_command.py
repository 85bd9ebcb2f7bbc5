"""Build and sign a fleet command payload for devices with ``mqtt.signed_commands = true``.

Usage:
    python tools/sign_command.py --key KEY [--key KEY2] [--args JSON] [--id ID]
                                 [--device DEVICE | --group GROUP] [--out FILE] VERB

Writes the signed envelope (see :mod:`edge_runtime.commands.auth`) to FILE or
stdout, ready to publish on ``<prefix>/<device>/cmd/VERB`` (or the group / all
topic), for example ``mosquitto_pub -t edge/cam-7/cmd/rollback -f FILE``.
The command gets a fresh random nonce and the current time, so it must reach
the device within its ``command_max_age_seconds`` (default 300 s) and is
accepted once. ``--device`` / ``--group`` bind the signature to that target,
so the same payload cannot be replayed to other devices.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_runtime._util.fsutil import atomic_write
from edge_runtime.bundle.signing import load_private_key
from edge_runtime.cli.common import report_errors
from edge_runtime.commands.auth import new_command, sign_command
from edge_runtime.commands.parse import VERBS
from edge_runtime.errors import CommandError


def build(verb: str, keys: list[Path], args_json: str, *, command_id: str | None = None,
          device: str | None = None, group: str | None = None) -> bytes:
    """The signed payload for ``verb`` with ``args_json`` (a JSON object), signed by every key.

    Raises:
        EdgeRuntimeError: a key cannot be loaded, or the command is refused
            by the device's own rules (the message names the problem).
    """
    try:
        args = json.loads(args_json)
    except ValueError as e:
        raise CommandError(f"--args is not JSON: {e}") from e
    if not isinstance(args, dict):
        raise CommandError("--args must be a JSON object")
    private = [load_private_key(k) for k in keys]
    return sign_command(new_command(verb, args, command_id=command_id, device=device, group=group), private)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("verb", choices=VERBS)
    parser.add_argument("--key", type=Path, action="append", required=True, help="operator private key (repeat)")
    parser.add_argument("--args", default="{}", help="the command's args as a JSON object (default {})")
    parser.add_argument("--id", default=None, help="command id (default: random)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--device", default=None, help="only this device may accept it")
    target.add_argument("--group", default=None, help="only devices in this group may accept it")
    parser.add_argument("--out", type=Path, default=None, help="write here (default: stdout)")
    opts = parser.parse_args(argv)
    def run() -> int:
        payload = build(opts.verb, opts.key, opts.args, command_id=opts.id, device=opts.device, group=opts.group)
        if opts.out is None:
            sys.stdout.write(payload.decode() + "\n")
        else:
            atomic_write(opts.out, payload, 0o644)
        return 0

    return report_errors(run)


if __name__ == "__main__":
    sys.exit(main())

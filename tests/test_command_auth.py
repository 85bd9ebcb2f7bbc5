"""Signed fleet commands: operator signatures, verb and target binding, freshness, replay after restart."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.bundle.signing import generate_keypair, key_id, load_private_key, load_trusted_keys, sign_document
from edge_runtime.commands.auth import SIGNED_VERBS, CommandAuth, new_command, sign_command
from edge_runtime.commands.dispatch import Dispatcher
from edge_runtime.commands.ledger import CommandLedger
from edge_runtime.commands.parse import Command, Reply
from edge_runtime.errors import CommandError

REPO = Path(__file__).resolve().parent.parent
NOW = 1_767_225_600.0
MAX_AGE = 300.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@dataclass
class Operators:
    trusted: Ed25519PrivateKey
    second: Ed25519PrivateKey
    evil: Ed25519PrivateKey

    @property
    def public(self) -> dict[str, Any]:
        return {key_id(k.public_key()): k.public_key() for k in (self.trusted, self.second)}


@dataclass
class Env:
    ops: Operators
    clock: Clock
    ledger: CommandLedger
    auth: CommandAuth

    def verify(self, payload: bytes, verb: str, *, device: str = "cam-7", groups: tuple[str, ...] = ("lobby",)
               ) -> Command:
        return self.auth.verify(payload, verb, device=device, groups=groups)


@pytest.fixture()
def env(tmp_path: Path) -> Iterator[Env]:
    ops = Operators(Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate())
    clock = Clock()
    ledger = CommandLedger(tmp_path / "commands.db", 3600.0, clock)
    yield Env(ops, clock, ledger, CommandAuth(ops.public, max_age_seconds=MAX_AGE, nonce_store=ledger, clock=clock))
    ledger.close()


def signed(key: Ed25519PrivateKey, verb: str = "rollback", args: dict[str, Any] | None = None, *,
           ts: float = NOW, **extra: Any) -> bytes:
    command = new_command(verb, args if args is not None else {"model": "m"}, command_id=extra.pop("id", None),
                          ts=ts)
    command.update(extra)
    return sign_command(command, [key])


def resigned(key: Ed25519PrivateKey, payload: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """Edit the inner command of ``payload`` and sign the result again (a validly signed odd command)."""
    inner = json.loads(json.loads(payload)["signed"])
    edit(inner)
    text = json.dumps(inner)
    return json.dumps({"signed": text, "signatures": _sign_text(key, text)}).encode()


def _sign_text(key: Ed25519PrivateKey, text: str) -> list[dict[str, str]]:
    return list(json.loads(sign_document(text.encode(), [key]))["signatures"])


def tampered(payload: bytes) -> bytes:
    envelope = json.loads(payload)
    envelope["signed"] = envelope["signed"].replace('"model":"m"', '"model":"x"')
    return json.dumps(envelope).encode()


def test_a_valid_signed_command_is_accepted(env: Env) -> None:
    command = env.verify(signed(env.ops.trusted, id="c-1", args={"model": "m", "version": 2}), "rollback")
    assert (command.id, command.verb, command.ts, dict(command.args)) == ("c-1", "rollback", NOW,
                                                                         {"model": "m", "version": 2})
    assert command.signed_by == (key_id(env.ops.trusted.public_key()),) and command.nonce
    both = sign_command(new_command("pin", {"model": "m", "version": 1}, ts=NOW), [env.ops.trusted, env.ops.second])
    assert len(env.verify(both, "pin").signed_by or ()) == 2
    assert env.verify(signed(env.ops.trusted, device="cam-7"), "rollback").verb == "rollback"
    assert env.verify(signed(env.ops.trusted, group="lobby"), "rollback").verb == "rollback"
    env.clock.now = NOW + MAX_AGE - 1  # still inside the age window
    assert env.verify(signed(env.ops.trusted), "rollback").ts == NOW


REFUSED = [  # (case, build(ops) -> payload, verb, message part)
    ("unsigned", lambda o: json.dumps({"id": "u", "ts": NOW, "args": {}}).encode(), "rollback", "is not signed"),
    ("untrusted key", lambda o: signed(o.evil), "rollback", "0 valid trusted signature(s), 1 required; untrusted"),
    ("tampered text", lambda o: tampered(signed(o.trusted)), "rollback", "does not match the signed content"),
    ("signed ping on the update topic", lambda o: signed(o.trusted, "ping", {}), "update",
     "names verb 'ping' but arrived on the 'update' topic"),
    ("no verb inside", lambda o: resigned(o.trusted, signed(o.trusted), lambda c: c.pop("verb")), "rollback",
     "missing 'verb'"),
    ("no nonce", lambda o: resigned(o.trusted, signed(o.trusted), lambda c: c.pop("nonce")), "rollback",
     "missing 'nonce'"),
    ("short nonce", lambda o: resigned(o.trusted, signed(o.trusted), lambda c: c.update(nonce="abc")), "rollback",
     "nonce must be 16 to 128"),
    ("expired", lambda o: signed(o.trusted, ts=NOW - MAX_AGE - 5), "rollback",
     "expired timestamp: command is 305 s old"),
    ("future", lambda o: signed(o.trusted, ts=NOW + MAX_AGE + 60), "rollback",
     "expired timestamp: command is 360 s in the future"),
    ("other device", lambda o: signed(o.trusted, device="cam-8"), "rollback", "for device 'cam-8', not 'cam-7'"),
    ("other group", lambda o: signed(o.trusted, group="dock"), "rollback", "for group 'dock'"),
    ("device and group", lambda o: resigned(o.trusted, signed(o.trusted), lambda c: c.update(device="cam-7",
                                                                                            group="lobby")),
     "rollback", "both a device and a group"),
    ("envelope extra key", lambda o: json.dumps({**json.loads(signed(o.trusted)), "x": 1}).encode(), "rollback",
     "envelope has unknown key 'x'"),
    ("signed not a string", lambda o: json.dumps({"signed": {"id": "a"}, "signatures": []}).encode(), "rollback",
     "needs 'signed' (a string)"),
    ("no signatures", lambda o: json.dumps({**json.loads(signed(o.trusted)), "signatures": []}).encode(), "rollback",
     "must list 1 to 32 signatures"),
    ("deep inner text", lambda o: json.dumps({"signed": "[" * 5000, "signatures": _sign_text(o.trusted, "[" * 5000)}
                                             ).encode(), "rollback", "signed command is nested deeper than 32"),
]


@pytest.mark.parametrize(("build", "verb", "part"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused(env: Env, build: Callable[[Operators], bytes], verb: str, part: str) -> None:
    with pytest.raises(CommandError) as err:
        env.verify(build(env.ops), verb)
    assert part in err.value.one_line()
    # The refusal used up no nonce: the same operator's next command goes through.
    assert env.verify(signed(env.ops.trusted), "rollback").verb == "rollback"


def test_a_replayed_nonce_is_refused_also_after_a_restart(env: Env, tmp_path: Path) -> None:
    payload = signed(env.ops.trusted, id="once")
    env.verify(payload, "rollback")
    with pytest.raises(CommandError, match="replayed command"):
        env.verify(payload, "rollback")
    env.ledger.close()  # the daemon restarts: a new ledger over the same file
    ledger = CommandLedger(tmp_path / "commands.db", 3600.0, env.clock)
    auth = CommandAuth(env.ops.public, max_age_seconds=MAX_AGE, nonce_store=ledger, clock=env.clock)
    env.clock.now += 60
    with pytest.raises(CommandError, match="replayed command"):
        auth.verify(payload, "rollback", device="cam-7", groups=())
    env.clock.now += MAX_AGE  # past its age the timestamp alone refuses it, and the nonce may go
    with pytest.raises(CommandError, match="expired timestamp"):
        auth.verify(payload, "rollback", device="cam-7", groups=())
    assert ledger.prune() >= 1
    env.ledger = ledger


def dispatcher(env: Env, ran: list[str], *, auth: bool = True) -> Dispatcher:
    def handler(command: Command) -> Reply:
        ran.append(f"{command.verb}:{command.id}")
        return Reply(True, "done")

    return Dispatcher({v: handler for v in ("ping", "status", "rollback", "update", "pin", "unpin", "config")},
                      ledger=env.ledger, auth=env.auth if auth else None, signed_verbs=SIGNED_VERBS if auth else (),
                      max_bytes=65536, max_depth=32, device="cam-7", groups=("lobby",))


def test_dispatcher_requires_signatures_for_protected_verbs_only(env: Env) -> None:
    ran: list[str] = []
    d = dispatcher(env, ran)
    for verb in sorted(SIGNED_VERBS):
        reply = d.handle(verb, json.dumps({"id": f"u-{verb}", "ts": NOW, "args": {}}).encode())
        assert not reply.ok and reply.message == f"command {verb!r} must be signed by an operator key"
        assert reply.id == f"u-{verb}"
    assert d.handle("ping", json.dumps({"id": "p-1", "ts": NOW}).encode()).ok  # ping/status may be unsigned
    assert d.handle("rollback", signed(env.ops.trusted, id="r-1")).ok
    # A signed ping is verified too: a bad signature is refused even where none was required.
    reply = d.handle("ping", tampered(signed(env.ops.trusted, "ping", {"model": "m"}, id="p-2")))
    assert not reply.ok and "signature refused" in reply.message and reply.id == "p-2"
    reply = d.handle("rollback", signed(env.ops.evil, id="r-evil"))
    assert not reply.ok and "untrusted" in reply.message
    assert ran == ["ping:p-1", "rollback:r-1"]


def test_signed_envelopes_are_refused_where_signing_is_off(env: Env) -> None:
    ran: list[str] = []
    reply = dispatcher(env, ran, auth=False).handle("rollback", signed(env.ops.trusted, id="r-2"))
    assert not reply.ok and "signed commands are not enabled" in reply.message and ran == []
    with pytest.raises(ValueError, match="signed_verbs need a CommandAuth"):
        Dispatcher({}, ledger=env.ledger, auth=None, signed_verbs={"update"}, max_bytes=1024, max_depth=4, device="d")


def test_sign_command_checks_the_command_like_a_device_would(env: Env) -> None:
    with pytest.raises(CommandError, match="unknown command verb 'reboot'"):
        sign_command({**new_command("ping"), "verb": "reboot"}, [env.ops.trusted])
    with pytest.raises(CommandError, match="nonce must be"):
        sign_command({**new_command("ping"), "nonce": "short"}, [env.ops.trusted])
    with pytest.raises(CommandError, match="not plain JSON"):
        sign_command(new_command("config", {"x": float("nan")}), [env.ops.trusted])
    with pytest.raises(CommandError, match="same operator key"):
        sign_command(new_command("ping"), [env.ops.trusted, env.ops.trusted])
    with pytest.raises(CommandError, match="at least one operator key"):
        sign_command(new_command("ping"), [])


def test_the_sign_command_tool_makes_payloads_a_device_accepts(tmp_path: Path) -> None:
    keys, trust = tmp_path / "keys", tmp_path / "operator-keys"
    keys.mkdir()
    trust.mkdir()
    generate_keypair(keys / "op")
    (trust / "op.pub").write_bytes((keys / "op.pub").read_bytes())
    out = tmp_path / "payload.json"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "sign_command.py"), "--key", str(keys / "op"),
                             "--args", '{"model": "face", "version": 3}', "--id", "fleet-1", "--device", "cam-7",
                             "--out", str(out), "pin"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    ledger = CommandLedger(tmp_path / "commands.db", 60.0)
    auth = CommandAuth(load_trusted_keys(trust), max_age_seconds=MAX_AGE, nonce_store=ledger)
    command = auth.verify(out.read_bytes(), "pin", device="cam-7", groups=())
    assert command.id == "fleet-1" and dict(command.args) == {"model": "face", "version": 3}
    assert command.signed_by == (key_id(load_private_key(keys / "op").public_key()),)
    ledger.close()
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "sign_command.py"), "--key", str(keys / "op"),
                          "--args", "[1]", "ping"], capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: --args must be a JSON object"

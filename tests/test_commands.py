"""Fleet commands end to end: real store, activator, OTA (loopback HTTP), ledger on disk."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import stat
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import pack_onnx
from http_fault_server import FaultServer, Route
from test_activation import Rig

from edge_runtime.bundle.manifest import Gates
from edge_runtime.bundle.signing import generate_keypair
from edge_runtime.cache.pins import pinned_version
from edge_runtime.commands.dispatch import Dispatcher
from edge_runtime.commands.handlers import DeviceCommands
from edge_runtime.commands.ledger import CommandLedger
from edge_runtime.commands.parse import Command, Reply, best_effort_id, load_object, parse_command
from edge_runtime.commands.runtime_settings import RuntimeSettings
from edge_runtime.config.model import Config, MqttConfig, OtaConfig
from edge_runtime.errors import CommandError
from edge_runtime.update.ota import OtaUpdater

Zoo = Callable[[str], Path]
MODEL = "ppocr-cls"


def cmd(command_id: str, args: dict[str, Any] | None = None, ts: float = 1_700_000_000.0) -> bytes:
    return json.dumps({"id": command_id, "ts": ts, "args": args or {}}).encode()


@dataclass
class Harness:
    """A Dispatcher over DeviceCommands over a real Rig; ``calls`` counts handler executions per verb."""

    rig: Rig
    settings: RuntimeSettings
    ledger: CommandLedger
    dispatcher: Dispatcher
    calls: Counter[str]
    seq: int = 0

    def send(self, verb: str, args: dict[str, Any] | None = None, *, command_id: str | None = None) -> Reply:
        self.seq += 1
        return self.dispatcher.handle(verb, cmd(command_id or f"{verb}-{self.seq}", args))


def counted(calls: Counter[str], verb: str, handler: Callable[[Command], Reply]) -> Callable[[Command], Reply]:
    def run(command: Command) -> Reply:
        calls[verb] += 1
        return handler(command)

    return run


def make_harness(root: Path, keys: dict[str, Path], zoo: Zoo) -> Harness:
    rig = Rig(root, keys, zoo, probation_inferences=0, probation_seconds=3600)
    ota = OtaUpdater(OtaConfig(allow_http=True, retries=0), rig.store, rig.activator, rig.bus)
    settings = RuntimeSettings.from_config(Config())

    def status() -> dict[str, Any]:
        return {"versions": {n: s.version for n, s in rig.service.slots.items()},
                "probation": {MODEL: rig.activator.on_probation(MODEL)}}

    calls: Counter[str] = Counter()
    device = DeviceCommands(rig.activator, ota, rig.store, settings, status)
    handlers = {verb: counted(calls, verb, h) for verb, h in device.handlers().items()}
    ledger = CommandLedger(rig.config.state_dir / "commands.db", 3600.0)
    # 1 MiB: big enough that the 100,000-deep payload is refused by the depth scan, not the size cap.
    dispatcher = Dispatcher(handlers, ledger=ledger, auth=None, signed_verbs=(), max_bytes=1 << 20, max_depth=32,
                            device="dev-1")
    return Harness(rig, settings, ledger, dispatcher, calls)


@pytest.fixture()
def harness(tmp_path: Path, keys: dict[str, Path], zoo: Zoo) -> Iterator[Harness]:
    h = make_harness(tmp_path, keys, zoo)
    yield h
    h.ledger.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, zoo: Zoo) -> Iterator[Harness]:
    """One harness for the refusal tables: each case must leave it as it found it (they assert so)."""
    root = tmp_path_factory.mktemp("shared")
    (root / "trust").mkdir()
    generate_keypair(root / "a")
    (root / "trust" / "a.pub").write_bytes((root / "a.pub").read_bytes())
    h = make_harness(root, {"trust_dir": root / "trust", "a": root / "a"}, zoo)
    yield h
    h.ledger.close()


# ---------------------------------------------------------------------- verbs, end to end


def test_every_verb_end_to_end(harness: Harness) -> None:
    h, rig = harness, harness.rig
    cache = rig.store.cache
    reply = h.dispatcher.handle("ping", cmd("p1", ts=1234.5))
    assert reply.ok and reply.id == "p1" and reply.data["pong"] == 1234.5

    reply = h.send("status")
    assert reply.ok and reply.data["versions"] == {MODEL: 1} and reply.data["settings"]["mqtt.telemetry_seconds"] == 10

    reply = h.send("rollback", {"model": MODEL, "version": 2})
    assert reply.ok and reply.data == {"model": MODEL, "version": 2, "from": 1, "pinned": None}, reply
    assert rig.version() == 2 and cache.active_version(MODEL) == 2
    reply = h.send("rollback", {"model": MODEL})  # default: the previous version
    assert reply.ok and reply.data["version"] == 1 and rig.version() == 1

    reply = h.send("pin", {"model": MODEL, "version": 2})
    assert reply.ok and reply.data["switched"] is True, reply
    assert rig.version() == 2 and pinned_version(cache, MODEL) == 2
    assert [m.pinned for m in cache.list_models()] == [2]
    reply = h.send("pin", {"model": MODEL, "version": 2})  # already serving: pin only
    assert reply.ok and reply.data["switched"] is False

    reply = h.send("unpin", {"model": MODEL})
    assert reply.ok and reply.data["was"] == 2 and pinned_version(cache, MODEL) is None
    assert h.send("unpin", {"model": MODEL}).message == f"{MODEL} was not pinned"

    root = logging.getLogger()
    level = root.level
    try:
        reply = h.send("config", {"mqtt.telemetry_seconds": 2.5, "mqtt.results": True, "log_level": "debug"})
        assert reply.ok, reply
        assert h.settings.get("mqtt.telemetry_seconds") == 2.5 and h.settings.get("mqtt.results") is True
        assert root.level == logging.DEBUG and reply.data["applied"]["log_level"] == "DEBUG"
    finally:
        root.setLevel(level)

    cache.rollback(MODEL, 1)  # what `edge-runtime models rollback` does behind the daemon's back
    assert rig.version() == 2
    reply = h.send("reload")
    assert reply.ok and reply.data["changed"] == [MODEL] and rig.version() == 1
    assert h.calls == Counter(ping=1, status=1, rollback=2, pin=2, unpin=2, config=1, reload=1)


def test_update_downloads_installs_and_activates(harness: Harness, tmp_path: Path, keys: dict[str, Path],
                                                 zoo: Zoo) -> None:
    h, rig = harness, harness.rig
    v3 = pack_onnx(tmp_path / "v3.bundle", zoo("ppocr_cls"), 3, keys["a"], tmp_path, gates=Gates()).read_bytes()
    v4 = pack_onnx(tmp_path / "v4.bundle", zoo("ppocr_cls"), 4, keys["a"], tmp_path, gates=Gates()).read_bytes()
    with FaultServer({"/v3.bundle": Route(body=v3), "/v4.bundle": Route(body=v4)}) as server:
        reply = h.send("update", {"url": server.url("/v3.bundle"), "sha256": hashlib.sha256(v3).hexdigest(),
                                  "size": len(v3)})
        assert reply.ok, reply
        assert reply.data == {"model": MODEL, "version": 3, "active": True}
        assert rig.version() == 3
        # A sha256 that does not match: refused, the running version stays.
        reply = h.send("update", {"url": server.url("/v4.bundle"), "sha256": "0" * 64})
        assert not reply.ok and "sha256" in reply.message and reply.message.startswith("update failed:"), reply
        assert rig.version() == 3 and rig.store.cache.versions(MODEL) == [1, 2, 3]
        assert [e["kind"] for e in rig.events if str(e["kind"]).startswith("update_")] == [
            "update_installed", "update_failed"]


# ---------------------------------------------------------------------- once only


def test_same_id_runs_once_and_redelivery_gets_the_stored_reply(harness: Harness) -> None:
    h, rig = harness, harness.rig
    first = h.send("rollback", {"model": MODEL, "version": 2}, command_id="r-1")
    again = h.send("rollback", {"model": MODEL, "version": 2}, command_id="r-1")
    assert first.ok and rig.version() == 2
    assert again.ok and again.message == first.message and again.id == "r-1"
    assert again.data == {**first.data, "duplicate": True} and "duplicate" not in first.data
    # A failure is stored too: the id is used up once its handler ran.
    failed = h.send("pin", {"model": MODEL, "version": 9}, command_id="p-9")
    assert not failed.ok and "not in the cache" in failed.message
    assert h.send("pin", {"model": MODEL, "version": 9}, command_id="p-9").data == {"duplicate": True}
    assert h.calls == Counter(rollback=1, pin=1)


def test_redelivery_while_the_first_still_runs_is_not_run(tmp_path: Path) -> None:
    started, release = threading.Event(), threading.Event()
    runs: list[str] = []

    def slow(command: Command) -> Reply:
        runs.append(command.id)
        started.set()
        release.wait(10)
        return Reply(True, "done", data={"n": len(runs)})

    ledger = CommandLedger(tmp_path / "commands.db", 60.0)
    dispatcher = Dispatcher({"reload": slow, "ping": slow}, ledger=ledger, auth=None, signed_verbs=(),
                            max_bytes=4096, max_depth=8, device="d")
    replies: list[Reply] = []
    worker = threading.Thread(target=lambda: replies.append(dispatcher.handle("reload", cmd("c-1"))))
    worker.start()
    assert started.wait(10)
    second = dispatcher.handle("reload", cmd("c-1"))
    assert not second.ok and second.data == {"duplicate": True, "in_progress": True}, second
    release.set()
    worker.join(10)
    assert replies == [Reply(True, "done", "c-1", {"n": 1})]
    assert dispatcher.handle("reload", cmd("c-1")).data == {"n": 1, "duplicate": True}
    assert runs == ["c-1"]
    ledger.close()


# ---------------------------------------------------------------------- hostile payloads

DEEP = b'{"id":"deep-1","ts":1,"args":{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
HOSTILE = [  # (case, verb, payload, message part, id recovered for the reply)
    ("100,000 deep", "ping", DEEP, "nested deeper than 32 levels", "deep-1"),
    ("10 MB", "ping", b'{"id":"big-1","ts":1,"args":{"s":"' + b"a" * (10 << 20) + b'"}}', "over the 1048576-byte cap",
     "big-1"),
    ("invalid UTF-8", "ping", b'{"id":"utf-1","ts":1,"args":{"s":"\xff\xfe"}}', "not valid UTF-8", "utf-1"),
    ("unknown verb", "reboot", cmd("verb-1"), "unknown command verb 'reboot'", "verb-1"),
    ("not JSON", "ping", b'{"id":"trunc-1","ts":1,', "not valid JSON", "trunc-1"),
    ("not an object", "ping", b"[1, 2]", "must be a JSON object", None),
    ("huge integer", "ping", b'{"id":"int-1","ts":1,"args":{"n":' + b"9" * 5000 + b"}}", "too large", "int-1"),
    ("1e999", "ping", b'{"id":"inf-1","ts":1,"args":{"n":1e999}}', "out of range", "inf-1"),
    ("NaN", "ping", b'{"id":"nan-1","ts":NaN}', "NaN is not a JSON number", "nan-1"),
    ("duplicate key", "ping", b'{"id":"dup-1","ts":1,"ts":2}', "repeats the key 'ts'", "dup-1"),
    ("no id", "ping", b'{"ts":1}', "missing 'id'", None),
    ("id with a slash", "ping", b'{"id":"a/b","ts":1}', "command id must be", None),
    ("id too long", "ping", json.dumps({"id": "x" * 129, "ts": 1}).encode(), "command id must be", None),
    ("ts a string", "ping", b'{"id":"ts-1","ts":"now"}', "ts must be", "ts-1"),
    ("args a list", "ping", b'{"id":"args-1","ts":1,"args":[]}', "args must be a JSON object", "args-1"),
    ("unknown key", "ping", b'{"id":"key-1","ts":1,"argz":{}}', "unknown command key 'argz'", "key-1"),
    ("verb mismatch", "update", b'{"id":"vm-1","ts":1,"verb":"ping"}', "arrived on the 'update' topic", "vm-1"),
]


@pytest.mark.parametrize(("verb", "payload", "part", "recovered"), [c[1:] for c in HOSTILE],
                         ids=[c[0] for c in HOSTILE])
def test_hostile_payload_is_refused_and_the_next_command_works(shared: Harness, verb: str, payload: bytes,
                                                                part: str, recovered: str | None) -> None:
    before = sum(shared.calls.values())
    reply = shared.dispatcher.handle(verb, payload)
    assert not reply.ok and part in reply.message and "\n" not in reply.message, reply
    assert reply.id == recovered
    assert sum(shared.calls.values()) == before  # refused before any handler ran
    assert shared.send("ping").ok


def test_depth_is_checked_before_the_json_parser_sees_the_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[str] = []
    real = json.loads

    def spy(text: str, **kw: Any) -> Any:
        parsed.append(text)
        return real(text, **kw)

    monkeypatch.setattr(json, "loads", spy)  # the json module command_parse calls
    with pytest.raises(CommandError, match="deeper than 32"):
        parse_command(DEEP, "ping", max_bytes=1 << 20, max_depth=32)
    assert parsed == []
    # Brackets inside strings (escaped quotes included) do not count.
    text = json.dumps({"id": "s", "ts": 1, "args": {"s": '\\"[[[{{{' * 50}})
    assert parse_command(text.encode(), "ping", max_bytes=1 << 20, max_depth=2).args["s"].startswith('\\"[[[')
    assert len(parsed) == 1
    with pytest.raises(CommandError, match="deeper than 2"):
        load_object(b'{"a":{"b":[]}}', max_bytes=100, max_depth=2)


def test_best_effort_id_is_capped_and_finds_signed_ids() -> None:
    assert best_effort_id(b'{"ts":1, "id" : "abc-1"}') == "abc-1"
    assert best_effort_id(b'{"signed":"{\\"args\\":{},\\"id\\":\\"sig-7\\"}"}') == "sig-7"
    assert best_effort_id(b'{"id":"bad/id"}') is None
    assert best_effort_id(b"x" * (64 << 10) + b'{"id":"late"}') is None  # only the first 64 KiB are read


BAD_ARGS = [  # (verb, args, the argument or setting the message must name)
    ("rollback", {}, "'args.model' is required"),
    ("rollback", {"model": 5}, "'args.model' must be a string"),
    ("rollback", {"model": MODEL, "version": "2"}, "'args.version' must be an integer"),
    ("rollback", {"model": MODEL, "version": 0}, "'args.version': must be between 1"),
    ("rollback", {"model": MODEL, "force": True}, "unknown argument 'args.force'"),
    ("rollback", {"model": "nope"}, "unknown model 'nope'"),
    ("pin", {"model": MODEL}, "'args.version' is required"),
    ("pin", {"model": MODEL, "version": True}, "'args.version' must be an integer"),
    ("unpin", {}, "'args.model' is required"),
    ("update", {}, "either args.target (a TUF target path) or args.url"),
    ("update", {"url": 7}, "'args.url' must be a string"),
    ("update", {"url": "http://x/b", "sha256": "abc"}, "'args.sha256': must be 64 lowercase hex"),
    ("update", {"url": "http://x/b", "size": -1}, "'args.size': must be between 1"),
    ("ping", {"x": 1}, "unknown argument 'args.x'"),
    ("config", {}, "at least one setting"),
    ("config", {"mqtt.host": "evil"}, "unknown setting 'mqtt.host'"),
    ("config", {"mqtt.telemetry_seconds": "fast"}, "setting 'mqtt.telemetry_seconds' must be a number"),
    ("config", {"mqtt.telemetry_seconds": 0.0}, "setting 'mqtt.telemetry_seconds': must be between 0.001"),
    ("config", {"mqtt.results": 1}, "setting 'mqtt.results' must be true or false"),
    ("config", {"log_level": "LOUD"}, "setting 'log_level' must be one of"),
]


@pytest.mark.parametrize(("verb", "args", "part"), BAD_ARGS, ids=[f"{v}-{p[:30]}" for v, _, p in BAD_ARGS])
def test_missing_or_mistyped_arguments_are_named(shared: Harness, verb: str, args: dict[str, Any],
                                                 part: str) -> None:
    reply = shared.send(verb, args)
    assert not reply.ok and reply.message.startswith(f"{verb} failed: ") and part in reply.message, reply
    assert shared.rig.version() == 1 and shared.settings.get("mqtt.telemetry_seconds") == 10.0
    assert pinned_version(shared.rig.store.cache, MODEL) is None
    assert shared.send("ping").ok


def test_config_is_all_or_nothing() -> None:
    settings = RuntimeSettings.from_config(Config(mqtt=MqttConfig(telemetry_seconds=7.0)))
    with pytest.raises(CommandError, match="unknown setting 'bogus'"):
        settings.update({"mqtt.telemetry_seconds": 3, "bogus": 1})
    assert settings.get("mqtt.telemetry_seconds") == 7.0
    assert settings.update({"ota.poll_seconds": 30}) == {"ota.poll_seconds": 30.0}
    assert settings.snapshot()["ota.poll_seconds"] == 30.0


# ---------------------------------------------------------------------- the ledger on disk


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_ledger_survives_reopen_and_forgets_after_the_window(tmp_path: Path) -> None:
    path, clock = tmp_path / "state" / "commands.db", FakeClock()
    ledger = CommandLedger(path, 100.0, clock)
    assert ledger.claim("a").fresh
    ledger.record("a", Reply(True, "did a", data={"k": 1}))
    ledger.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700

    ledger = CommandLedger(path, 100.0, clock)
    assert ledger.lookup("a") == Reply(True, "did a", "a", {"k": 1})
    claim = ledger.claim("a")
    assert not claim.fresh and claim.reply == Reply(True, "did a", "a", {"k": 1})
    side_files = sorted(path.parent.glob("commands.db-*"))
    assert [p.name for p in side_files] == ["commands.db-shm", "commands.db-wal"]
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in side_files)
    # A dispatcher over the reopened ledger answers from it without running anything.
    ran: list[str] = []

    def ping(command: Command) -> Reply:
        ran.append(command.id)
        return Reply(True, "x")

    dispatcher = Dispatcher({"ping": ping}, ledger=ledger, auth=None, signed_verbs=(), max_bytes=4096, max_depth=8,
                            device="d")
    assert dispatcher.handle("ping", cmd("a")).data == {"k": 1, "duplicate": True} and ran == []

    clock.now += 101
    assert ledger.lookup("a") is None and ledger.claim("a").fresh
    ledger.close()


def test_ledger_closes_commands_interrupted_by_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "commands.db"
    ledger = CommandLedger(path, 100.0)
    assert ledger.claim("half").fresh
    assert ledger.claim("half").running
    ledger.close()  # the daemon died before record()
    ledger = CommandLedger(path, 100.0)
    claim = ledger.claim("half")
    assert not claim.fresh and claim.reply is not None and not claim.reply.ok
    assert "interrupted" in claim.reply.message
    ledger.close()


def test_ledger_refuses_a_symlink_and_replaces_a_corrupt_file(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.db"
    target.write_bytes(b"")
    (tmp_path / "link.db").symlink_to(target)
    with pytest.raises(CommandError, match="cannot open"):
        CommandLedger(tmp_path / "link.db", 10.0)
    corrupt = tmp_path / "commands.db"
    corrupt.write_bytes(b"not a database at all" * 100)
    ledger = CommandLedger(corrupt, 10.0)
    assert ledger.claim("x").fresh
    ledger.close()
    assert (tmp_path / "commands.db.corrupt").read_bytes().startswith(b"not a database")


def test_ledger_prunes_expired_rows_and_bounds_its_size(tmp_path: Path) -> None:
    clock = FakeClock()
    ledger = CommandLedger(tmp_path / "commands.db", 50.0, clock, max_commands=3)
    for i in range(5):
        ledger.claim(f"c{i}")
        ledger.record(f"c{i}", Reply(True, "ok"))
        clock.now += 1
    assert ledger.remember_nonce("n" * 16, clock.now + 10)
    assert ledger.prune() == 2  # the two oldest commands past max_commands
    assert ledger.lookup("c0") is None and ledger.lookup("c4") is not None
    clock.now += 60
    assert ledger.prune() == 4  # 3 commands past the window + 1 expired nonce
    ledger.close()


def test_dispatcher_never_raises_on_a_handler_bug(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def broken(command: Command) -> Reply:
        raise ZeroDivisionError("boom")

    ledger = CommandLedger(tmp_path / "commands.db", 10.0)
    dispatcher = Dispatcher({"ping": broken}, ledger=ledger, auth=None, signed_verbs=(), max_bytes=4096,
                            max_depth=8, device="d")
    reply = dispatcher.handle("ping", cmd("z-1"))
    assert not reply.ok and reply.id == "z-1" and "internal error (ZeroDivisionError" in reply.message
    assert "boom" in caplog.text
    assert dispatcher.handle("status", cmd("s-1")).message == "command verb 'status' is not supported by this device"
    ledger.close()


SURFACE = {
    "commands.parse": {"VERBS", "Command", "Reply", "best_effort_id", "check_verb", "command_from_object",
                       "load_object", "parse_command"},
    "commands.auth": {"SIGNED_VERBS", "CommandAuth", "NonceStore", "is_signed_envelope", "new_command",
                      "sign_command"},
    "commands.ledger": {"Claim", "CommandLedger"},
    "commands.dispatch": {"CLOCK_FLOOR", "SIGNED_VERBS", "Command", "Dispatcher", "Handler", "Reply"},
    "commands.handlers": {"MODEL_VERBS", "SIGNED_VERBS", "DeviceCommands", "Updater"},
    "cache.pins": {"pin_refusal", "pinned_version"},
    "commands.runtime_settings": {"LOG_LEVELS", "RuntimeSettings"},
}

@pytest.mark.parametrize("name", sorted(SURFACE))
def test_public_surface(name: str) -> None:
    module = importlib.import_module(f"edge_runtime.{name}")
    assert set(module.__all__) == SURFACE[name]
    assert all(hasattr(module, attr) for attr in module.__all__)

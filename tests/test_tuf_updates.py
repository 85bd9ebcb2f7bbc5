"""OTA from a TUF repository (``[ota] repository_url``), read with python-tuf's ngclient through our fetcher.

The repositories are built directly with ``tuf.api.metadata`` (tests/tuf_helpers.py) and served by a
real loopback HTTP server. Each attack of the TUF specification's list is refused with one line, no
bundle is downloaded past the metadata, and the old model keeps serving.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon_helpers import pack_onnx
from http_fault_server import FaultServer, Route
from tuf_helpers import Device, TufRepo, make_device

from edge_runtime.bundle.manifest import Gates
from edge_runtime.errors import (
    EdgeRuntimeError,
    FetchError,
    IncompatibleError,
    ManifestError,
    RollbackError,
    SignatureError,
    SizeLimitError,
)

Zoo = Callable[[str], Path]
TARGET = "/targets/models/"


@pytest.fixture()
def server() -> Iterator[FaultServer]:
    with FaultServer({}) as srv:
        yield srv


@pytest.fixture()
def repo(server: FaultServer) -> TufRepo:
    return TufRepo(server)


def _device(tmp_path: Path, keys: dict[str, Path], zoo: Zoo, repo: TufRepo, **ota: object) -> Device:
    return make_device(tmp_path, keys, zoo, repo.url, repo.bootstrap_root(), **ota)


def _bundle(tmp_path: Path, keys: dict[str, Path], zoo: Zoo, version: int, key: str = "a") -> Path:
    return pack_onnx(tmp_path / f"v{version}-{key}.bundle", zoo("ppocr_cls"), version, keys[key], tmp_path,
                     gates=Gates())


def _downloads(server: FaultServer) -> list[str]:
    return [s.path for s in server.requests if s.path.startswith("/targets/")]


def test_a_tuf_target_is_installed_and_activated_and_polling_again_changes_nothing(
        tmp_path: Path, keys: dict[str, Path], zoo: Zoo, server: FaultServer, repo: TufRepo) -> None:
    repo.add_bundle(_bundle(tmp_path, keys, zoo, 3))
    repo.publish()
    device = _device(tmp_path, keys, zoo, repo)
    results = device.ota.poll_once()
    assert [(r.name, r.version) for r in results] == [("ppocr-cls", 3)]
    assert device.version() == 3
    assert {"update_available", "update_installed", "activated"} <= set(device.kinds())
    fetched = [s.path for s in server.requests]
    assert "/metadata/timestamp.json" in fetched and "/metadata/2.snapshot.json" in fetched
    assert any(p.startswith(TARGET) for p in fetched)
    assert device.ota.poll_once() == []  # nothing newer: no download
    assert len(_downloads(server)) == 1
    assert (tmp_path / "state" / "tuf" / "timestamp.json").exists()
    assert oct((tmp_path / "state" / "tuf").stat().st_mode & 0o777) == "0o700"


def _freeze(repo: TufRepo, tmp: Path, make: Callable[[int], Path]) -> None:
    repo.add_bundle(make(3))
    repo.publish(timestamp_expires=dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1))


def _snapshot_freeze(repo: TufRepo, tmp: Path, make: Callable[[int], Path]) -> None:
    repo.add_bundle(make(3))
    repo.publish(snapshot_expires=dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1))


def _wrong_model_in_custom(repo: TufRepo, tmp: Path, make: Callable[[int], Path]) -> None:
    repo.add_bundle(make(3), custom={"edge_runtime": {"model": "other", "version": 3}})
    repo.publish()


def _target_longer_than_signed(repo: TufRepo, tmp: Path, make: Callable[[int], Path]) -> None:
    path = repo.add_bundle(make(3))
    repo.publish()
    served = next(p for p in repo.server.routes if p.startswith(TARGET))
    repo.server.routes[served] = Route(body=repo.blobs[path] + b"\0" * 100_000)
    repo.blobs.pop(path)  # only the metadata names it now


def _endless_target(repo: TufRepo, tmp: Path, make: Callable[[int], Path]) -> None:
    path = repo.add_bundle(make(3))
    repo.publish()
    served = next(p for p in repo.server.routes if p.startswith(TARGET))
    repo.server.routes[served] = Route(body=repo.blobs[path] * 50, fault="no_length")


def _slow_timestamp(repo: TufRepo, tmp: Path, make: Callable[[int], Path]) -> None:
    repo.add_bundle(make(3))
    repo.publish()
    data = repo.server.routes["/metadata/timestamp.json"].body
    repo.server.routes["/metadata/timestamp.json"] = Route(body=data, fault="drip", drip_seconds=0.5)


def _targets_signed_by_a_revoked_key(repo: TufRepo, tmp: Path, make: Callable[[int], Path]) -> None:
    old = repo.signers["targets"]
    repo.rotate("targets")
    repo.signers["targets"] = old  # the attacker still holds only the revoked key
    repo.add_bundle(make(3))
    repo.publish()


def _unsigned_timestamp(repo: TufRepo, tmp: Path, make: Callable[[int], Path]) -> None:
    repo.add_bundle(make(3))
    repo.signers["timestamp"] = [repo.signers["targets"][0]]  # a key the root does not give this role
    repo.publish()


def _root_replayed(repo: TufRepo, tmp: Path, make: Callable[[int], Path]) -> None:
    repo.add_bundle(make(3))
    repo.publish()
    # The next root the device asks for is an older one (a rollback of the root role).
    repo.server.routes["/metadata/2.root.json"] = Route(body=repo.root_history[0])


ATTACKS = [
    ("rollback of the root", _root_replayed, RollbackError, "version"),
    ("freeze: an expired timestamp", _freeze, IncompatibleError, "expired"),
    ("freeze: an expired snapshot", _snapshot_freeze, IncompatibleError, "expired"),
    ("custom names another model", _wrong_model_in_custom, ManifestError, "custom says model 'other'"),
    ("target longer than signed", _target_longer_than_signed, SizeLimitError, "over"),
    ("endless target stream", _endless_target, SizeLimitError, "over"),
    ("slow retrieval", _slow_timestamp, FetchError, "deadline"),
    ("targets signed by a revoked key", _targets_signed_by_a_revoked_key, SignatureError, "signature"),
    ("timestamp signed by a key of another role", _unsigned_timestamp, SignatureError, "signature"),
]


@pytest.mark.parametrize(("what", "attack", "error", "words"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attacks_are_refused_with_one_line_and_v1_keeps_serving(
        tmp_path: Path, keys: dict[str, Path], zoo: Zoo, server: FaultServer, repo: TufRepo, what: str,
        attack: Callable[[TufRepo, Path, Callable[[int], Path]], None], error: type[EdgeRuntimeError],
        words: str) -> None:
    device = _device(tmp_path, keys, zoo, repo, deadline_seconds=2.0)
    attack(repo, tmp_path, lambda v: _bundle(tmp_path, keys, zoo, v))
    caught: EdgeRuntimeError | None = None
    try:
        device.ota.poll_once()
    except EdgeRuntimeError as e:
        caught = e
    failed = [e for e in device.events if e["kind"] == "update_failed"]
    if caught is None:  # refused per target (after the metadata was accepted): an event says why
        assert failed, f"{what}: nothing refused it"
        reason = str(failed[-1]["reason"])
    else:
        assert isinstance(caught, error), f"{what}: {type(caught).__name__}: {caught}"
        reason = caught.one_line()
    assert words in reason.lower() or words in reason, f"{what}: {reason}"
    assert "\n" not in reason
    if error is not SizeLimitError:
        assert _downloads(server) == [], f"{what}: a bundle was downloaded"
    assert device.version() == 1
    assert not (tmp_path / "state" / "models" / "ppocr-cls" / "3").exists()


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_rollback_of_a_role_is_refused(tmp_path: Path, keys: dict[str, Path], zoo: Zoo, server: FaultServer,
                                       repo: TufRepo, role: str) -> None:
    repo.publish()
    repo.publish()  # every role at a higher version than its first
    device = _device(tmp_path, keys, zoo, repo)
    device.ota.poll_once()  # trusted now: the latest versions
    old = {"timestamp": 2, "snapshot": 2, "targets": 2}[role]
    current = {"timestamp": repo.timestamp, "snapshot": repo.snapshot, "targets": repo.targets}[role]
    current.signed.version = old - 1  # the attacker replays an older, validly signed version
    if role == "targets":
        repo.publish(bump=("snapshot", "timestamp"))
    elif role == "snapshot":
        repo.timestamp.signed.version += 1
        repo.publish(bump=())
        # A consistent snapshot's name carries its version: the replayed one under the name asked for.
    else:
        repo.publish(bump=())
    with pytest.raises(RollbackError) as info:
        device.ota.poll_once()
    assert "version" in info.value.one_line() and "(a rollback)" in info.value.one_line()
    assert _downloads(server) == [] and device.version() == 1


def test_mix_and_match_a_signed_target_holding_another_version_is_refused_before_unpacking(
        tmp_path: Path, keys: dict[str, Path], zoo: Zoo, server: FaultServer, repo: TufRepo) -> None:
    # The targets role says "v4", but the bytes it signed are the v3 bundle (a publisher's mix-up,
    # or bundles moved between channels): the bundle must be what the channel says it is.
    repo.add_bundle(_bundle(tmp_path, keys, zoo, 3), custom={"edge_runtime": {"model": "ppocr-cls", "version": 4}})
    repo.publish()
    device = _device(tmp_path, keys, zoo, repo)
    assert device.ota.poll_once() == []
    reason = str([e for e in device.events if e["kind"] == "update_failed"][-1]["reason"])
    assert "mix-and-match refused" in reason and "v3" in reason and "v4" in reason
    assert device.version() == 1 and device.store.cache.floor("ppocr-cls") == 1


@pytest.mark.parametrize("role", ["timestamp", "snapshot"])
def test_fast_forward_is_recovered_after_the_key_is_rotated(
        tmp_path: Path, keys: dict[str, Path], zoo: Zoo, server: FaultServer, repo: TufRepo, role: str) -> None:
    repo.publish()
    device = _device(tmp_path, keys, zoo, repo)
    device.ota.poll_once()
    # The role's key leaks (for the snapshot, the online timestamp service signs what it is handed):
    # the attacker signs version 2^40. The device accepts it (its signature is valid), and from then
    # on every legitimate version looks like a rollback.
    md = repo.timestamp if role == "timestamp" else repo.snapshot
    legit = md.signed.version
    md.signed.version = 2**40
    repo.publish(bump=() if role == "timestamp" else ("timestamp",))
    device.ota.poll_once()
    md.signed.version = legit
    repo.publish()
    with pytest.raises(RollbackError):
        device.ota.poll_once()
    # Recovery, over the air: a new root rotates that role's key, and the device drops the
    # fast-forwarded metadata (TUF specification 5.3.11) and takes the legitimate one.
    repo.rotate(role)
    repo.add_bundle(_bundle(tmp_path, keys, zoo, 3))
    repo.publish()
    assert [r.version for r in device.ota.poll_once()] == [3]
    assert device.version() == 3


def test_root_rotation_over_three_versions_with_a_new_threshold_is_followed(
        tmp_path: Path, keys: dict[str, Path], zoo: Zoo, server: FaultServer, repo: TufRepo) -> None:
    repo.publish()
    device = _device(tmp_path, keys, zoo, repo)
    device.ota.poll_once()
    repo.rotate("root", threshold=2, keys=3)  # v2: three new root keys, two must sign
    repo.rotate("targets", threshold=2, keys=2)  # v3: the targets role now needs 2 of 2
    repo.add_bundle(_bundle(tmp_path, keys, zoo, 3))
    repo.publish()
    assert [r.version for r in device.ota.poll_once()] == [3]
    import json

    trusted = json.loads((tmp_path / "state" / "tuf" / "root.json").read_bytes())
    assert trusted["signed"]["version"] == 3 and trusted["signed"]["roles"]["root"]["threshold"] == 2
    # One of the two targets keys alone is not enough any more.
    repo.signers["targets"] = repo.signers["targets"][:1]
    repo.add_bundle(_bundle(tmp_path, keys, zoo, 4))
    repo.publish()
    with pytest.raises(SignatureError):
        device.ota.poll_once()
    assert device.version() == 3


def test_a_delegation_is_not_trusted_outside_its_paths(tmp_path: Path, keys: dict[str, Path], zoo: Zoo,
                                                       server: FaultServer, repo: TufRepo) -> None:
    repo.delegate("faces-team", ["models/face*"])
    repo.add_bundle(_bundle(tmp_path, keys, zoo, 3), role="faces-team")  # models/ppocr-cls.bundle: not theirs
    repo.publish()
    device = _device(tmp_path, keys, zoo, repo)
    assert device.ota.poll_once() == []
    assert _downloads(server) == [] and device.version() == 1


def test_with_the_clock_not_set_the_repository_is_not_polled(tmp_path: Path, keys: dict[str, Path], zoo: Zoo,
                                                            server: FaultServer, repo: TufRepo) -> None:
    repo.add_bundle(_bundle(tmp_path, keys, zoo, 3))
    repo.publish()
    device = _device(tmp_path, keys, zoo, repo)
    device.ota.now = lambda: dt.datetime(1970, 1, 1, 0, 5, tzinfo=dt.timezone.utc)  # a Pi just booted, no RTC
    with pytest.raises(IncompatibleError, match="clock is not set"):
        device.ota.poll_once()
    assert server.requests == [] and device.version() == 1


def test_a_leaked_publisher_key_is_revoked_over_the_air_and_the_pinned_floor_recovers(
        tmp_path: Path, keys: dict[str, Path], zoo: Zoo, server: FaultServer, repo: TufRepo) -> None:
    from edge_runtime.bundle.publisher_keys import TARGET_PATH, build_publisher_keys
    from edge_runtime.bundle.signing import generate_keypair, load_public_key

    repo.add_blob(TARGET_PATH, build_publisher_keys([load_public_key(Path(f"{keys['a']}.pub"))], 1))
    repo.add_bundle(_bundle(tmp_path, keys, zoo, 3))
    repo.publish()
    device = _device(tmp_path, keys, zoo, repo)
    assert [r.version for r in device.ota.poll_once()] == [3]
    assert "trust_updated" in device.kinds()
    # Key "a" and the targets key leak. The attacker publishes v2^53, signed by "a": the device takes
    # it, and its floor is now 2^53, so no legitimate version could ever be installed again.
    huge = 2**53
    repo.add_bundle(_bundle(tmp_path, keys, zoo, huge))
    repo.publish()
    assert [r.version for r in device.ota.poll_once()] == [huge]
    assert device.store.cache.floor("ppocr-cls") == huge
    # Recovery, over the air only: a new root rotates the targets key, and the new targets deliver a
    # new publisher key "c" and a legitimate v4 signed by it.
    repo.rotate("targets")
    generate_keypair(tmp_path / "c")
    repo.add_blob(TARGET_PATH, build_publisher_keys([load_public_key(tmp_path / "c.pub")], 1))
    keys_c = {**keys, "c": tmp_path / "c"}
    repo.add_bundle(_bundle(tmp_path, keys_c, zoo, 4, key="c"))
    repo.publish()
    assert [r.version for r in device.ota.poll_once()] == [4]
    assert device.version() == 4
    cache = device.store.cache
    assert cache.versions("ppocr-cls") == [4] and cache.floor("ppocr-cls") == 4
    revoked = [e for e in device.events if e["kind"] == "versions_revoked"]
    assert revoked and set(revoked[-1]["removed"]) == {1, 3, huge}  # type: ignore[arg-type]
    # What the leaked key signs is refused from now on, even by a manual install.
    with pytest.raises(SignatureError):
        device.store.install(_bundle(tmp_path, keys, zoo, 5))


def test_fleet_update_names_a_tuf_target_and_a_bare_url_is_refused_on_a_tuf_device(
        tmp_path: Path, keys: dict[str, Path], zoo: Zoo, server: FaultServer, repo: TufRepo) -> None:
    import json

    from edge_runtime.commands.handlers import DeviceCommands
    from edge_runtime.commands.parse import Command
    from edge_runtime.commands.runtime_settings import RuntimeSettings
    from edge_runtime.errors import CacheError, CommandError

    repo.add_bundle(_bundle(tmp_path, keys, zoo, 3))
    repo.publish()
    device = _device(tmp_path, keys, zoo, repo)
    handlers = DeviceCommands(device.activator, device.ota, device.store,
                              RuntimeSettings.from_config(device.store.config), dict).handlers()

    def update(args: dict[str, object]) -> object:
        return handlers["update"](Command("update", "c1", time.time(), args))

    reply = update({"target": "models/ppocr-cls.bundle"})
    assert json.loads(reply.to_json())["data"] == {"model": "ppocr-cls", "version": 3, "active": True}
    assert device.version() == 3
    again = update({"target": "models/ppocr-cls.bundle"})  # already serving: ok, nothing downloaded
    assert json.loads(again.to_json())["ok"] is True
    with pytest.raises(CacheError, match=r"has no target models/other\.bundle"):
        update({"target": "models/other.bundle"})
    with pytest.raises(CacheError, match="not a model target"):
        update({"target": "../../etc/passwd"})
    with pytest.raises(IncompatibleError, match="through its TUF repository"):
        update({"url": server.url("/x.bundle")})
    with pytest.raises(CommandError, match=r"either args\.target"):
        update({})
    with pytest.raises(CommandError, match="hashes are signed"):
        update({"target": "models/ppocr-cls.bundle", "sha256": "0" * 64})
    assert _downloads(server) == [next(p for p in _downloads(server))]  # only the one install downloaded


def test_the_daemon_polls_its_tuf_repository_and_reports_a_refused_repository(
        tmp_path: Path, keys: dict[str, Path], zoo: Zoo, server: FaultServer, repo: TufRepo) -> None:
    from cli_helpers import cli
    from daemon_helpers import Serve, wait_for, write_config

    trust = tmp_path / "device-trust"
    shutil.copytree(keys["trust_dir"], trust)
    (trust / "root.json").write_bytes(repo.bootstrap_root())
    repo.publish()
    extra = (f'[ota]\nrepository_url = "{repo.url}"\nallow_http = true\npoll_seconds = 0.3\nretries = 0\n'
             "[activation]\nprobation_inferences = 0\nprobation_seconds = 0.0\n")
    config, state, port = write_config(tmp_path / "device", trust, extra=extra)
    cli("models", "install", _bundle(tmp_path, keys, zoo, 1), "--config", config)
    serve = Serve(config, state, port).start()
    try:
        serve.wait_ready(60)
        repo.add_bundle(_bundle(tmp_path, keys, zoo, 2))
        repo.publish()
        wait_for(lambda: serve.served_version() == 2, 60, "the daemon to install v2 from the repository")
        repo.publish(timestamp_expires=dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1))
        event = wait_for(lambda: [e for e in serve.events("update_failed") if "expired" in e["reason"]], 30,
                         "the refused repository to be reported")[0]
        assert "update metadata refused" in event["reason"]
        assert serve.served_version() == 2
        time.sleep(1.0)  # several more polls: still one event for the same refusal
        assert len([e for e in serve.events("update_failed") if "expired" in e["reason"]]) == 1
    finally:
        assert serve.terminate() == 0

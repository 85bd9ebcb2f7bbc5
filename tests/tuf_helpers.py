"""A TUF repository built directly with python-tuf's ``tuf.api.metadata`` (not with our publisher
commands), served from a :class:`FaultServer` the way any static TUF repository is served.

Every role has its own Ed25519 signers (threshold 1 unless changed); consistent snapshots are on,
so metadata is fetched as ``metadata/<version>.<role>.json`` and targets as
``targets/<sha256>.<name>``. Tests change the repository as an attacker or a publisher would and
call :meth:`TufRepo.publish` to put the new state on the server.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon_helpers import pack_onnx, ppocr_input
from http_fault_server import FaultServer, Route
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from edge_runtime.bundle.manifest import Gates
from edge_runtime.bundle.reader import inspect_bundle
from edge_runtime.config.model import Config, Limits, OtaConfig
from edge_runtime.runtime.service import InferenceService
from edge_runtime.telemetry.events import EventBus
from edge_runtime.telemetry.metrics import Metrics
from edge_runtime.update.activation import Activator
from edge_runtime.update.ota import OtaUpdater
from edge_runtime.update.store import ModelStore

ROLES = ("root", "targets", "snapshot", "timestamp")


def expiry(days: float = 7) -> dt.datetime:
    return (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=days)).replace(microsecond=0)


@dataclass
class TufRepo:
    """The four top-level roles (plus optional delegated ones), their signers, and the target bytes."""

    server: FaultServer
    signers: dict[str, list[Signer]] = field(default_factory=dict)
    root: Metadata[Root] = field(init=False)
    targets: Metadata[Targets] = field(init=False)
    snapshot: Metadata[Snapshot] = field(init=False)
    timestamp: Metadata[Timestamp] = field(init=False)
    delegated: dict[str, Metadata[Targets]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)  # target path -> bytes
    root_history: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        root = Root(expires=expiry(365), consistent_snapshot=True)
        for role in ROLES:
            signer = CryptoSigner.generate_ed25519()
            self.signers[role] = [signer]
            root.add_key(signer.public_key, role)
        self.root = Metadata(root)
        self.targets = Metadata(Targets(expires=expiry(30)))
        self.snapshot = Metadata(Snapshot(expires=expiry(7)))
        self.timestamp = Metadata(Timestamp(expires=expiry(1)))
        self.sign_root()

    # ------------------------------------------------------------------ the repository's content

    def add_bundle(self, bundle: Path, *, role: str = "targets", custom: dict[str, Any] | None = None,
                   path: str | None = None) -> str:
        """Add a bundle as the target ``models/<name>.bundle``, its custom field read from its manifest."""
        manifest = json.loads(inspect_bundle(bundle, Limits()).manifest_bytes)
        data = bundle.read_bytes()
        target = path or f"models/{manifest['name']}.bundle"
        info = TargetFile.from_data(target, data, ["sha256"])
        info.unrecognized_fields["custom"] = custom if custom is not None else {"edge_runtime": {
            "model": manifest["name"], "version": manifest["version"],
            "requires": manifest.get("requires", {})}}
        owner = self.targets if role == "targets" else self.delegated[role]
        owner.signed.targets[target] = info
        self.blobs[target] = data
        return target

    def add_blob(self, path: str, data: bytes) -> None:
        """Any other target (e.g. ``trust/publisher-keys.json``)."""
        self.targets.signed.targets[path] = TargetFile.from_data(path, data, ["sha256"])
        self.blobs[path] = data

    def delegate(self, role: str, paths: list[str]) -> None:
        """A delegated targets role with its own key, trusted for ``paths`` only."""
        signer = CryptoSigner.generate_ed25519()
        self.signers[role] = [signer]
        if self.targets.signed.delegations is None:
            self.targets.signed.delegations = Delegations(keys={}, roles={})
        delegations = self.targets.signed.delegations
        assert delegations.roles is not None
        delegations.keys[signer.public_key.keyid] = signer.public_key
        delegations.roles[role] = DelegatedRole(role, [signer.public_key.keyid], 1, False, paths=paths)
        self.delegated[role] = Metadata(Targets(expires=expiry(30)))

    def rotate(self, role: str, *, threshold: int = 1, keys: int = 1) -> list[Signer]:
        """A new root version where ``role`` has ``keys`` new keys (old ones revoked) and ``threshold``."""
        root = self.root.signed
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
        fresh = [CryptoSigner.generate_ed25519() for _ in range(keys)]
        for signer in fresh:
            root.add_key(signer.public_key, role)
        root.roles[role].threshold = threshold
        old = self.signers[role]
        self.signers[role] = fresh
        root.version += 1
        # A new root is signed by the old root keys too (the client checks it with both).
        self.sign_root(extra=old if role == "root" else [])
        return fresh

    def sign_root(self, extra: list[Signer] | None = None) -> None:
        self.root.signatures.clear()
        for signer in [*self.signers["root"], *(extra or [])]:
            self.root.sign(signer, append=True)
        self.root_history.append(self.root.to_bytes(JSONSerializer()))

    # ------------------------------------------------------------------ publishing

    def publish(self, *, bump: tuple[str, ...] = ("targets", "snapshot", "timestamp"),
                timestamp_expires: dt.datetime | None = None, snapshot_expires: dt.datetime | None = None,
                sign: bool = True) -> None:
        """Raise the versions of ``bump``, re-sign, and serve the whole repository as it is now."""
        for role, md in self.delegated.items():
            if "targets" in bump and md.signed.targets:
                md.signed.version += 1
                self._sign(md, role)
        if "targets" in bump:
            self.targets.signed.version += 1
            self._sign(self.targets, "targets")
        snap = self.snapshot.signed
        snap.meta["targets.json"] = MetaFile(version=self.targets.signed.version)
        for role, md in self.delegated.items():
            snap.meta[f"{role}.json"] = MetaFile(version=md.signed.version)
        if "snapshot" in bump:
            snap.version += 1
        if snapshot_expires is not None:
            snap.expires = snapshot_expires
        if sign:
            self._sign(self.snapshot, "snapshot")
        ts = self.timestamp.signed
        ts.snapshot_meta = MetaFile(version=snap.version)
        if "timestamp" in bump:
            ts.version += 1
        if timestamp_expires is not None:
            ts.expires = timestamp_expires
        if sign:
            self._sign(self.timestamp, "timestamp")
        self.serve()

    def _sign(self, md: Metadata[Any], role: str) -> None:
        md.signatures.clear()
        for signer in self.signers[role]:
            md.sign(signer, append=True)

    def serve(self, routes: dict[str, Route] | None = None) -> None:
        """Put every file of the repository on the server (``routes`` override single paths)."""
        files: dict[str, bytes] = {}
        for i, data in enumerate(self.root_history, 1):
            files[f"/metadata/{i}.root.json"] = data
        files["/metadata/timestamp.json"] = self.timestamp.to_bytes(JSONSerializer())
        files[f"/metadata/{self.snapshot.signed.version}.snapshot.json"] = self.snapshot.to_bytes(JSONSerializer())
        files[f"/metadata/{self.targets.signed.version}.targets.json"] = self.targets.to_bytes(JSONSerializer())
        for role, md in self.delegated.items():
            files[f"/metadata/{md.signed.version}.{role}.json"] = md.to_bytes(JSONSerializer())
        for path, data in self.blobs.items():
            dirname, _, base = path.rpartition("/")
            digest = hashlib.sha256(data).hexdigest()
            files[f"/targets/{dirname}/{digest}.{base}"] = data
        for path, data in files.items():
            self.server.routes[path] = Route(body=data)
        for path, route in (routes or {}).items():
            self.server.routes[path] = route

    @property
    def url(self) -> str:
        return self.server.url("").rstrip("/")

    def bootstrap_root(self) -> bytes:
        """``1.root.json``: what a device is installed with."""
        return self.root_history[0]


@dataclass
class Device:
    """A device's store, activator and OTA updater, with ppocr-cls v1 serving and the repo's root installed."""

    store: ModelStore
    service: InferenceService
    ota: OtaUpdater
    events: list[dict[str, object]]
    activator: Activator

    def version(self) -> int:
        return self.service.infer("ppocr-cls", {"x": ppocr_input()})[0]

    def kinds(self) -> list[object]:
        return [e["kind"] for e in self.events]


def make_device(tmp_path: Path, keys: dict[str, Path], zoo: Callable[[str], Path], url: str, root: bytes,
                **ota: object) -> Device:
    """ppocr-cls v1 installed and serving; ``root`` is the bootstrap root.json in its trust dir."""
    trust = tmp_path / "device-trust"
    shutil.copytree(keys["trust_dir"], trust)
    (trust / "root.json").write_bytes(root)
    settings = {"repository_url": url, "allow_http": True, "retries": 0, "deadline_seconds": 20.0, **ota}
    config = Config(state_dir=tmp_path / "state", trust_dir=trust, ota=OtaConfig(**settings))  # type: ignore[arg-type]
    store = ModelStore(config)
    service = InferenceService(Metrics())
    events: list[dict[str, object]] = []
    bus = EventBus(tmp_path / "events.jsonl")
    bus.subscribe(events.append)
    activator = Activator(store, service, bus, config.activation)
    store.install(pack_onnx(tmp_path / "v1.bundle", zoo("ppocr_cls"), 1, keys["a"], tmp_path, gates=Gates()))
    activator.boot("ppocr-cls")
    return Device(store, service, OtaUpdater(config.ota, store, activator, bus), events, activator)


def serve_directory(server: FaultServer, directory: Path) -> None:
    """Serve every file under ``directory`` at its relative path (a static TUF repository)."""
    for path in directory.rglob("*"):
        if path.is_file():
            server.routes["/" + path.relative_to(directory).as_posix()] = Route(body=path.read_bytes())

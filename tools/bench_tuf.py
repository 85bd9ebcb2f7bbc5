"""Benchmark: one TUF poll of the device (refresh + resolve a model target), against bare ngclient.

Usage: python tools/bench_tuf.py [--runs 50] [--models 20]

Builds a repository with ``tuf.api.metadata`` (``--models`` targets, consistent snapshots) in a temp
dir, serves it on a loopback HTTP server, and times, per poll from a fresh Updater over a warm
metadata dir (what the daemon does every ``poll_seconds``):

- bare: ``tuf.ngclient.Updater`` with its own urllib3 fetcher, ``refresh()`` + ``get_targetinfo``;
- ours: :class:`edge_runtime.update.tuf_client.TufRepository` (our fetcher: caps, deadline, TLS rules)
  doing the same, plus the ``custom`` field check.

Prints the medians and the ratio ours/bare. Absolute times on a shared machine drift: compare the
ratio of one run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ppocr_bench_kit import http_folder
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer
from tuf.ngclient.updater import Updater

from edge_runtime.config.model import OtaConfig
from edge_runtime.update.transport import HttpFetcher
from edge_runtime.update.tuf_client import TufRepository


def build(directory: Path, models: int) -> None:
    expires = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(days=7)
    signers = {role: CryptoSigner.generate_ed25519() for role in ("root", "targets", "snapshot", "timestamp")}
    root = Root(expires=expires, consistent_snapshot=True)
    for role, signer in signers.items():
        root.add_key(signer.public_key, role)
    targets = Targets(expires=expires)
    (directory / "targets" / "models").mkdir(parents=True)
    for i in range(models):
        data = f"bundle {i}".encode() * 100
        path = f"models/m{i}.bundle"
        info = TargetFile.from_data(path, data, ["sha256"])
        info.unrecognized_fields["custom"] = {"edge_runtime": {"model": f"m{i}", "version": 1}}
        targets.targets[path] = info
        (directory / "targets" / "models" / f"{info.hashes['sha256']}.m{i}.bundle").write_bytes(data)
    snapshot = Snapshot(expires=expires)
    snapshot.meta["targets.json"] = MetaFile(version=1)
    timestamp = Timestamp(expires=expires, snapshot_meta=MetaFile(version=1))
    meta = directory / "metadata"
    meta.mkdir()
    def write(md: Metadata[Any], role: str, name: str) -> None:
        md.sign(signers[role])
        (meta / name).write_bytes(md.to_bytes(JSONSerializer()))

    write(Metadata(root), "root", "1.root.json")
    write(Metadata(targets), "targets", "1.targets.json")
    write(Metadata(snapshot), "snapshot", "1.snapshot.json")
    write(Metadata(timestamp), "timestamp", "timestamp.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--models", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build(work / "repo", args.models)
        with http_folder(work / "repo") as url:
            samples = measure(work, url, args.runs)
    b, o = statistics.median(samples["bare"]), statistics.median(samples["ours"])
    print(f"TUF poll over loopback HTTP, {args.models} model targets, {args.runs} alternating runs (median ms)")
    print(f"{'bare ngclient (urllib3)':28} {b:8.2f}")
    print(f"{'edge-runtime TufRepository':28} {o:8.2f}")
    print(f"ratio ours/bare {o / b:.2f}")


def measure(work: Path, url: str, runs: int) -> dict[str, list[float]]:
    """Poll times (ms) of bare ngclient and of ours, alternating, after one first poll each."""
    root = (work / "repo" / "metadata" / "1.root.json").read_bytes()
    (work / "bootstrap.json").write_bytes(root)
    fetcher = HttpFetcher.from_config(OtaConfig(allow_http=True, retries=0))
    staging = work / "staging"
    staging.mkdir()
    bare_dir = work / "bare"
    bare_dir.mkdir()

    def bare() -> None:
        updater = Updater(str(bare_dir), f"{url}/metadata/", None, f"{url}/targets/", bootstrap=root)
        updater.refresh()
        assert updater.get_targetinfo("models/m0.bundle") is not None

    def ours() -> None:
        repo = TufRepository(url, work / "bootstrap.json", work / "state", fetcher, staging)
        repo.refresh()
        assert repo.model("m0") is not None

    samples: dict[str, list[float]] = {"bare": [], "ours": []}
    for call in (bare, ours):
        call()  # the first poll downloads everything; later ones only what changed (the timestamp)
    for _ in range(runs):
        for name, call in (("bare", bare), ("ours", ours)):
            t0 = time.perf_counter()
            call()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


if __name__ == "__main__":
    main()

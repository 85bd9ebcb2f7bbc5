"""Fuzz the OTA path: a real ``edge-runtime serve`` takes validly signed mutants, one after another.

Usage:
    python tools/fuzz_serve.py [--seed 1] [--count 10] [--models face_detection,ppocr_cls]
                               [--mutant MODEL:SEED:INDEX ...] [--budget 120] [--out serve.json]

A publisher key signs bundles (golden cases from the ORIGINAL model on real
inputs, see tools/fuzz_mutants.py); tools/make_channel.py publishes them into a
folder served by a plain HTTP server on loopback; one daemon polls it. The
originals go out first as v1. Then each mutant is published as the next
version, and the harness waits for its end: ``update_failed`` (refused, with a
reason) or ``activated`` (accepted). After every mutant:

- the daemon is the same process and ``/v2/health/live`` answers 200;
- a refusal's reason is one line, and the version that answers inferences is
  still the last good one, with the original's outputs on a held-out input;
- an accepted mutant's outputs on held-out real inputs are compared with the
  original's (beyond the golden tolerance: accepted-wrong); the original is
  then published again as the next version, so every mutant meets the original.

A daemon that dies (crash) or a mutant with no end event within ``--budget``
s (hang) ends the run: both are FAILURES, and the exit status is 1. The
wake-word model is left out by default: it is stateful, so outputs served
after other requests cannot be compared with a fresh reference.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import http.server
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fuzz_models import REPO, Outcome, classify_refusal, differs, limited, report_and_status, summarize
from fuzz_mutants import (
    PROFILES,
    Mutant,
    Profile,
    Publisher,
    make_mutant,
    make_publisher,
    model_name,
    pack,
    real_inputs,
)
from make_channel import publish
from ppocr_bench_kit import free_port, http_folder

from edge_runtime.bundle.manifest import Gates
from edge_runtime.bundle.signing import generate_keypair
from edge_runtime.bundle.writer import DEFAULT_GOLDEN_CASES
from edge_runtime.runtime.oip_types import datatype_of
from edge_runtime.telemetry.events import read_events

__all__ = ["OtaFuzz", "run_serve_fuzz"]

_END = ("update_failed", "activated")


@dataclass
class Served:
    """One fuzzed model in the daemon: its publisher, the last good version and reference outputs."""

    profile: Profile
    publisher: Publisher
    original: bytes
    heldout: list[Any]
    bundle: Path
    version: int = 1
    good: int = 1
    reference: list[dict[str, Any]] | None = None


class OtaFuzz:
    """A daemon, its channel folder and the fuzzed models; ``feed`` gives it one mutant."""

    def __init__(self, root: Path, base_url: str, args: argparse.Namespace) -> None:
        self.root, self.args = root, args
        self.key, trust = root / "publisher.key", root / "trust"
        generate_keypair(self.key)
        trust.mkdir()
        (trust / "publisher.pub").write_bytes((root / "publisher.key.pub").read_bytes())
        self.channel, self.sequence = root / "channel", 0
        self.port = free_port()
        self.state = root / "device" / "state"
        (root / "device").mkdir()
        self.config = root / "device" / "config.toml"
        self.config.write_text(
            f'state_dir = "{self.state}"\ntrust_dir = "{trust}"\n{args.config_extra}\n'
            f'[api]\nlisten = "127.0.0.1:{self.port}"\n'
            "[activation]\nprobation_inferences = 5\nprobation_seconds = 5.0\n"
            f'[ota]\nchannel_url = "{base_url}/channel/channel.json"\nallow_http = true\npoll_seconds = 0.3\n'
            "retries = 1\nbackoff_max_seconds = 0.2\n")
        self.models: dict[str, Served] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ plumbing

    def add_model(self, profile: Profile) -> None:
        work = self.root / profile.key
        work.mkdir()
        publisher = make_publisher(profile, self.key, work, self.args.golden, Gates(latency_ms_p95=5000.0))
        name = model_name(profile)
        bundle = pack(publisher, profile.path(), 1, self.root / f"{name}-v1.bundle")
        self.models[name] = Served(profile, publisher, profile.path().read_bytes(),
                                   real_inputs(profile, self.args.heldout, self.args.golden), bundle)

    def publish(self) -> None:
        self.sequence += 1
        with contextlib.redirect_stdout(None):
            publish([self.key], self.sequence, 1.0, self.channel, [m.bundle for m in self.models.values()])

    def start(self) -> None:
        err = open(self.root / "serve.err", "ab")  # noqa: SIM115 - handed to the child
        argv = [sys.executable, "-m", "edge_runtime", "serve", "--config", str(self.config)]
        self.proc = subprocess.Popen(limited(argv, self.args.mem_limit_mb, die_with_parent=True),
                                     stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
        err.close()

    @property
    def daemon(self) -> subprocess.Popen[bytes]:
        assert self.proc is not None, "start() first"
        return self.proc

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def stderr_tail(self) -> str:
        return (self.root / "serve.err").read_text(errors="replace")[-2000:]

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def infer(self, name: str, x: Any) -> tuple[int, dict[str, Any]]:
        """(served version, outputs by name) of one API inference; version -1 when it failed."""
        served = self.models[name]
        input_name = served.publisher.io[0][0].name
        body = json.dumps({"inputs": [{"name": input_name, "shape": list(x.shape), "datatype": datatype_of(x.dtype),
                                       "data": x.ravel().tolist()}]}).encode()
        try:
            status, data = self.request("POST", f"/v2/models/{name}/infer", body)
        except OSError:
            return -1, {}
        if status != 200:
            return -1, {}
        reply = json.loads(data)
        return int(reply["model_version"]), {o["name"]: np.asarray(o["data"]).reshape(o["shape"])
                                              for o in reply["outputs"]}

    def alive(self) -> str:
        """'' while the daemon runs and is live, else what is wrong."""
        if self.daemon.poll() is not None:
            return f"daemon exited with status {self.daemon.returncode}"
        try:
            status, _ = self.request("GET", "/v2/health/live")
        except OSError as e:
            return f"/v2/health/live: {e}"
        return "" if status == 200 else f"/v2/health/live answered {status}"

    def wait(self, what: str, condition: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (value := condition()) or self.daemon.poll() is not None:
                return value
            time.sleep(0.1)
        return None

    def end_event(self, name: str, version: int, bundle: Path) -> dict[str, Any] | None:
        for event in reversed(read_events(self.state / "events.jsonl")):
            if event["kind"] in _END and event["model"] in (name, "") and (
                    event["version"] == version or (event["version"] is None and f"/{bundle.name}" in event["reason"])):
                return dict(event)
        return None

    # ------------------------------------------------------------------ the run

    def ready(self) -> str:
        """Publish the originals as v1 and wait until each serves; '' or what went wrong."""
        self.publish()
        self.start()
        for name, served in self.models.items():
            if not self.wait(name, lambda n=name: self.infer(n, self.models[n].heldout[0])[0] == 1,
                             self.args.budget):
                return f"{name} v1 never served: {self.alive() or 'no answer'}; {self.stderr_tail()[-500:]}"
            served.reference = [self.infer(name, x)[1] for x in served.heldout]
        return ""

    def served_outputs(self, name: str) -> tuple[set[int], list[dict[str, Any]]]:
        replies = [self.infer(name, x) for x in self.models[name].heldout]
        return {v for v, _ in replies}, [o for _, o in replies]

    def compare(self, name: str) -> str:
        """'' when every held-out output matches the original's, else the first difference."""
        served = self.models[name]
        versions, outputs = self.served_outputs(name)
        golden = served.publisher.golden[0]
        for got, want in zip(outputs, served.reference or [], strict=True):
            if why := differs(got, want, golden.rtol, golden.atol):
                return f"v{sorted(versions)}: {why}"
        return ""

    def push(self, name: str, data: bytes, tag: str) -> tuple[int, Path, float, dict[str, Any] | None]:
        """Publish ``data`` as the next version of ``name``; (version, bundle, seconds, end event or None)."""
        served = self.models[name]
        served.version += 1
        model = self.root / f"{name}-v{served.version}{served.profile.suffix}"
        model.write_bytes(data)
        served.bundle = pack(served.publisher, model, served.version, self.root / f"{name}-v{served.version}.bundle")
        t0 = time.monotonic()
        self.publish()
        event = self.wait(tag, lambda: self.end_event(name, served.version, served.bundle), self.args.budget)
        return served.version, served.bundle, time.monotonic() - t0, event

    def feed(self, mutant: Mutant) -> Outcome:
        """Give the daemon one mutant and judge what happened."""
        name = model_name(PROFILES[mutant.model])
        served = self.models[name]
        outcome = Outcome(mutant.label, mutant.kind, mutant.edits, "")
        version, _, seconds, event = self.push(name, mutant.data, mutant.label)
        outcome.seconds = round(seconds, 2)
        if problem := self.alive():
            outcome.outcome, outcome.message, outcome.detail = "crash", problem, self.stderr_tail()
            return outcome
        if event is None:
            outcome.outcome, outcome.message = "hang", f"no end event for v{version} within {self.args.budget:g} s"
            return outcome
        reason = str(event["reason"])
        if event["kind"] == "update_failed":
            outcome.message, outcome.stage = reason, classify_refusal(reason)
            versions, _ = self.served_outputs(name)
            wrong = self.compare(name)
            if not reason or "\n" in reason:
                outcome.outcome = "bad-refusal"
            elif versions != {served.good} or wrong:
                outcome.outcome, outcome.detail = "lost-previous", f"serving {sorted(versions)}: {wrong}"
            else:
                outcome.outcome = "refused"
            return outcome
        wrong = self.compare(name)
        outcome.outcome, outcome.detail = ("accepted-wrong", wrong) if wrong else ("accepted-ok", "")
        version, _, _, event = self.push(name, served.original, f"{mutant.label} restore")  # back to the original
        if event is None or event["kind"] != "activated":
            outcome.detail += f"; restoring the original as v{version} failed: {event}"
            outcome.outcome = "lost-previous"
        else:
            served.good = version
        return outcome


def run_serve_fuzz(args: argparse.Namespace) -> dict[str, Any]:
    """Run the OTA fuzz described by ``args``; return the JSON report."""
    keys = [k for k in args.models.split(",") if k]
    outcomes: list[Outcome] = []
    pid = None
    with tempfile.TemporaryDirectory(prefix="fuzz-serve-") as tmp, http_folder(Path(tmp)) as base:
        fuzz = OtaFuzz(Path(tmp), base, args)
        try:
            for key in keys:
                fuzz.add_model(PROFILES[key])
            if problem := fuzz.ready():
                raise SystemExit(f"the daemon never served the originals: {problem}")
            mutants = [make_mutant(k, fuzz.models[model_name(PROFILES[k])].original, args.seed, i)
                       for i in range(args.start, args.start + args.count) for k in keys]
            mutants += [make_mutant(m, PROFILES[m].path().read_bytes(), int(s), int(i))
                        for m, s, i in (label.split(":") for label in args.mutant) if m in keys]
            for mutant in mutants:
                outcomes.append(fuzz.feed(mutant))
                if outcomes[-1].outcome in ("crash", "hang"):
                    break  # the daemon is gone or stuck: what follows would not be about the next mutant
            pid = fuzz.daemon.pid
        finally:
            fuzz.stop()
    by_model = {k: [o for o in outcomes if o.mutant.startswith(f"{k}:")] for k in keys}
    return {"command": " ".join(sys.argv), "seed": args.seed, "daemon_pid": pid,
            "summary": {k: summarize(v) for k, v in by_model.items()}, "outcomes": [asdict(o) for o in outcomes]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--count", type=int, default=10, help="mutants per model")
    p.add_argument("--start", type=int, default=0, help="first mutant index")
    p.add_argument("--models", default="face_detection,ppocr_cls", help=f"comma-separated, of {','.join(PROFILES)}")
    p.add_argument("--mutant", action="append", default=[], metavar="MODEL:SEED:INDEX", help="add this mutant")
    p.add_argument("--golden", type=int, default=DEFAULT_GOLDEN_CASES,
                   help="golden cases per bundle (default: bundle pack --golden-dir's)")
    p.add_argument("--heldout", type=int, default=4, help="held-out real inputs")
    p.add_argument("--budget", type=float, default=120.0, help="seconds for one mutant to end in an event")
    p.add_argument("--mem-limit-mb", type=int, default=3072, help="RLIMIT_AS of the daemon (0: none)")
    p.add_argument("--config-extra", default="", help="top-level TOML added to the daemon's config")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    args = p.parse_args(argv)
    if unknown := {k for k in args.models.split(",") if k} - set(PROFILES):
        p.error(f"unknown models {sorted(unknown)}")
    return report_and_status(run_serve_fuzz(args), args.out)


if __name__ == "__main__":
    sys.exit(main())

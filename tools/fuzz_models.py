"""Fuzz the install path: validly signed mutants of the real models, installed by the real CLI.

Usage:
    python tools/fuzz_models.py [--seed 1] [--count 40] [--models face_detection,ppocr_cls,okay_nabu]
                                [--jobs 2] [--golden 8] [--heldout 8] [--budget 120] [--mem-limit-mb 3072]
                                [--mutant MODEL:SEED:INDEX ...] [--out fuzz.json]

For each model a fresh publisher key signs bundles whose golden cases the bare
runtime computed on the ORIGINAL model from real inputs (tools/fuzz_mutants.py).
The original is installed first (v1, the baseline, which must pass); then each
mutant is packed as v2 and installed with ``edge-runtime models install`` as a
subprocess, on its own copy of that state dir. Outcomes:

- refused: exit 1 with exactly one ``error:`` line and no traceback; v1 still
  active. The stage is read from the message (verify, load, io, golden,
  latency, child: the gate's child process died or ran out of time/memory).
- accepted-ok / accepted-wrong: the mutant is active; a child process loads it
  through the model store and runs held-out real inputs (never golden ones);
  wrong means an output differs from the original's beyond the bundle's golden
  tolerance (or the child died on one of them).
- FAILURES: crash (the CLI died of a signal, exited other than 0/1, or printed
  a traceback), hang (still running after ``--budget`` s, default 120: the gate
  child's 60 s deadline plus start-up and install; killed with its process
  group), bad-refusal (not one ``error:`` line) and lost-previous (refused, but
  v1 is no longer active).

Prints a table per model and exits 1 when any failure occurred. ``--out``
writes every outcome as JSON. A mutant is named MODEL:SEED:INDEX and rebuilt
from that name alone; ``--mutant`` adds named ones (e.g. a crasher found by
tools/find_crash_mutant.py) to the run. Every child runs under RLIMIT_AS
``--mem-limit-mb`` so that a memory bomb cannot take the machine down: hitting
that limit shows as a crash unless the gate contained it first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fuzz_mutants import (
    KINDS,
    PROFILES,
    Mutant,
    Profile,
    Publisher,
    limited,
    make_mutant,
    make_publisher,
    model_name,
    pack,
    publisher_check,
    real_inputs,
)

from edge_runtime.bundle_writer import DEFAULT_GOLDEN_CASES
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.manifest import Gates
from edge_runtime.model_cache import ModelCache
from edge_runtime.signing import generate_keypair

__all__ = ["Outcome", "classify_refusal", "heldout_outputs", "limited", "run_fuzz"]

REPO = Path(__file__).resolve().parent.parent
FAILURES = ("crash", "hang", "bad-refusal", "lost-previous")
# The stage a refusal names, first match wins: the gate's child process dying or running out
# of its budget comes first, since its message may also name the phase it died in.
_STAGES = (
    ("child", re.compile(r"\bsignal \d+|\bSIG[A-Z]{3,}|exceeded \d|memory limit|time limit|timed out|killed", re.I)),
    ("golden", re.compile(r"golden", re.I)),
    ("latency", re.compile(r"latency", re.I)),
    ("io", re.compile(r"manifest (input|output)s|manifest says|manifest shape|is not an input", re.I)),
    ("load", re.compile(r"cannot load|refused the model|unsupported operator|not a readable|cannot handle|"
                        r"model file|onnx", re.I)),
    ("verify", re.compile(r"signature|sha256|manifest|bundle|member|floor", re.I)),
)
_HELDOUT_CHILD = """
import sys, numpy as np
from pathlib import Path
from edge_runtime.config import load_config
from edge_runtime.model_store import ModelStore
model = ModelStore(load_config(Path(sys.argv[1]))).load(sys.argv[2])
xs = np.load(sys.argv[3])
out = {}
for i in range(len(xs.files)):
    for name, value in model.infer({model.backend.inputs[0].name: xs[str(i)]}).items():
        out[f"{i}/{name}"] = value
np.savez(sys.argv[4], **out)
"""


@dataclass
class Outcome:
    """What one mutant did."""

    mutant: str
    kind: str
    edits: str
    outcome: str
    stage: str = ""
    message: str = ""
    returncode: int | None = None
    seconds: float = 0.0
    detail: str = ""
    publisher_check: str = ""  # what `bundle pack` would have refused the model for ('' = nothing)
    native_lines: int = 0  # other stderr lines (the runtimes' own INFO/ERROR prints), not ours


def run_child(argv: list[str], timeout: float, mem_limit_mb: int) -> tuple[int | None, str, float]:
    """Run ``argv`` in its own process group; (exit status or None on timeout, stderr, seconds)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(limited(argv, mem_limit_mb), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=REPO, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err.decode(errors="replace"), time.monotonic() - t0
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and any gate child it started
        _, err = proc.communicate()
        return None, err.decode(errors="replace"), time.monotonic() - t0


def classify_refusal(message: str) -> str:
    """The stage an ``error:`` line names (see _STAGES), or ``other``."""
    return next((stage for stage, pattern in _STAGES if pattern.search(message)), "other")


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def judge_cli(rc: int | None, stderr: str) -> tuple[str, str, str]:
    """(outcome, stage, message) of a ``models install`` run: installed, refused or a failure."""
    errors = [line[len("error: "):] for line in stderr.splitlines() if line.startswith("error: ")]
    if rc is None:
        return "hang", "", ""
    if rc < 0:
        return "crash", "", f"died of {_signal_name(rc)}"
    if "Traceback (most recent call last)" in stderr or rc not in (0, 1):
        return "crash", "", f"exit {rc}: " + " | ".join(stderr.strip().splitlines()[-3:])
    if rc == 0:
        return "installed", "", ""
    if len(errors) != 1:
        return "bad-refusal", "", f"{len(errors)} error lines: " + " | ".join(stderr.strip().splitlines()[-3:])
    return "refused", classify_refusal(errors[0]), errors[0]


def heldout_outputs(config: Path, name: str, inputs: Path, out: Path, timeout: float,
                    mem_limit_mb: int) -> tuple[dict[str, Any] | None, str]:
    """Outputs of the active version of ``name`` on every input of ``inputs`` (.npz), in a child."""
    rc, err, _ = run_child([sys.executable, "-c", _HELDOUT_CHILD, str(config), name, str(inputs), str(out)],
                           timeout, mem_limit_mb)
    if rc != 0:
        how = "timed out" if rc is None else _signal_name(rc) if rc < 0 else f"exit {rc}"
        return None, f"held-out run {how}: " + " | ".join(err.strip().splitlines()[-1:])
    with np.load(out) as loaded:
        return {k: loaded[k] for k in loaded.files}, ""


def differs(got: dict[str, Any], want: dict[str, Any], rtol: float, atol: float) -> str:
    """'' when ``got`` matches ``want`` within tolerance, else the first difference."""
    for key, ref in want.items():
        value = got.get(key)
        if value is None or value.shape != ref.shape:
            return f"{key}: shape {None if value is None else list(value.shape)} != {list(ref.shape)}"
        a, b = value.astype(np.float64), ref.astype(np.float64)
        if not np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=False):
            return f"{key}: differs by up to {float(np.nanmax(np.abs(a - b))):.3g}"
    return ""


@dataclass
class Bench:
    """One model's fixture: publisher, baseline state dir (v1 active), held-out inputs and outputs."""

    profile: Profile
    publisher: Publisher
    work: Path
    trust: Path
    original: bytes
    heldout: Path
    reference: dict[str, Any] = field(default_factory=dict)


def write_config(root: Path, trust: Path, extra: str = "") -> Path:
    """A CLI config over ``root/state`` trusting ``trust``."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.toml"
    config.write_text(f'state_dir = "{root / "state"}"\ntrust_dir = "{trust}"\n{extra}')
    return config


def install_cmd(config: Path, bundle: Path) -> list[str]:
    return [sys.executable, "-m", "edge_runtime", "models", "install", str(bundle), "--config", str(config)]


def prepare(profile: Profile, root: Path, args: argparse.Namespace) -> Bench:
    """Publisher key + trust dir, golden cases, the baseline install of v1 and its held-out outputs.

    Raises SystemExit: the ORIGINAL model is refused or its held-out run fails (nothing to compare with).
    """
    work = root / profile.key
    work.mkdir(parents=True)
    key, trust = work / "publisher.key", work / "trust"
    generate_keypair(key)
    trust.mkdir()
    (trust / "publisher.pub").write_bytes((work / "publisher.key.pub").read_bytes())
    gates = Gates(latency_ms_p95=args.latency_ms)
    publisher = make_publisher(profile, key, work, args.golden, gates)
    heldout = work / "heldout.npz"
    np.savez(heldout, **{str(i): x for i, x in enumerate(real_inputs(profile, args.heldout, args.golden))})  # type: ignore[arg-type]
    bench = Bench(profile, publisher, work, trust, profile.path().read_bytes(), heldout)
    config = write_config(work / "base", trust, args.config_extra)
    rc, err, _ = run_child(install_cmd(config, pack(publisher, profile.path(), 1, work / "v1.bundle")),
                           args.budget, args.mem_limit_mb)
    if rc != 0:
        raise SystemExit(f"{profile.key}: the ORIGINAL model is refused (exit {rc}): {err.strip()[-500:]}")
    ref, why = heldout_outputs(config, model_name(profile), heldout, work / "reference.npz", args.budget,
                               args.mem_limit_mb)
    if ref is None:
        raise SystemExit(f"{profile.key}: the ORIGINAL model's held-out run failed: {why}")
    bench.reference = ref
    return bench


def fuzz_one(bench: Bench, mutant: Mutant, args: argparse.Namespace) -> Outcome:
    """Install ``mutant`` as v2 on a copy of the baseline state dir and judge what happened."""
    tag = mutant.label.replace(":", "-")
    root = bench.work / tag
    shutil.copytree(bench.work / "base" / "state", root / "state", symlinks=True)
    config = write_config(root, bench.trust, args.config_extra)
    model = root / f"mutant{bench.profile.suffix}"
    model.write_bytes(mutant.data)
    outcome = Outcome(mutant.label, mutant.kind, mutant.edits, "",
                      publisher_check=publisher_check(bench.publisher, model))
    try:
        bundle = pack(bench.publisher, model, 2, root / "v2.bundle")
    except EdgeRuntimeError as e:  # pack_bundle refusing the mutant is an outcome, not a harness bug
        outcome.outcome, outcome.stage, outcome.message = "refused", "pack", e.one_line()
        return outcome
    rc, err, seconds = run_child(install_cmd(config, bundle), args.budget, args.mem_limit_mb)
    outcome.returncode, outcome.seconds = rc, round(seconds, 2)
    outcome.outcome, outcome.stage, outcome.message = judge_cli(rc, err)
    outcome.native_lines = sum(1 for line in err.splitlines() if line.strip() and not line.startswith("error: "))
    name = model_name(bench.profile)
    if outcome.outcome in FAILURES:
        outcome.detail = err.strip()[-2000:]
    elif outcome.outcome == "refused":
        active = ModelCache(root / "state").active_version(name)
        if active != 1:
            outcome.outcome, outcome.detail = "lost-previous", f"active is v{active} after the refusal"
    else:
        got, why = heldout_outputs(config, name, bench.heldout, root / "heldout-out.npz", args.budget,
                                   args.mem_limit_mb)
        golden = bench.publisher.golden[0]
        why = why or differs(got or {}, bench.reference, golden.rtol, golden.atol)
        outcome.outcome, outcome.detail = ("accepted-wrong", why) if why else ("accepted-ok", "")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return outcome


def mutants_for(key: str, original: bytes, args: argparse.Namespace) -> list[Mutant]:
    kinds = tuple(k for k in args.kinds.split(",") if k)
    picked = [make_mutant(key, original, args.seed, i) for i in range(args.start, args.start + args.count * 4)
              if KINDS[i % len(KINDS)] in kinds][:args.count]
    for label in args.mutant:
        model, seed, index = label.split(":")
        if model == key:
            picked.append(make_mutant(key, original, int(seed), int(index)))
    return picked


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    counts = Counter(o.outcome for o in outcomes)
    stages = Counter(o.stage for o in outcomes if o.outcome == "refused")
    return {"mutants": len(outcomes), "refused": dict(sorted(stages.items())),
            **{k: counts.get(k, 0) for k in ("accepted-ok", "accepted-wrong", *FAILURES)},
            "max_seconds": max((o.seconds for o in outcomes), default=0.0)}


def table(summary: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'model':16} {'mutants':>7}  {'refused by stage':40} {'ok':>4} {'wrong':>5} {'crash':>5} "
             f"{'hang':>4} {'other failures':>14} {'max s':>6}"]
    for model, s in summary.items():
        refused = ", ".join(f"{k} {v}" for k, v in s["refused"].items()) or "-"
        other = s["bad-refusal"] + s["lost-previous"]
        lines.append(f"{model:16} {s['mutants']:>7}  {refused:40} {s['accepted-ok']:>4} {s['accepted-wrong']:>5} "
                     f"{s['crash']:>5} {s['hang']:>4} {other:>14} {s['max_seconds']:>6.1f}")
    return "\n".join(lines)


def run_fuzz(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole fuzz described by ``args``; return the JSON report."""
    keys = [k for k in args.models.split(",") if k]
    with tempfile.TemporaryDirectory(prefix="fuzz-models-") as tmp:
        benches = {k: prepare(PROFILES[k], Path(tmp), args) for k in keys}
        tasks = [(bench, m) for k, bench in benches.items() for m in mutants_for(k, bench.original, args)]
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            outcomes = list(pool.map(lambda t: fuzz_one(t[0], t[1], args), tasks))
    by_model = {k: [o for o in outcomes if o.mutant.startswith(f"{k}:")] for k in keys}
    return {"command": " ".join(sys.argv), "seed": args.seed,
            "summary": {k: summarize(v) for k, v in by_model.items()},
            "outcomes": [asdict(o) for o in outcomes]}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--count", type=int, default=40, help="mutants per model")
    p.add_argument("--start", type=int, default=0, help="first mutant index")
    p.add_argument("--models", default=",".join(PROFILES), help=f"comma-separated, of {','.join(PROFILES)}")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {','.join(KINDS)}")
    p.add_argument("--mutant", action="append", default=[], metavar="MODEL:SEED:INDEX", help="add this mutant")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--golden", type=int, default=DEFAULT_GOLDEN_CASES,
                   help="golden cases per bundle (default: bundle pack --golden-dir's)")
    p.add_argument("--heldout", type=int, default=8, help="held-out real inputs for accepted mutants")
    p.add_argument("--latency-ms", type=float, default=5000.0, help="the bundles' gates.latency_ms_p95")
    p.add_argument("--budget", type=float, default=120.0, help="seconds before an install counts as a hang")
    p.add_argument("--mem-limit-mb", type=int, default=3072, help="RLIMIT_AS of every child (0: none)")
    p.add_argument("--config-extra", default="", help="TOML appended to every device config")
    p.add_argument("--keep", action="store_true", help="keep each mutant's state dir (under the temp dir)")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if unknown := {k for k in args.models.split(",") if k} - set(PROFILES):
        sys.exit(f"unknown models {sorted(unknown)} (known: {', '.join(PROFILES)})")
    return report_and_status(run_fuzz(args), args.out)


def report_and_status(report: dict[str, Any], out: Path | None) -> int:
    """Print the table and each failure, write the JSON to ``out``; 1 if anything failed."""
    print(table(report["summary"]))
    for o in report["outcomes"]:
        if o["outcome"] in FAILURES:
            print(f"FAILURE {o['outcome']}: {o['mutant']} ({o['edits']}): {o['message']} {o['detail'][-300:]}")
    if out:
        out.write_text(json.dumps(report, indent=1) + "\n")
    return 1 if any(s[f] for s in report["summary"].values() for f in FAILURES) else 0


if __name__ == "__main__":
    sys.exit(main())

"""A short seeded run of the model fuzzers (tools/fuzz_models.py, tools/fuzz_serve.py): validly signed
mutants of the real models, installed by the real CLI and taken over OTA by a real daemon.

It includes a REAL crashing model: mutant face_detection:1:615 (10 bytes flipped) makes the bare
LiteRT interpreter die of SIGSEGV, even under the gate child's 512 MB data cap, which the first test
checks in a child before the others rely on it. The gate must contain that crash: a one-line refusal
naming the signal, the CLI and the daemon alive, the original still serving.
The long run is by command (README, "Benchmarks").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
CRASHER = "face_detection:1:615"
FAILURES = ("crash", "hang", "bad-refusal", "lost-previous")


def _tool(script: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "tools" / script), *args], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=REPO)


def _report(tmp_path: Path, script: str, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / f"{script}.json"
    proc = _tool(script, "--seed", "1", "--mutant", CRASHER, "--out", str(out), *args)
    assert out.exists(), f"{script} wrote no report (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc, json.loads(out.read_text())


def _failures(report: dict[str, Any]) -> list[str]:
    return [f"{o['outcome']}: {o['mutant']} ({o['edits']}): {o['message']} {o['detail'][-400:]}"
            for o in report["outcomes"] if o["outcome"] in FAILURES]


def test_the_crashing_mutant_really_crashes_bare_litert() -> None:
    index = CRASHER.rsplit(":", 1)[1]
    proc = _tool("find_crash_mutant.py", "--model", "face_detection", "--seed", "1", "--start", index,
                 "--count", "1", "--kinds", "flip", "--want", "1", timeout=120)
    assert proc.returncode == 0 and "SIGSEGV" in proc.stdout, (
        f"{CRASHER} no longer crashes bare LiteRT (a new LiteRT?): find another with "
        f"python tools/find_crash_mutant.py\n{proc.stdout}{proc.stderr[-2000:]}")


def test_signed_mutants_installed_by_the_cli_never_crash_or_hang_it(tmp_path: Path) -> None:
    proc, report = _report(tmp_path, "fuzz_models.py", "--start", "1", "--count", "4", "--heldout", "4",
                           "--jobs", "2")
    assert _failures(report) == [], proc.stdout
    outcomes = {o["mutant"]: o for o in report["outcomes"]}
    assert len(outcomes) == 3 * 4 + 1  # the crasher (a flip) and one of each other kind per model
    assert {o["kind"] for o in outcomes.values()} == {"flip", "overwrite", "truncate", "duplicate", "huge32"}
    for o in outcomes.values():
        if o["outcome"] == "refused":
            assert o["message"] and "\n" not in o["message"] and o["stage"] != "other", o
    crasher = outcomes[CRASHER]
    assert (crasher["outcome"], crasher["stage"]) == ("refused", "child"), (
        f"the gate did not contain a SIGSEGV in the runtime (needs the child-process gate): {crasher}")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_a_serving_daemon_survives_signed_mutants_over_ota(tmp_path: Path) -> None:
    proc, report = _report(tmp_path, "fuzz_serve.py", "--count", "2", "--heldout", "2")
    assert _failures(report) == [], proc.stdout
    outcomes = {o["mutant"]: o for o in report["outcomes"]}
    assert len(outcomes) == 2 * 2 + 1
    crasher = outcomes[CRASHER]
    assert (crasher["outcome"], crasher["stage"]) == ("refused", "child"), (
        f"the daemon did not survive gating a SIGSEGV model (needs the child-process gate): {crasher}")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


@pytest.mark.parametrize("message, stage", [
    ("gate child died of signal 11 (SIGSEGV) while loading", "child"),
    ("gate child exceeded 512 MB", "child"),
    ("golden cases: 0/1 passed, 100% required; first failure: golden/0.input.npy: ...", "golden"),
    ("model.tflite: cannot load TFLite model: The model is not a valid Flatbuffer buffer", "load"),
    ("input 'x': manifest shape [1, 3] does not fit model shape [1, 4]", "io"),
])
def test_refusals_are_sorted_by_the_stage_they_name(message: str, stage: str) -> None:
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from fuzz_models import classify_refusal
    finally:
        sys.path.remove(str(REPO / "tools"))
    assert classify_refusal(message) == stage

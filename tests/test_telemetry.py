"""Telemetry: the documented schema, seq pass-through, system stats that never raise."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.mqtt.spool import Spool
from edge_runtime.telemetry import report as telemetry
from edge_runtime.telemetry.metrics import Metrics
from edge_runtime.telemetry.report import SystemStats, build_telemetry

TOP_TYPES: dict[str, tuple[type, ...]] = {
    "schema": (int,), "seq": (int,), "ts": (float,), "device": (str,), "uptime_s": (float, int),
    "cpu_percent": (float, int, type(None)), "rss_mb": (float, int, type(None)),
    "temperature_c": (float, int, type(None)), "disk_free_mb": (float, int, type(None)),
    "inferences": (int,), "errors": (int,), "drops": (int,), "source_errors": (int,), "queue_depth": (int,),
    "spool_pending": (int,), "spool_pending_bytes": (int,), "spool_dropped": (int,),
    "spool_dropped_ranges": (list,), "models": (list,), "pipelines": (list,), "monitoring": (dict, type(None)),
}
MODEL_KEYS = {"name", "version", "p50_ms", "p95_ms", "p99_ms", "fps", "inferences", "errors"}


def busy_metrics() -> Metrics:
    now = [0.0]
    metrics = Metrics(clock=lambda: now[0])
    for i in range(100):
        now[0] = i * 0.1
        metrics.observe("ppocr-cls", 1.0 + i / 100.0)
    metrics.observe("ppocr-cls", 0.0, ok=False)
    metrics.set_version("ppocr-cls", 3)
    metrics.drop("cam0", 4)
    metrics.queue_depth("cam0", 2)
    metrics.source_error("folder1")
    return metrics


def document(**overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "device": "dev1", "metrics_snapshot": busy_metrics().snapshot(),
        "models": {"ppocr-cls": 3, "faces": None},
        "stats": {"cpu_percent": 1.5, "rss_mb": 80.2, "temperature_c": None, "disk_free_mb": 1000.0,
                  "uptime_s": 12.5},
        "spool": {"pending": 7, "pending_bytes": 700, "dropped": 3, "dropped_ranges": [[1, 3]]},
    }
    kwargs.update(overrides)
    raw = build_telemetry(kwargs.pop("seq", 42), **kwargs)
    assert isinstance(raw, bytes)
    parsed: dict[str, Any] = json.loads(raw)
    return parsed


def test_documented_schema_matches_the_document() -> None:
    doc = document()
    documented = set(re.findall(r"^(\w+) +(?:int|float|str|list|object)\??\s", telemetry.__doc__ or "", re.MULTILINE))
    assert documented == set(TOP_TYPES), "module docstring and TOP_TYPES disagree"
    assert set(doc) == set(TOP_TYPES)
    for key, types in TOP_TYPES.items():
        assert isinstance(doc[key], types) and not isinstance(doc[key], bool), (key, doc[key])


def test_values_seq_and_models() -> None:
    doc = document(seq=123456789)
    assert doc["seq"] == 123456789 and doc["schema"] == 1 and doc["device"] == "dev1"
    totals = (doc["inferences"], doc["errors"], doc["drops"], doc["queue_depth"], doc["source_errors"])
    assert totals == (100, 1, 4, 2, 1)
    assert (doc["spool_pending"], doc["spool_dropped"], doc["spool_dropped_ranges"]) == (7, 3, [[1, 3]])
    assert doc["uptime_s"] == 12.5 and doc["cpu_percent"] == 1.5 and doc["temperature_c"] is None
    by_name = {m["name"]: m for m in doc["models"]}
    assert [m["name"] for m in doc["models"]] == ["faces", "ppocr-cls"]
    assert all(set(m) == MODEL_KEYS for m in doc["models"])
    cls = by_name["ppocr-cls"]
    assert cls["version"] == 3 and cls["inferences"] == 100 and cls["errors"] == 1
    assert 1.0 <= cls["p50_ms"] <= cls["p95_ms"] <= cls["p99_ms"] <= 2.0
    assert cls["fps"] > 0
    assert by_name["faces"] == {"name": "faces", "version": None, "p50_ms": None, "p95_ms": None, "p99_ms": None,
                                "fps": 0.0, "inferences": 0, "errors": 0}
    assert {p["name"] for p in doc["pipelines"]} == {"cam0", "folder1"}


def test_partial_inputs_and_non_finite_numbers_still_give_valid_json() -> None:
    doc = document(metrics_snapshot={}, models={}, spool={},
                   stats={"cpu_percent": math.nan, "rss_mb": math.inf, "uptime_s": 1.0})
    assert doc["cpu_percent"] is None and doc["rss_mb"] is None and doc["disk_free_mb"] is None
    assert doc["models"] == [] and doc["pipelines"] == [] and doc["spool_pending"] == 0


def test_build_inside_spool_append_carries_the_spool_seq(tmp_path: Path) -> None:
    with Spool(tmp_path / "s" / "spool.db", max_messages=100, max_bytes=1 << 20) as spool:
        spool.append("edge/dev1/events", lambda s: b"{}")
        stats = spool.stats()  # read before append: build runs under the spool's lock
        seq = spool.append("edge/dev1/telemetry", lambda s: build_telemetry(
            s, device="dev1", metrics_snapshot={}, models={}, stats={}, spool=stats))
        stored = json.loads(spool.peek(10)[-1].payload)
    assert seq == 2 and stored["seq"] == 2 and stored["spool_pending"] == 1


def test_system_stats_with_nothing_to_read(tmp_path: Path) -> None:
    stats = SystemStats(tmp_path / "no-such-state-dir", proc_self=tmp_path / "proc", thermal_dir=tmp_path / "sys")
    sample = stats.sample()
    assert sample["rss_mb"] is None and sample["temperature_c"] is None and sample["disk_free_mb"] is None
    assert sample["uptime_s"] >= 0

    def broken() -> float:
        raise OSError("no rusage")

    stats = SystemStats(tmp_path, proc_self=tmp_path, thermal_dir=tmp_path, cpu_time=broken)
    assert stats.sample()["cpu_percent"] is None


def test_system_stats_from_fake_proc_and_sysfs(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "status").write_text("Name:\tpython\nVmPeak:\t 999 kB\nVmRSS:\t  102400 kB\nThreads:\t3\n")
    thermal = tmp_path / "thermal"
    for zone, value in (("thermal_zone0", "45000\n"), ("thermal_zone1", "garbage"), ("thermal_zone2", "-273000"),
                        ("thermal_zone3", "61300")):
        (thermal / zone).mkdir(parents=True)
        (thermal / zone / "temp").write_text(value)
    (thermal / "cooling_device0").mkdir()
    now, cpu = [100.0], [5.0]
    stats = SystemStats(tmp_path, clock=lambda: now[0], proc_self=proc, thermal_dir=thermal, cpu_time=lambda: cpu[0])
    now[0], cpu[0] = 102.0, 5.5
    sample = stats.sample()
    assert sample["cpu_percent"] == 25.0  # 0.5 s of CPU in 2 s
    assert sample["rss_mb"] == 100.0
    assert sample["temperature_c"] == 61.3  # the hottest valid zone; garbage and -273 C are skipped
    assert sample["uptime_s"] == 2.0
    assert isinstance(sample["disk_free_mb"], float) and sample["disk_free_mb"] > 0
    now[0] += 1.0
    assert stats.sample()["cpu_percent"] == 0.0, "the next sample covers only the time since the previous one"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_system_stats_on_this_machine(tmp_path: Path) -> None:
    stats = SystemStats(tmp_path)
    sum(i * i for i in range(200_000))
    sample = stats.sample()
    assert sample["rss_mb"] is not None and 5 < sample["rss_mb"] < 100_000
    assert sample["cpu_percent"] is not None and sample["cpu_percent"] >= 0
    assert sample["disk_free_mb"] is not None

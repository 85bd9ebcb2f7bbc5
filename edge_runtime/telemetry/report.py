"""Telemetry: cheap system stats and the JSON document published on ``<prefix>/<device>/telemetry``.

Telemetry message schema (``schema`` 1). One JSON object; every key is always
present; ``null`` means "not measurable here". Top level:

==================== ======== ====================================================
key                  type     meaning
==================== ======== ====================================================
schema               int      1; bumped only on an incompatible change
seq                  int      spool sequence number, shared with events; strictly
                              increasing per device, never reused (drop duplicates
                              by it, detect gaps with it)
ts                   float    Unix time in seconds (ms precision) when built
device               str      device id
uptime_s             float    seconds since the daemon started
cpu_percent          float?   daemon CPU since the previous telemetry, % of one
                              core (can exceed 100 on several cores)
rss_mb               float?   resident memory of the daemon, MiB
temperature_c        float?   hottest thermal zone, degrees Celsius
disk_free_mb         float?   free space for the daemon in the state dir, MiB
inferences           int      successful inferences, all models, since start
errors               int      failed inferences, all models, since start
drops                int      frames dropped (busy pipelines), since start
source_errors        int      source failures (camera, stream), since start
queue_depth          int      frames waiting for inference now, all pipelines
spool_pending        int      messages waiting in the offline spool when built
spool_pending_bytes  int      their size in bytes
spool_dropped        int      messages ever dropped unsent (spool full or lost);
                              their seqs never arrive
spool_dropped_ranges list     the latest [first_seq, last_seq] ranges dropped
models               list     one object per model, sorted by name (below)
pipelines            list     one object per pipeline, sorted by name (below)
monitoring           object?  drift per model (features' score, PSI and its
                              threshold, in drift or not), field accuracy per
                              version, truth matched/pending/misses, shadow runs'
                              figures; null with ``[monitoring] enabled = false``
==================== ======== ====================================================

``models[]``: ``name`` (str), ``version`` (int? serving version, null when
none is loaded), ``p50_ms``/``p95_ms``/``p99_ms`` (float? latency over the
last minute, null without inferences), ``fps`` (float, last minute),
``inferences`` (int), ``errors`` (int) since start.

``pipelines[]``: ``name`` (str), ``drops`` (int), ``queue_depth`` (int),
``source_errors`` (int), ``stalls`` (int: stalls of its source or worker),
``progress_age_s`` (float?: seconds since it last made progress).
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypedDict

__all__ = ["TELEMETRY_SCHEMA", "SystemSample", "SystemStats", "build_telemetry"]

TELEMETRY_SCHEMA = 1
_MAX_READ = 16 << 10
_TEMP_RANGE_C = (-60.0, 200.0)  # outside it a zone reports an error code, not a temperature


class SystemSample(TypedDict):
    """One reading of :meth:`SystemStats.sample`; None where the value is unavailable."""

    cpu_percent: float | None
    rss_mb: float | None
    temperature_c: float | None
    disk_free_mb: float | None
    uptime_s: float


class SystemStats:
    """Reads process CPU, RSS, temperature, free disk and uptime; never raises.

    ``proc_self`` and ``thermal_dir`` are injectable so tests can point them at
    a directory without those files (every missing value becomes None).
    """

    def __init__(self, state_dir: Path, clock: Callable[[], float] = time.monotonic, *,
                 proc_self: Path = Path("/proc/self"), thermal_dir: Path = Path("/sys/class/thermal"),
                 cpu_time: Callable[[], float] | None = None) -> None:
        self._state_dir = state_dir
        self._clock = clock
        self._status = proc_self / "status"
        self._cpu_time = cpu_time or _rusage_cpu_seconds
        # Zones do not come and go at run time; list them once.
        try:
            self._zones = sorted(thermal_dir.glob("thermal_zone*/temp"))
        except OSError:
            self._zones = []
        self._started = clock()
        self._last_wall = self._started
        self._last_cpu = self._safe_cpu()

    def sample(self) -> SystemSample:
        """Current values; ``cpu_percent`` covers the time since the previous call (or construction)."""
        now, cpu = self._clock(), self._safe_cpu()
        cpu_percent = None
        if cpu is not None and self._last_cpu is not None and now > self._last_wall:
            cpu_percent = round(max(0.0, cpu - self._last_cpu) / (now - self._last_wall) * 100.0, 2)
        self._last_wall, self._last_cpu = now, cpu
        return SystemSample(cpu_percent=cpu_percent, rss_mb=self._rss_mb(), temperature_c=self._temperature_c(),
                            disk_free_mb=self._disk_free_mb(), uptime_s=round(now - self._started, 3))

    def _safe_cpu(self) -> float | None:
        try:
            return float(self._cpu_time())
        except (OSError, ValueError):
            return None

    def _rss_mb(self) -> float | None:
        text = _read_small(self._status)
        for line in (text or "").splitlines():
            if line.startswith("VmRSS:"):
                parts = line.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    return round(int(parts[1]) / 1024.0, 1)  # the kernel reports kB
        return None

    def _temperature_c(self) -> float | None:
        hottest = None
        for zone in self._zones:
            text = _read_small(zone)  # some zones fail to read (EINVAL, ENODATA) when the sensor is off
            try:
                celsius = int((text or "").strip()) / 1000.0
            except ValueError:
                continue
            if _TEMP_RANGE_C[0] <= celsius <= _TEMP_RANGE_C[1] and (hottest is None or celsius > hottest):
                hottest = celsius
        return None if hottest is None else round(hottest, 1)

    def _disk_free_mb(self) -> float | None:
        try:
            st = os.statvfs(self._state_dir)
        except OSError:
            return None
        return round(st.f_bavail * st.f_frsize / (1 << 20), 1)  # f_bavail: what an unprivileged writer gets


def _rusage_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _read_small(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read(_MAX_READ).decode("ascii", "replace")
    except OSError:
        return None


def build_telemetry(seq: int, *, device: str, metrics_snapshot: Mapping[str, Any],
                    models: Mapping[str, int | None], stats: Mapping[str, Any], spool: Mapping[str, Any],
                    ts: float | None = None) -> bytes:
    """The telemetry JSON document (schema in this module's docstring), UTF-8 encoded.

    ``metrics_snapshot`` is :meth:`Metrics.snapshot`, ``models`` maps each model
    name to its serving version (None when not loaded), ``stats`` is a
    :class:`SystemSample`, ``spool`` is :meth:`Spool.stats` read *before*
    ``Spool.append`` (this runs inside ``append``'s ``build``, under the spool's
    lock). Missing keys read as zero / None, so a partial snapshot still gives a
    complete document. Raises nothing for missing or non-finite values.
    """
    summaries: Mapping[str, Mapping[str, Any]] = metrics_snapshot.get("models") or {}
    model_rows: list[dict[str, Any]] = []
    inferences = errors = 0
    for name in sorted(set(models) | set(summaries)):
        summary = summaries.get(name) or {}
        inferences += int(summary.get("inferences") or 0)
        errors += int(summary.get("errors") or 0)
        model_rows.append({
            "name": name, "version": models.get(name),
            "p50_ms": _num(summary.get("p50_ms")), "p95_ms": _num(summary.get("p95_ms")),
            "p99_ms": _num(summary.get("p99_ms")), "fps": _num(summary.get("fps")) or 0.0,
            "inferences": int(summary.get("inferences") or 0), "errors": int(summary.get("errors") or 0),
        })
    drops: Mapping[str, int] = metrics_snapshot.get("drops") or {}
    depth: Mapping[str, int] = metrics_snapshot.get("queue_depth") or {}
    source_errors: Mapping[str, int] = metrics_snapshot.get("source_errors") or {}
    stalls: Mapping[str, int] = metrics_snapshot.get("stalls") or {}
    progress: Mapping[str, float] = metrics_snapshot.get("progress_age_s") or {}
    pipelines = [{"name": p, "drops": int(drops.get(p, 0)), "queue_depth": int(depth.get(p, 0)),
                  "source_errors": int(source_errors.get(p, 0)), "stalls": int(stalls.get(p, 0)),
                  "progress_age_s": _num(progress.get(p))}
                 for p in sorted(set(drops) | set(depth) | set(source_errors) | set(stalls) | set(progress))]
    uptime = stats.get("uptime_s", metrics_snapshot.get("uptime_s"))
    document = {
        "schema": TELEMETRY_SCHEMA,
        "seq": seq,
        "ts": round(time.time() if ts is None else ts, 3),
        "device": device,
        "uptime_s": _num(uptime) or 0.0,
        "cpu_percent": _num(stats.get("cpu_percent")),
        "rss_mb": _num(stats.get("rss_mb")),
        "temperature_c": _num(stats.get("temperature_c")),
        "disk_free_mb": _num(stats.get("disk_free_mb")),
        "inferences": inferences,
        "errors": errors,
        "drops": sum(int(v) for v in drops.values()),
        "source_errors": sum(int(v) for v in source_errors.values()),
        "queue_depth": sum(int(v) for v in depth.values()),
        "spool_pending": int(spool.get("pending") or 0),
        "spool_pending_bytes": int(spool.get("pending_bytes") or 0),
        "spool_dropped": int(spool.get("dropped") or 0),
        "spool_dropped_ranges": [[int(a), int(b)] for a, b in spool.get("dropped_ranges") or ()],
        "models": model_rows,
        "pipelines": pipelines,
        "monitoring": metrics_snapshot.get("monitoring"),
    }
    return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()


def _num(value: Any) -> float | None:
    """A finite float or None (NaN/inf would make the JSON invalid)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number and abs(number) != float("inf") else None

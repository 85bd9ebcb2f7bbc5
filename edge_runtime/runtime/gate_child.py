"""Gate an untrusted candidate in a child process with a memory and a time budget.

A signature proves who published a model, not that the runtime survives it: a
mutant can crash LiteRT with SIGSEGV, or allocate gigabytes. So the candidate
is first loaded, warmed up and gated by ``python -m edge_runtime.runtime.gate_child``:

* the request (directory, manifest sha256, runtime options, limits, budget) is
  one JSON document on the child's stdin;
* the child caps its own data segment (``RLIMIT_DATA``: every private writable
  mapping, so a malloc/mmap bomb fails instead of growing) before it imports a
  runtime, then reports each phase (``loading``, ``warming up``, ``gating``) as
  one JSON line on a pipe, and finally the :class:`GateReport` or the error;
* the parent kills the child's whole process group at the wall-clock deadline.

A signal, an allocation failure, a timeout or an error is raised in the parent
as a one-line :class:`GateError` naming the phase, e.g. ``signal 11 (SIGSEGV)
while loading``. Only a candidate that passes here is loaded into the daemon.

:func:`gate_in_child` is the stable entry point (the fuzz harness uses it too).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from edge_runtime import errors
from edge_runtime.config.model import Limits
from edge_runtime.errors import BackendUnavailableError, EdgeRuntimeError, GateError
from edge_runtime.runtime.backends.base import BackendOptions
from edge_runtime.runtime.gates import GateReport, LatencyStats

__all__ = ["ChildBudget", "gate_in_child", "main"]

#: Environment variable read only by the child: ``<phase>:<action>`` makes it fail on purpose
#: (``loading:segv``, ``gating:hang``, ``gating:alloc``) so tests can exercise each way a child
#: dies; production never sets it.
FAULT_ENV = "EDGE_RUNTIME_GATE_CHILD_FAULT"
_MAX_PROTOCOL_BYTES = 1 << 20
_log = logging.getLogger(__name__)
_STDERR_TAIL = 400
_MEMORY_MARKERS = ("memoryerror", "bad_alloc", "bad allocation", "failed to allocate", "out of memory",
                   "cannot allocate memory")


@dataclass(frozen=True)
class ChildBudget:
    """What one gate child may use: ``memory_mb`` of data segment, ``timeout_seconds`` of wall clock."""

    memory_mb: int = 512
    timeout_seconds: float = 60.0


# ---------------------------------------------------------------------- parent


def gate_in_child(directory: Path, manifest_sha256: str, *, options: BackendOptions, limits: Limits,
                  budget: ChildBudget) -> GateReport:
    """Load, warm up and gate the candidate in ``directory`` in a child process.

    ``manifest_sha256`` is the sha256 of the verified ``manifest.json`` bytes;
    the child refuses a directory whose manifest differs.

    Raises:
        GateError: the child died of a signal, exceeded its memory, timed out,
            or a gate failed; the message names the phase.
        BackendUnavailableError: the child could not be started.
        ModelError (a subclass), IntegrityError, ManifestError: the child
            reported that error (the runtime refused the model, a file changed).
    """
    request = {
        "directory": str(directory),
        "manifest_sha256": manifest_sha256,
        "options": {"providers": list(options.providers), "threads": options.threads,
                    "spin_wait": options.spin_wait,
                    "cache_dir": None if options.cache_dir is None else str(options.cache_dir),
                    "extra": dict(options.extra)},
        "limits": dataclasses.asdict(limits),
        "memory_mb": budget.memory_mb,
        "timeout_seconds": budget.timeout_seconds,
        "parent": os.getpid(),
    }
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(  # our own module, run with this interpreter
                [sys.executable, "-m", "edge_runtime.runtime.gate_child"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=err, start_new_session=True, close_fds=True, env=_child_env())
        except OSError as e:  # the device's problem (no fork, no memory), not the candidate's: not recorded
            raise BackendUnavailableError(f"cannot start the gate child: {e.strerror or e}") from e
        reader = _Reader(proc.stdout)  # type: ignore[arg-type]
        try:
            assert proc.stdin is not None
            with contextlib.suppress(OSError):  # a child that died at start-up is judged below
                proc.stdin.write(json.dumps(request).encode())
                proc.stdin.close()
            try:
                proc.wait(timeout=budget.timeout_seconds)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise GateError(f"gate timed out after {budget.timeout_seconds:g} s while {reader.phase}") from None
            finally:
                _kill_group(proc)  # a runtime thread the child left behind dies with it
                reader.join()
        except BaseException:
            _kill_group(proc)
            raise
        return _judge(proc.returncode, reader, _tail(err), budget)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The child imports edge_runtime the way this process did, installed or from a checkout.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    # OpenBLAS (numpy's) reserves a buffer per core at import, inside the data cap; the gate
    # never needs BLAS threads, and the cap must not depend on the core count.
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return env


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


class _Reader(threading.Thread):
    """Reads the child's JSON lines: phases as they come, then the final message (capped)."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__(name="gate-child-reader", daemon=True)
        self.stream = stream
        self.phase = "starting"
        self.final: dict[str, Any] | None = None
        self.garbled = ""
        self.start()

    def run(self) -> None:
        total = 0
        with self.stream:
            for line in self.stream:
                total += len(line)
                if total > _MAX_PROTOCOL_BYTES:
                    self.garbled = "the gate child wrote too much"
                    return
                try:
                    msg = json.loads(line)
                except ValueError:
                    self.garbled = "the gate child wrote a malformed line"
                    return
                if isinstance(msg, dict) and isinstance(msg.get("phase"), str):
                    self.phase = msg["phase"][:40]
                elif isinstance(msg, dict):
                    self.final = msg


def _tail(err: IO[bytes]) -> str:
    """The end of the child's stderr, without the runtimes' INFO chatter, on one line."""
    err.seek(0, os.SEEK_END)
    size = err.tell()
    err.seek(max(0, size - _STDERR_TAIL))
    lines = err.read().decode("utf-8", "replace").splitlines()
    return " ".join(" ".join(x for x in lines if not x.startswith("INFO:")).split())


def _judge(rc: int, reader: _Reader, stderr: str, budget: ChildBudget) -> GateReport:
    final, phase = reader.final, reader.phase
    if rc == 0 and final is not None and final.get("ok") is True:
        _log.debug("gate child memory use (MB): %s", final.get("usage_mb"))
        try:
            return _report(final["report"])
        except (KeyError, TypeError, ValueError) as e:
            raise GateError(f"the gate child sent an invalid report: {e}") from e
    if final is not None and final.get("ok") is False:
        message = str(final.get("error", ""))[:1000]
        if final.get("memory"):
            raise GateError(f"exceeded {budget.memory_mb} MB while {phase}: {message}")
        cls = getattr(errors, str(final.get("type", "")), None)
        if isinstance(cls, type) and issubclass(cls, EdgeRuntimeError):
            raise cls(message)
        raise GateError(f"{message} while {phase}")
    if rc < 0:
        try:
            name = f" ({signal.Signals(-rc).name})"
        except ValueError:
            name = ""
        # An abort while allocating is the runtime's answer to the memory cap (C++ bad_alloc not caught).
        if -rc == signal.SIGABRT and any(m in stderr.lower() for m in _MEMORY_MARKERS):
            raise GateError(f"exceeded {budget.memory_mb} MB while {phase} (signal {-rc}{name})")
        raise GateError(f"signal {-rc} while {phase}{name}" + (f"; stderr: {stderr}" if stderr else ""))
    detail = reader.garbled or (f"stderr: {stderr}" if stderr else "no report")
    raise GateError(f"the gate child exited {rc} while {phase}: {detail}")


def _report(raw: dict[str, Any]) -> GateReport:
    latency = raw["latency"]
    return GateReport(
        golden_total=int(raw["golden_total"]),
        golden_passed=int(raw["golden_passed"]),
        failures=tuple(str(f) for f in raw["failures"]),
        latency=None if latency is None else LatencyStats(**{k: type(v)(v) for k, v in latency.items()}),
    )


# ---------------------------------------------------------------------- child


def _limit_memory(memory_mb: int) -> None:
    """Cap the data segment (heap and private mappings); thread stacks and code are not counted."""
    cap = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))


def _die_with_parent(parent: int, timeout_seconds: float) -> None:
    """Never outlive the gate: a parent killed with -9 cannot kill the child's group any more.

    Linux kills this process when the parent dies (PR_SET_PDEATHSIG); everywhere
    an alarm a little after the parent's deadline ends it as a last resort.
    """
    signal.alarm(int(timeout_seconds) + 5)  # default action of SIGALRM: terminate, even inside C code
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(1)


def _fault(phase: str) -> None:
    """Test-only fault injection (see :data:`FAULT_ENV`)."""
    spec = os.environ.get(FAULT_ENV, "")
    if ":" not in spec or spec.split(":", 1)[0] != phase:
        return
    action = spec.split(":", 1)[1]
    if action == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif action == "hang":
        time.sleep(3600)
    elif action == "alloc":
        bytearray(1 << 40)


def _run(request: dict[str, Any], say: Any) -> dict[str, Any]:
    # Imported here, after the memory cap, so a runtime's import is inside the budget too.
    from edge_runtime.bundle.manifest_parse import parse_manifest
    from edge_runtime.runtime.gates import check_gates, sample_feeds
    from edge_runtime.runtime.loaded_model import LoadedModel

    directory = Path(request["directory"])
    data = (directory / "manifest.json").read_bytes()
    if hashlib.sha256(data).hexdigest() != request["manifest_sha256"]:
        raise errors.IntegrityError(f"{directory / 'manifest.json'}: differs from the verified manifest")
    manifest = parse_manifest(data)
    o = request["options"]
    options = BackendOptions(providers=tuple(o["providers"]), threads=o["threads"], spin_wait=o["spin_wait"],
                             cache_dir=None if o["cache_dir"] is None else Path(o["cache_dir"]), extra=o["extra"])
    limits = Limits(**request["limits"])
    say({"phase": "loading"})
    _fault("loading")
    model = LoadedModel(manifest, directory, options=options, limits=limits)
    try:
        say({"phase": "warming up"})
        _fault("warming up")
        model.infer(sample_feeds(model))  # first-run compilation, as the daemon's warm-up does
        say({"phase": "gating"})
        _fault("gating")
        report = check_gates(model)
    finally:
        model.close()
    return {"ok": True, "report": dataclasses.asdict(report), "usage_mb": _memory_use()}


def _memory_use() -> dict[str, int]:
    """Peak resident and current data-segment size in MB (Linux /proc; empty elsewhere)."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmData", "VmPeak"):
                out[key] = int(value.split()[0]) >> 10
    return out


def main() -> int:
    """The child: read the request on stdin, report phases and the outcome as JSON lines on stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever a runtime prints goes to stderr, never into the protocol

    def say(msg: dict[str, Any]) -> None:
        proto.write(json.dumps(msg) + "\n")

    try:
        request = json.loads(sys.stdin.buffer.read(_MAX_PROTOCOL_BYTES))
        _die_with_parent(int(request["parent"]), float(request["timeout_seconds"]))
        _limit_memory(int(request["memory_mb"]))
        say(_run(request, say))
    except MemoryError as e:
        traceback.print_exc()  # to stderr: kept for whoever debugs the child, never in the protocol
        say({"ok": False, "memory": True, "type": "GateError", "error": f"MemoryError {e}".strip()})
    except EdgeRuntimeError as e:
        memory = any(m in str(e).lower() for m in _MEMORY_MARKERS)
        say({"ok": False, "memory": memory, "type": type(e).__name__, "error": e.one_line()})
    except Exception as e:  # anything else is reported, one line, to the parent
        memory = any(m in str(e).lower() for m in _MEMORY_MARKERS)
        say({"ok": False, "memory": memory, "type": "GateError",
             "error": " ".join(f"{type(e).__name__}: {e}".split())[:1000]})
    proto.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

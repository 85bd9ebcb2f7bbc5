"""TFLite backend: LiteRT (ai-edge-litert) first, legacy tflite-runtime second.

The interpreter is created and its tensors allocated at load time, so an
unresolvable operator (a custom op the runtime lacks) is a ModelLoadError
when the model is loaded, never a surprise on the first request. The
interpreter is not thread-safe: ``infer`` holds a lock around set/invoke/get.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_runtime.errors import BackendUnavailableError, InferenceError, InputError, ModelLoadError
from edge_runtime.runtime.backends.base import Backend, BackendOptions, TensorInfo

__all__ = ["INSTALL_HINT", "TFLiteBackend", "load_interpreter_class"]

INSTALL_HINT = "pip install ai-edge-litert, or tflite-runtime with numpy<2"

# (import path, distribution name for messages), most capable first.
_RUNTIMES = (
    ("ai_edge_litert", "ai-edge-litert"),
    ("tflite_runtime", "tflite-runtime"),
)
# What an extension built against numpy 1.x says when numpy 2 is installed.
_NUMPY_ABI_MARKERS = ("_ARRAY_API", "numpy.core.multiarray failed to import", "compiled using NumPy 1.x")


def _numpy_abi_error(e: BaseException) -> bool:
    seen: BaseException | None = e
    for _ in range(5):  # the marker may sit in a chained cause
        if seen is None:
            return False
        if any(m in str(seen) for m in _NUMPY_ABI_MARKERS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _numpy_message(runtime: str) -> str:
    return (
        f"{runtime} needs numpy<2 (numpy {np.__version__} installed): "
        "pip install 'numpy<2', or use ai-edge-litert"
    )


def load_interpreter_class() -> tuple[Any, str]:
    """Import a TFLite Interpreter class: LiteRT first, then tflite-runtime.

    Returns the class and the runtime's name and version, e.g. "ai-edge-litert 2.3.0".

    Raises:
        BackendUnavailableError: neither runtime can be imported, or the one
            found was built for numpy 1.x while numpy 2 is installed.
    """
    failures: list[str] = []
    abi_error: tuple[str, BaseException] | None = None
    for module_name, dist in _RUNTIMES:
        try:
            module = importlib.import_module(f"{module_name}.interpreter")
            interpreter = module.Interpreter
        except Exception as e:  # a broken install must not take the daemon down
            if _numpy_abi_error(e) and abi_error is None:
                abi_error = (dist, e)
            failures.append(f"{dist}: {' '.join(str(e).split()) or type(e).__name__}")
            continue
        top = importlib.import_module(module_name)
        return interpreter, f"{dist} {getattr(top, '__version__', '(unknown version)')}"
    if abi_error is not None:
        raise BackendUnavailableError(_numpy_message(abi_error[0])) from abi_error[1]
    raise BackendUnavailableError(f"no TFLite runtime: {INSTALL_HINT} ({'; '.join(failures)})")


def _load_message(model: str, e: BaseException) -> str:
    first = str(e).strip().splitlines()[0].strip().rstrip(".") if str(e).strip() else type(e).__name__
    if "unresolved custom op" in first or "Didn't find op for builtin opcode" in first:
        return f"{model}: unsupported operator: {first}"
    return f"{model}: cannot load TFLite model: {first}"


def _tensor_info(detail: Mapping[str, Any]) -> TensorInfo:
    # shape_signature keeps -1 for dynamic dims; shape is what is allocated now.
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) == len(detail["shape"]) else detail["shape"]
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return TensorInfo(
        name=str(detail["name"]),
        shape=tuple(None if int(d) < 0 else int(d) for d in dims),
        dtype=np.dtype(detail["dtype"]).name,
        quantization=(float(scale), int(zero_point)) if scale != 0 else None,
    )


class TFLiteBackend(Backend):
    """A model loaded in a LiteRT / tflite-runtime Interpreter (calls serialised)."""

    format = "tflite"

    def __init__(self, model_path: Path, options: BackendOptions) -> None:
        """Create the interpreter, allocate tensors and introspect inputs/outputs.

        Raises:
            BackendUnavailableError: no usable TFLite runtime is installed.
            ModelLoadError: the file is missing, empty, corrupt or uses an
                operator the runtime cannot resolve (named in the message).
        """
        model_path = Path(model_path)
        interpreter_class, runtime = load_interpreter_class()
        self._check_model_file(model_path)
        self._path = model_path
        try:
            interpreter = interpreter_class(
                model_path=str(model_path), num_threads=options.threads if options.threads > 0 else None
            )
            interpreter.allocate_tensors()
            input_details = interpreter.get_input_details()
            output_details = interpreter.get_output_details()
        except Exception as e:  # every runtime error is converted here
            if _numpy_abi_error(e):
                raise BackendUnavailableError(_numpy_message(runtime.split()[0])) from e
            raise ModelLoadError(_load_message(model_path.name, e)) from e
        self._interpreter: Any = interpreter
        self.inputs = tuple(_tensor_info(d) for d in input_details)
        self.outputs = tuple(_tensor_info(d) for d in output_details)
        self.description = f"{runtime} CPU"
        self._lock = threading.Lock()
        self._in = tuple((str(d["name"]), int(d["index"])) for d in input_details)
        self._out = tuple((str(d["name"]), int(d["index"])) for d in output_details)
        # Only models with a dynamic input ever need resize_tensor_input.
        self._dynamic = any(None in t.shape for t in self.inputs)
        self._allocated: dict[str, tuple[int, ...]] = {
            str(d["name"]): tuple(int(x) for x in d["shape"]) for d in input_details
        }

    @property
    def interpreter(self) -> Any:
        """The underlying interpreter (diagnostics, benchmarks); not thread-safe on its own."""
        return self._interpreter

    def _run(self, feeds: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        """Set, invoke and get under the lock (the interpreter is not thread-safe).

        Raises:
            InputError: the model cannot be resized to a dynamic feed's shape.
            InferenceError: the interpreter failed, or the backend is closed.
        """
        with self._lock:
            interpreter = self._interpreter
            if interpreter is None:
                raise InferenceError(f"{self._path.name}: backend is closed")
            if self._dynamic:
                self._resize(interpreter, feeds)
            try:
                for name, index in self._in:
                    interpreter.set_tensor(index, feeds[name])
                interpreter.invoke()
                # get_tensor returns a copy: results stay valid after the next invoke.
                return {name: interpreter.get_tensor(index) for name, index in self._out}
            except Exception as e:  # every runtime error is converted here
                msg = " ".join(str(e).split()) or type(e).__name__
                raise InferenceError(f"{self._path.name}: {msg}") from e

    def close(self) -> None:
        """Drop the interpreter; later ``infer`` calls raise InferenceError."""
        with self._lock:
            self._interpreter = None

    def _resize(self, interpreter: Any, feeds: Mapping[str, NDArray[Any]]) -> None:
        changed = False
        try:
            for name, index in self._in:
                shape = feeds[name].shape
                if shape != self._allocated[name]:
                    # Forget the old shape first: if this fails, the next call resizes again.
                    self._allocated[name] = ()
                    interpreter.resize_tensor_input(index, list(shape), strict=True)
                    self._allocated[name] = shape
                    changed = True
            if changed:
                interpreter.allocate_tensors()
        except Exception as e:  # every runtime error is converted here
            for name, _ in self._in:
                self._allocated[name] = ()
            shapes = ", ".join(f"{n}={tuple(feeds[n].shape)}" for n, _ in self._in)
            msg = " ".join(str(e).split()) or type(e).__name__
            raise InputError(f"{self._path.name}: model cannot run with input shapes {shapes}: {msg}") from e

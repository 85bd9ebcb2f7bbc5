"""What the model fuzzers share: seeded mutants of the real models, real inputs, signed bundles.

Imported by scripts run as ``python tools/<script>.py`` (tools/ is then on sys.path):
``fuzz_models.py`` (CLI installs), ``fuzz_serve.py`` (a daemon taking mutants over OTA)
and ``find_crash_mutant.py`` (a mutant that crashes the bare runtime).

A mutant is named by ``(model, seed, index)`` alone: the same triple gives the
same bytes on every machine and whatever ``--count`` or ``--jobs`` a run uses,
so a finding is reproduced by its name. Kinds: ``flip`` (XOR 8-16 bytes at
random offsets), ``overwrite`` (8-16 random bytes at random offsets),
``truncate``, ``duplicate`` (a region copied in again elsewhere) and ``huge32``
(one aligned 32-bit field set to a huge value, as a length or offset would be).

Inputs are real: variants (crops, flips, rotations, contrast) of the one real
photo the model cache holds (matplotlib's grace_hopper.jpg), turned into each
model's input tensor by hand. The wake-word model takes 40-band audio features;
no real audio ships in a wheel, so its frames are rows of the photo scaled to
the features' range (real image statistics, not noise). Golden cases are
computed by the bare runtime on the *original* model, as a publisher would.
"""

from __future__ import annotations

import hashlib
import random
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import cv2
import numpy as np
from numpy.typing import NDArray

from edge_runtime.bundle import writer as bundle_writer
from edge_runtime.bundle.manifest import Gates, TensorSpec
from edge_runtime.bundle.onnx_external import check_no_external_data
from edge_runtime.bundle.signing import load_private_key
from edge_runtime.bundle.writer import BundleSpec, GoldenSource, pack_bundle
from edge_runtime.devtools.model_zoo import fetch
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.runtime.backends import create_backend
from edge_runtime.runtime.backends.base import BackendOptions

__all__ = ["KINDS", "PROFILES", "Mutant", "Profile", "bare_outputs", "limited", "make_mutant", "pack",
           "publisher_check", "real_inputs"]

KINDS = ("flip", "overwrite", "truncate", "duplicate", "huge32")
Array = NDArray[Any]


@dataclass(frozen=True)
class Mutant:
    """One mutant model: its name, what was changed (human-readable) and its bytes."""

    model: str
    seed: int
    index: int
    kind: str
    edits: str
    data: bytes

    @property
    def label(self) -> str:
        return f"{self.model}:{self.seed}:{self.index}"


def make_mutant(model: str, original: bytes, seed: int, index: int, kind: str | None = None) -> Mutant:
    """Mutant ``index`` of ``model`` under ``seed``; its kind cycles through KINDS unless given."""
    rng = random.Random(hashlib.sha256(f"{model}:{seed}:{index}".encode()).digest())
    kind = kind or KINDS[index % len(KINDS)]
    data = bytearray(original)
    size = len(data)
    if kind in ("flip", "overwrite"):
        offsets = sorted(rng.sample(range(size), rng.randint(8, 16)))
        for off in offsets:
            data[off] = data[off] ^ rng.randint(1, 255) if kind == "flip" else rng.randint(0, 255)
        edits = f"{kind} at {','.join(map(str, offsets))}"
    elif kind == "truncate":
        cut = rng.randrange(1, size)
        del data[cut:]
        edits = f"truncate to {cut} of {size} bytes"
    elif kind == "duplicate":
        length = rng.randint(4, max(4, min(4096, size // 8)))
        start, at = rng.randrange(0, size - length), rng.randrange(0, size)
        data[at:at] = data[start:start + length]
        edits = f"duplicate {length} bytes from {start} at {at}"
    elif kind == "huge32":
        at = rng.randrange(0, size - 4) & ~3
        value = rng.choice((0x7FFFFFFF, 0xFFFFFFFF, 0x40000000, 0x7FFFFFF0))
        data[at:at + 4] = value.to_bytes(4, "little")
        edits = f"huge32 {value:#x} at {at}"
    else:
        raise ValueError(f"unknown mutation kind {kind!r} (known: {', '.join(KINDS)})")
    return Mutant(model, seed, index, kind, edits, bytes(data))


# ---------------------------------------------------------------------------- real inputs


def _photo_variants(photo: Path, count: int, offset: int) -> list[Array]:
    """``count`` distinct BGR variants of the photo, numbered from ``offset`` (so golden and
    held-out sets never share one)."""
    bgr = cv2.imread(str(photo))
    if bgr is None:
        raise SystemExit(f"cannot read {photo}")
    h, w = bgr.shape[:2]
    out = []
    for i in range(offset, offset + count):
        rng = np.random.default_rng(1000 + i)
        if i == 0:
            img = bgr
        else:
            side = int(min(h, w) * rng.uniform(0.35, 1.0))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            img = bgr[y:y + side, x:x + side]
            if i % 2:
                img = img[:, ::-1]
            img = np.rot90(img, int(i // 2) % 4)
            img = np.clip(img.astype(np.float32) * rng.uniform(0.6, 1.4) + rng.uniform(-40, 40), 0, 255)
        out.append(np.ascontiguousarray(img).astype(np.uint8))
    return out


def _face_tensor(bgr: Array) -> Array:
    rgb = cv2.cvtColor(cv2.resize(bgr, (128, 128), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
    return ((rgb.astype(np.float32) - 127.5) / 127.5)[None]


def _ppocr_tensor(bgr: Array) -> Array:
    x = (cv2.resize(bgr, (192, 48)).astype(np.float32) / 255 - 0.5) / 0.5
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def _wakeword_tensor(bgr: Array) -> Array:
    # 3 frames x 40 features in [0, 26] (the model's input range), quantized with the
    # model's own input parameters (scale 0.10196, zero point -128).
    grey = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), (40, 3), interpolation=cv2.INTER_AREA)
    features = grey.astype(np.float32) / 255 * 26
    quantized: Array = np.clip(np.rint(features / np.float32(0.10196078568696976)) - 128, -128, 127)
    return quantized.astype(np.int8)[None]


@dataclass(frozen=True)
class Profile:
    """A real model the fuzzers mutate: its zoo key, format and input tensor maker."""

    key: str
    format: str
    tensor: Callable[[Array], Array]
    layout: str = ""

    @property
    def suffix(self) -> str:
        return f".{self.format}"

    def path(self) -> Path:
        return fetch(self.key)


PROFILES: dict[str, Profile] = {p.key: p for p in (
    Profile("face_detection", "tflite", _face_tensor, "NHWC"),
    Profile("ppocr_cls", "onnx", _ppocr_tensor, "NCHW"),
    Profile("okay_nabu", "tflite", _wakeword_tensor),
)}


def real_inputs(profile: Profile, count: int, offset: int = 0) -> list[Array]:
    """``count`` real input tensors for ``profile`` (variants ``offset`` on of the photo)."""
    return [profile.tensor(img) for img in _photo_variants(fetch("grace_hopper"), count, offset)]


# ---------------------------------------------------------------------------- runtimes and bundles


def bare_outputs(fmt: str, model: Path, inputs: Sequence[Array]) -> list[dict[str, Array]]:
    """Outputs of the bare runtime (no edge_runtime code) on ``inputs``, run in order on one
    fresh interpreter/session (the wake-word model is stateful, and so is this order)."""
    results = []
    if fmt == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_path=str(model))
        interp.allocate_tensors()
        index = interp.get_input_details()[0]["index"]
        for x in inputs:
            interp.set_tensor(index, x)
            interp.invoke()
            results.append({d["name"]: interp.get_tensor(d["index"]).copy() for d in interp.get_output_details()})
        return results
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    for x in inputs:
        results.append(dict(zip(names, session.run(None, {name: x}), strict=True)))
    return results


def io_specs(profile: Profile, model: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The manifest inputs/outputs of the original model, as ``bundle pack`` introspects them."""
    backend = create_backend(profile.format, model, BackendOptions())
    try:
        ins = tuple(TensorSpec(t.name, t.shape, t.dtype, profile.layout if len(t.shape) == 4 else "")
                    for t in backend.inputs)
        return ins, tuple(TensorSpec(t.name, t.shape, t.dtype) for t in backend.outputs)
    finally:
        backend.close()


@dataclass(frozen=True)
class Publisher:
    """What every bundle of one model shares: signing key, I/O specs, golden files on disk."""

    profile: Profile
    key: Path
    io: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]
    golden: tuple[GoldenSource, ...]
    gates: Gates


def make_publisher(profile: Profile, key: Path, work: Path, golden: int, gates: Gates) -> Publisher:
    """Golden cases from the original model on real inputs, written under ``work``."""
    original = profile.path()
    inputs = real_inputs(profile, golden)
    sources = []
    for i, (x, outs) in enumerate(zip(inputs, bare_outputs(profile.format, original, inputs), strict=True)):
        inp, exp = work / f"{profile.key}-golden{i}.npy", work / f"{profile.key}-golden{i}.npz"
        np.save(inp, x)
        np.savez(exp, **outs)  # type: ignore[arg-type]
        sources.append(GoldenSource(inp, exp))
    return Publisher(profile, key, io_specs(profile, original), tuple(sources), gates)


def publisher_check(publisher: Publisher, model: Path) -> str:
    """What ``bundle pack``'s own model check says of ``model`` ('' when it passes)."""
    if publisher.profile.format != "onnx":
        return ""
    try:
        check_no_external_data(model, name=model.name)
    except EdgeRuntimeError as e:
        return e.one_line()
    return ""


_PACK_LOCK = threading.Lock()


def pack(publisher: Publisher, model: Path, version: int, out: Path) -> Path:
    """A validly signed bundle of ``model`` (original or mutant) with the original's golden cases.

    The packer refuses an ONNX file it cannot parse; an attacker holding a key is not bound
    by our packer, so that one check is skipped here (:func:`publisher_check` says what it
    would have said) and the device sees every mutant. Everything else is ``pack_bundle``'s.
    """
    p = publisher.profile
    spec = BundleSpec(name=model_name(p), version=version, format=p.format, model=model,
                      inputs=publisher.io[0], outputs=publisher.io[1], golden=publisher.golden,
                      gates=publisher.gates)
    with _PACK_LOCK, mock.patch.object(bundle_writer, "check_no_external_data", lambda *a, **k: None):
        pack_bundle(out, spec, [load_private_key(publisher.key)])
    return out


def model_name(profile: Profile) -> str:
    """The bundle name of a fuzzed model (zoo keys use '_', bundle names may not)."""
    return "fuzz-" + profile.key.replace("_", "-")


def limited(argv: list[str], mem_limit_mb: int, limit: str = "RLIMIT_AS", *,
            die_with_parent: bool = False) -> list[str]:
    """``argv`` run under the resource ``limit`` of ``mem_limit_mb`` (0: none), set in a tiny exec
    wrapper (preexec_fn is unsafe in a threaded parent). RLIMIT_DATA is what the gate child caps.
    ``die_with_parent`` adds PR_SET_PDEATHSIG (Linux): a daemon never outlives a killed harness."""
    steps = []
    if mem_limit_mb > 0:
        cap = mem_limit_mb << 20
        steps.append(f"import resource; resource.setrlimit(resource.{limit}, ({cap}, {cap}))")
    if die_with_parent:
        steps.append("import ctypes, signal; ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)")
    if not steps:
        return argv
    wrapper = "; ".join([*steps, "import os, sys; os.execv(sys.argv[1], sys.argv[1:])"])
    return [sys.executable, "-c", wrapper, *argv]


def crash_child_source() -> str:
    """Python source of a child that loads argv[1] (format argv[2]) in the bare runtime and
    runs argv[3] (.npy) through it: a crash shows as a negative exit status."""
    return (
        "import sys, numpy as np\n"
        "path, fmt, x = sys.argv[1], sys.argv[2], np.load(sys.argv[3])\n"
        "if fmt == 'tflite':\n"
        "    from ai_edge_litert.interpreter import Interpreter\n"
        "    i = Interpreter(model_path=path); i.allocate_tensors()\n"
        "    i.set_tensor(i.get_input_details()[0]['index'], x); i.invoke()\n"
        "else:\n"
        "    import onnxruntime as ort\n"
        "    s = ort.InferenceSession(path, providers=['CPUExecutionProvider'])\n"
        "    s.run(None, {s.get_inputs()[0].name: x})\n"
    )


if __name__ == "__main__":  # pragma: no cover - a module, not a script
    sys.exit("import this module from tools/fuzz_models.py, fuzz_serve.py or find_crash_mutant.py")

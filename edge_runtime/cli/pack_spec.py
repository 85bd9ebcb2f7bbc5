"""The pack spec (``bundle pack --spec SPEC.toml``): what a manifest says beyond the model file.

Read by ``bundle pack`` and by the golden tools (``bundle golden``, ``--golden-dir``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime.bundle.manifest import Gates, Postprocess, Preprocess, Requires, TensorSpec
from edge_runtime.bundle.reference_stats import Baseline
from edge_runtime.bundle.writer import DEFAULT_GOLDEN_CASES
from edge_runtime.config.typed_toml import build, in_range, load_toml

__all__ = ["SpecFile", "load_spec"]


@dataclass(frozen=True)
class SpecFile:
    """``--spec SPEC.toml``: what the manifest says beyond the model file itself.

    ``labels`` and ``reference`` are local paths (relative to the spec file);
    ``reference`` is a ready ``reference.json`` (``bundle pack --reference DIR`` measures one instead);
    ``inputs``/``outputs`` default to what the runtime reports for the model;
    shapes use -1 for dynamic dims.
    """

    format: str = ""
    labels: Path | None = None
    reference: Path | None = None
    expires: str = ""
    golden_rtol: float = 1e-3
    golden_atol: float = 1e-4
    golden_dir: Path | None = None
    golden_cases: int = field(default=DEFAULT_GOLDEN_CASES, metadata={"check": in_range(1, 1000)})
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    preprocess: Preprocess | None = None
    postprocess: Postprocess = field(default_factory=Postprocess)
    gates: Gates = field(default_factory=Gates)
    requires: Requires = field(default_factory=Requires)
    baseline: Baseline = field(default_factory=Baseline)
    """``[baseline]`` accuracy / precision / recall measured by the publisher (stored in the reference)."""


def load_spec(path: Path | None) -> SpecFile:
    """Parse a pack spec; unknown keys and bad values are refused naming the key.

    Raises:
        ConfigError: unreadable, not TOML, or a bad key.
    """
    if path is None:
        return SpecFile()
    spec = build(SpecFile, load_toml(path), base=path.parent.resolve())

    def dynamic(specs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
        return tuple(dataclasses.replace(s, shape=tuple(None if d == -1 else d for d in s.shape)) for s in specs)

    return dataclasses.replace(spec, inputs=dynamic(spec.inputs), outputs=dynamic(spec.outputs))

"""Daemon and CLI configuration: TOML parsed into frozen dataclasses.

Every key is optional except where noted; the defaults are what a systemd
install uses. Unknown keys and bad values are refused with the key named.
Example (all sections shown with their defaults)::

    state_dir = "/var/lib/edge-runtime"
    trust_dir = "/etc/edge-runtime/trusted-keys"
    keep_versions = 3
    hardware_tags = []          # extra tags for bundle `requires.hardware`

    [limits]
    max_bundle_bytes = 1073741824
    max_manifest_bytes = 1048576
    max_signature_bytes = 65536
    max_image_bytes = 33554432
    max_image_pixels = 50000000

    [trust]
    threshold = 1               # k of n signatures from trusted keys

    [backend]
    providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    threads = 0                 # intra-op threads; 0 = runtime default
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .typed_toml import build, load_toml

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "BackendConfig",
    "Config",
    "Limits",
    "TrustConfig",
    "load_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/edge-runtime/config.toml")
DEFAULT_STATE_DIR = Path("/var/lib/edge-runtime")
DEFAULT_TRUST_DIR = Path("/etc/edge-runtime/trusted-keys")
KNOWN_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "OpenVINOExecutionProvider",
    "CoreMLExecutionProvider",
    "XnnpackExecutionProvider",
    "ACLExecutionProvider",
    "ArmNNExecutionProvider",
    "CPUExecutionProvider",
)


def in_range(lo: float, hi: float) -> Callable[[Any], str]:
    """Validator: the number lies in [lo, hi]."""
    return lambda v: "" if lo <= v <= hi else f"must be between {lo:g} and {hi:g}, got {v!r}"


def _known_providers(values: tuple[str, ...]) -> str:
    unknown = [v for v in values if v not in KNOWN_PROVIDERS]
    if unknown:
        return f"unknown execution provider {unknown[0]!r} (known: {', '.join(KNOWN_PROVIDERS)})"
    return "" if values else "must name at least one execution provider"


@dataclass(frozen=True)
class Limits:
    """Size caps; every download, upload and payload is bounded by one."""

    max_bundle_bytes: int = field(default=1 << 30, metadata={"check": in_range(1024, 1 << 40)})
    max_manifest_bytes: int = field(default=1 << 20, metadata={"check": in_range(256, 64 << 20)})
    max_signature_bytes: int = field(default=64 << 10, metadata={"check": in_range(128, 1 << 20)})
    max_image_bytes: int = field(default=32 << 20, metadata={"check": in_range(1024, 1 << 32)})
    max_image_pixels: int = field(default=50_000_000, metadata={"check": in_range(1, 1 << 32)})


@dataclass(frozen=True)
class TrustConfig:
    """Signature policy for bundles: ``threshold`` distinct trusted keys must sign."""

    threshold: int = field(default=1, metadata={"check": in_range(1, 32)})


@dataclass(frozen=True)
class BackendConfig:
    """Runtime options: ONNX execution-provider preference and thread count."""

    providers: tuple[str, ...] = field(
        default=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
        metadata={"check": _known_providers},
    )
    threads: int = field(default=0, metadata={"check": in_range(0, 256)})


@dataclass(frozen=True)
class Config:
    """The whole configuration. Build it with :func:`load_config`."""

    state_dir: Path = DEFAULT_STATE_DIR
    trust_dir: Path = DEFAULT_TRUST_DIR
    keep_versions: int = field(default=3, metadata={"check": in_range(2, 1000)})
    hardware_tags: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    trust: TrustConfig = field(default_factory=TrustConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied (CLI overrides)."""
        return dataclasses.replace(self, **changes)


def load_config(path: Path | None, *, required: bool = False) -> Config:
    """Load ``path`` (relative paths inside resolve against its directory).

    With ``path`` None, the default path is used when it exists, else defaults.

    Raises:
        ConfigError: the file is missing (when given or ``required``),
            unreadable, not TOML, or has an unknown key or a bad value.
    """
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists() and not required:
            return Config()
        path = DEFAULT_CONFIG_PATH
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    table = load_toml(path)
    try:
        return build(Config, table, base=path.parent.resolve())
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e

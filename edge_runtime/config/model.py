"""Daemon and CLI configuration: TOML parsed into frozen dataclasses.

Every key is optional except where noted; the defaults are what a systemd
install uses. Unknown keys and bad values are refused with the key named.
The README's configuration section lists every key with its default and
what it does; tests/test_readme.py checks that list against these
dataclasses, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.config.checks import listen as _listen
from edge_runtime.config.checks import url as _url
from edge_runtime.config.liveness import LivenessConfig
from edge_runtime.config.monitoring import MonitoringConfig
from edge_runtime.config.typed_toml import build, in_range, load_toml
from edge_runtime.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ActivationConfig",
    "ApiConfig",
    "BackendConfig",
    "Config",
    "GatesConfig",
    "Limits",
    "LivenessConfig",
    "MonitoringConfig",
    "MqttConfig",
    "OtaConfig",
    "PipelineConfig",
    "SourceConfig",
    "TrustConfig",
    "in_range",
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
    # All image decodes in flight at once, together (edge_runtime/runtime/decode_budget.py): an eighth of a 1 GB
    # device, so a 12 MP photo (72 MB at 6 bytes a pixel, see preprocess.decode_cost) still decodes.
    max_decode_bytes: int = field(default=128 << 20, metadata={"check": in_range(1 << 20, 1 << 40)})


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
    # Off by default: the daemon runs beside the device's own application, and
    # measured here spinning pools made a hot swap stall requests 3-4x steady p99.
    spin_wait: bool = False


def _one_of(*choices: str) -> Callable[[Any], str]:
    return lambda v: "" if v in choices else f"must be one of {', '.join(repr(c) for c in choices)}, got {v!r}"


@dataclass(frozen=True)
class ApiConfig:
    """The local inference API (Open Inference Protocol v2 paths + /metrics)."""

    enabled: bool = True
    listen: str = field(default="127.0.0.1:8321", metadata={"check": _listen})
    max_request_bytes: int = field(default=16 << 20, metadata={"check": in_range(1024, 1 << 31)})
    max_concurrency: int = field(default=8, metadata={"check": in_range(1, 256)})
    max_connections: int = field(default=1024, metadata={"check": in_range(16, 65536)})


@dataclass(frozen=True)
class ActivationConfig:
    """Probation after a swap, and the crash-loop guard."""

    probation_inferences: int = field(default=50, metadata={"check": in_range(0, 10**9)})
    probation_seconds: float = field(default=60.0, metadata={"check": in_range(0, 86400 * 30)})
    max_error_rate: float = field(default=0.05, metadata={"check": in_range(0, 1)})
    max_p95_ratio: float = field(default=2.0, metadata={"check": in_range(1, 1000)})
    p95_slack_ms: float = field(default=2.0, metadata={"check": in_range(0, 1e6)})
    max_boot_attempts: int = field(default=3, metadata={"check": in_range(1, 100)})
    drain_timeout_seconds: float = field(default=30.0, metadata={"check": in_range(0.1, 3600)})


@dataclass(frozen=True)
class GatesConfig:
    """The budget of the child process that loads and gates an untrusted candidate model."""

    child_memory_mb: int = field(default=512, metadata={"check": in_range(64, 1 << 20)})
    child_timeout_seconds: float = field(default=60.0, metadata={"check": in_range(1, 3600)})


def _repository(value: Any) -> str:
    """A TUF repository: an http(s) URL, or an absolute path to a copied one (air-gapped, USB)."""
    if not value or (isinstance(value, str) and value.startswith("/")):
        return ""
    return _url("https", "http")(value).replace("a URL with scheme", "an absolute path or a URL with scheme")


@dataclass(frozen=True)
class OtaConfig:
    """Pulling signed bundles: from a TUF repository (``repository_url``), or a signed channel document."""

    repository_url: str = field(default="", metadata={"check": _repository})
    models: tuple[str, ...] = ()
    channel_url: str = field(default="", metadata={"check": _url("https", "http")})
    poll_seconds: float = field(default=600.0, metadata={"check": in_range(0.1, 86400 * 7)})
    ca_file: Path | None = None
    allow_http: bool = False
    connect_timeout_seconds: float = field(default=10.0, metadata={"check": in_range(0.1, 600)})
    read_timeout_seconds: float = field(default=30.0, metadata={"check": in_range(0.1, 3600)})
    deadline_seconds: float = field(default=1800.0, metadata={"check": in_range(1, 86400)})
    retries: int = field(default=5, metadata={"check": in_range(0, 100)})
    backoff_max_seconds: float = field(default=300.0, metadata={"check": in_range(0, 86400)})
    max_channel_bytes: int = field(default=64 << 10, metadata={"check": in_range(256, 16 << 20)})


@dataclass(frozen=True)
class SourceConfig:
    """Where a pipeline's inputs come from."""

    type: str = field(default="none",
                      metadata={"check": _one_of("folder", "video", "camera", "rtsp", "mqtt", "none")})
    path: Path | None = None
    camera: int = field(default=0, metadata={"check": in_range(0, 63)})
    url: str = field(default="", metadata={"check": _url("rtsp", "rtsps", "http", "https")})
    topic: str = field(default="", metadata={"check": lambda v: _topic(v, wildcards=False)})
    fps: float = field(default=0.0, metadata={"check": in_range(0, 1000)})
    poll_seconds: float = field(default=0.5, metadata={"check": in_range(0.01, 3600)})
    loop: bool = False
    queue: int = field(default=1, metadata={"check": in_range(1, 1000)})
    reconnect_max_seconds: float = field(default=30.0, metadata={"check": in_range(0.1, 3600)})


def _topic(value: str, *, wildcards: bool) -> str:
    if any(c in value for c in "\0") or (not wildcards and any(c in value for c in "+#")):
        return "must be an MQTT topic without wildcards or NUL"
    return ""


_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _ident(value: str) -> str:
    return "" if not value or _ID_RE.fullmatch(value) else f"must match {_ID_RE.pattern} (it is used in topics)"


def _idents(values: tuple[str, ...]) -> str:
    return next((f"{v!r} " + _ident(v) for v in values if _ident(v)), "")


@dataclass(frozen=True)
class MqttConfig:
    """The MQTT link: telemetry, events, status, fleet commands, offline spool."""

    enabled: bool = False
    host: str = "localhost"
    port: int = field(default=1883, metadata={"check": in_range(1, 65535)})
    protocol: str = field(default="5", metadata={"check": _one_of("5", "3.1.1")})
    client_id: str = field(default="", metadata={"check": _ident})
    prefix: str = field(default="edge", metadata={"check": _ident})
    groups: tuple[str, ...] = field(default=(), metadata={"check": _idents})
    username: str = ""
    password_file: Path | None = None
    password_credential: str = "mqtt-password"  # noqa: S105 - a credential *name*, not a secret
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_seconds: int = field(default=30, metadata={"check": in_range(5, 3600)})
    reconnect_min_seconds: float = field(default=1.0, metadata={"check": in_range(0.01, 3600)})
    reconnect_max_seconds: float = field(default=60.0, metadata={"check": in_range(0.01, 86400)})
    telemetry_seconds: float = field(default=10.0, metadata={"check": in_range(0.001, 86400)})
    spool_max_messages: int = field(default=100_000, metadata={"check": in_range(10, 10**8)})
    spool_max_bytes: int = field(default=64 << 20, metadata={"check": in_range(1 << 16, 1 << 36)})
    flush_rate: float = field(default=3000.0, metadata={"check": in_range(1, 10**6)})
    max_inflight: int = field(default=50, metadata={"check": in_range(1, 65535)})
    max_command_bytes: int = field(default=64 << 10, metadata={"check": in_range(256, 16 << 20)})
    max_json_depth: int = field(default=32, metadata={"check": in_range(2, 1000)})
    command_id_window_seconds: float = field(default=86400.0, metadata={"check": in_range(1, 86400 * 365)})
    session_expiry_seconds: float = field(default=3600.0, metadata={"check": in_range(0, 86400 * 365)})
    signed_commands: bool = False
    operator_keys_dir: Path | None = None
    command_max_age_seconds: float = field(default=300.0, metadata={"check": in_range(1, 86400)})
    unsigned_command_max_age_seconds: float = field(default=300.0, metadata={"check": in_range(1, 86400 * 365)})
    command_rate: float = field(default=20.0, metadata={"check": in_range(0.1, 10000)})
    command_burst: int = field(default=40, metadata={"check": in_range(1, 100000)})
    results: bool = False
    results_max_per_second: float = field(default=5.0, metadata={"check": in_range(0.01, 10000)})
    max_input_bytes: int = field(default=8 << 20, metadata={"check": in_range(1024, 1 << 28)})


@dataclass(frozen=True)
class PipelineConfig:
    """One model fed by one source; results go to the log (and MQTT when configured)."""

    model: str
    name: str = ""
    results: str = field(default="log", metadata={"check": _one_of("log", "none")})
    source: SourceConfig = field(default_factory=SourceConfig)

    @property
    def label(self) -> str:
        """The pipeline's name: ``name`` or the model name."""
        return self.name or self.model


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
    device_id: str = field(default="", metadata={"check": _ident})
    api: ApiConfig = field(default_factory=ApiConfig)
    activation: ActivationConfig = field(default_factory=ActivationConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)
    ota: OtaConfig = field(default_factory=OtaConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    pipelines: tuple[PipelineConfig, ...] = ()

    def __post_init__(self) -> None:
        labels = [p.label for p in self.pipelines]
        if len(set(labels)) != len(labels):
            raise ConfigError("pipelines: two pipelines share a name; set pipelines[].name")
        for i, p in enumerate(self.pipelines):
            src = p.source
            if src.type in ("folder", "video") and src.path is None:
                raise ConfigError(f"is required for type {src.type!r}", key=f"pipelines[{i}].source.path")
            if src.type == "rtsp" and not src.url:
                raise ConfigError("is required for type 'rtsp'", key=f"pipelines[{i}].source.url")
            if src.type == "mqtt" and not self.mqtt.enabled:
                raise ConfigError("is 'mqtt' but mqtt.enabled is false", key=f"pipelines[{i}].source.type")
        if self.mqtt.signed_commands and self.mqtt.operator_keys_dir is None:
            raise ConfigError("is required when mqtt.signed_commands is true", key="mqtt.operator_keys_dir")
        if not self.mqtt.tls and any(f is not None for f in (self.mqtt.ca_file, self.mqtt.cert_file,
                                                               self.mqtt.key_file)):
            raise ConfigError("config keys 'mqtt.ca_file'/'cert_file'/'key_file' need mqtt.tls = true")
        if self.mqtt.session_expiry_seconds > self.mqtt.command_id_window_seconds:
            # A command the broker redelivers after a reconnect must still be known to have run.
            raise ConfigError("must not exceed mqtt.command_id_window_seconds", key="mqtt.session_expiry_seconds")
        if (self.mqtt.cert_file is None) != (self.mqtt.key_file is None):
            raise ConfigError("config keys 'mqtt.cert_file' and 'mqtt.key_file' must be set together (mTLS)")

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

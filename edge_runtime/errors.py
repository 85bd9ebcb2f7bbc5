"""The one exception tree of edge-runtime.

Every error the package raises on purpose derives from :class:`EdgeRuntimeError`.
Errors from third-party libraries (onnxruntime, LiteRT, OpenCV, cryptography,
tarfile, paho, urllib) are converted at the boundary with ``raise ... from e``
so callers only ever catch this tree::

    EdgeRuntimeError
    ├── ConfigError              bad or unknown config key / value
    ├── InputError               bad image, tensor, request or command payload
    ├── BusyError                a shared budget stayed full too long: retry later
    ├── BundleError              a bundle is refused (nothing was installed)
    │   ├── SignatureError       bad, missing, untrusted or too few signatures
    │   ├── ManifestError        manifest malformed or inconsistent
    │   ├── UnsafeBundleError    tar member unsafe (path, link, device, dup, ...)
    │   ├── SizeLimitError       a cap was exceeded
    │   ├── IntegrityError       hash or size mismatch (also bit rot in the cache)
    │   ├── RollbackError        version not above the anti-rollback floor
    │   └── IncompatibleError    requires/expiry not met on this device
    ├── ModelError               a model cannot be loaded or run
    │   ├── BackendUnavailableError   runtime for the format is not installed
    │   ├── ModelLoadError       runtime refused the model (corrupt, custom op)
    │   ├── SignatureMismatchError    model I/O differs from the manifest
    │   └── InferenceError       runtime failed while running
    ├── GateError                golden cases / latency / probation failed
    ├── CacheError               model cache state is invalid or an op is refused
    ├── FetchError               download failed (timeout, cap, HTTP status)
    ├── CommandError             fleet command refused or malformed
    └── LinkError                MQTT link failed (TLS, auth, connect)

Each message is meant to be shown to a user as one line.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "BundleError",
    "BusyError",
    "CacheError",
    "CommandError",
    "ConfigError",
    "EdgeRuntimeError",
    "FetchError",
    "GateError",
    "IncompatibleError",
    "InferenceError",
    "InputError",
    "IntegrityError",
    "LinkError",
    "ManifestError",
    "ModelError",
    "ModelLoadError",
    "RollbackError",
    "SignatureError",
    "SignatureMismatchError",
    "SizeLimitError",
    "UnsafeBundleError",
]


class EdgeRuntimeError(Exception):
    """Base of every error edge-runtime raises on purpose."""

    def one_line(self) -> str:
        """The message collapsed to one line, for CLI output and events."""
        return " ".join(str(self).split()) or type(self).__name__


class ConfigError(EdgeRuntimeError):
    """A config file or value is invalid; the message names the key."""


class InputError(EdgeRuntimeError):
    """An input (image, tensor, request, payload) is malformed or too large."""


class BusyError(EdgeRuntimeError):
    """A sound input waited too long for a shared budget (image decode memory); retrying later can work."""


class BundleError(EdgeRuntimeError):
    """A model bundle was refused; nothing was installed."""


class SignatureError(BundleError):
    """Signatures are missing, malformed, untrusted, invalid or below threshold."""


class ManifestError(BundleError):
    """The manifest is malformed or inconsistent with the bundle."""


class UnsafeBundleError(BundleError):
    """A tar member is unsafe: path traversal, link, device, duplicate, unlisted."""


class SizeLimitError(BundleError):
    """A size cap was exceeded (bundle, member, manifest, download, payload)."""


class IntegrityError(BundleError):
    """Content does not match its declared sha256 or size."""


class RollbackError(BundleError):
    """The version is not above the anti-rollback floor for that model name."""


class IncompatibleError(BundleError):
    """The bundle requires something this device lacks, or it has expired."""


class ModelError(EdgeRuntimeError):
    """A model could not be loaded or run."""


class BackendUnavailableError(ModelError):
    """No runtime for the model's format is installed."""


class ModelLoadError(ModelError):
    """The runtime refused to load the model (corrupt file, unsupported op)."""


class SignatureMismatchError(ModelError):
    """The model's inputs/outputs differ from what the manifest declares."""


class InferenceError(ModelError):
    """The runtime failed while running the model."""


class GateError(EdgeRuntimeError):
    """A candidate model failed an activation gate (golden, latency, probation)."""


class CacheError(EdgeRuntimeError):
    """A model cache operation is refused or the cache state is invalid."""


class FetchError(EdgeRuntimeError):
    """A download failed: HTTP status, timeout, deadline or size cap."""


class CommandError(EdgeRuntimeError):
    """A fleet command is malformed, unauthorised or failed."""


class LinkError(EdgeRuntimeError):
    """The MQTT link failed: TLS, authentication or connection."""

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
    ├── ServingError             a request names a model this process cannot serve now
    │   ├── ModelNotServedError  no such model is served here (HTTP 404)
    │   └── ModelNotLoadedError  served here, but no version is loaded yet (HTTP 503)
    ├── FetchError               download failed (timeout, cap, HTTP status)
    ├── CommandError             fleet command refused or malformed
    └── LinkError                MQTT link failed (TLS, auth, connect)

Each message is meant to be shown to a user as one line. Errors carry the
facts as fields (:attr:`ConfigError.key`, :attr:`ServingError.model`) so that a
boundary words its own message or maps the error by type, never by its text.
"""

from __future__ import annotations

from typing import Literal

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
    "ModelNotLoadedError",
    "ModelNotServedError",
    "RollbackError",
    "ServingError",
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


_ConfigForm = Literal["says", "unknown", "check"]


class ConfigError(EdgeRuntimeError):
    """A config file or value is invalid; the message names the key.

    ``problem`` is what is wrong; ``key`` the dotted key it is about (None when the
    error is about a whole file or several keys). The same strict checks also judge
    command arguments and runtime settings, so :meth:`worded` says it for another noun
    ("argument 'args.x' must be an integer") instead of callers patching the text.
    ``form`` is how the key and the problem join: ``"says"`` ("config key 'k' is
    required"), ``"unknown"`` ("unknown config key 'k'", problem unused) or
    ``"check"`` for a validator's verdict ("config key 'k': must be between ...").
    """

    def __init__(self, problem: str, *, key: str | None = None, form: _ConfigForm = "says") -> None:
        self.problem = problem
        self.key = key
        self.form: _ConfigForm = form
        super().__init__(self._text("config key"))

    @classmethod
    def unknown_key(cls, key: str) -> ConfigError:
        """``unknown config key 'key'``: a key the schema does not have."""
        return cls("", key=key, form="unknown")

    def worded(self, noun: str = "config key") -> str:
        """The message as one line (like :meth:`one_line`), the key called ``noun``
        ("config key", "argument", "setting")."""
        return " ".join(self._text(noun).split()) or type(self).__name__

    def _text(self, noun: str) -> str:
        if self.key is None:
            return self.problem
        if self.form == "unknown":
            return f"unknown {noun} {self.key!r}"
        if self.form == "check":
            return f"{noun} {self.key!r}: {self.problem}"
        return f"{noun} {self.key!r} {self.problem}"


class InputError(EdgeRuntimeError):
    """An input (image, tensor, request, payload) is malformed or too large."""


class UsageError(EdgeRuntimeError):
    """A command was asked for something its inputs cannot give (e.g. a picture of a classifier's result)."""


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
    """A model cache operation is refused or the cache state is invalid (corrupt, unwritable).

    Never "that model is not served or loaded here": that is a :class:`ServingError`.
    """


class ServingError(EdgeRuntimeError):
    """A request names a model this process cannot serve now; ``model`` is its name.

    Not a :class:`CacheError`: nothing is wrong with the cache. Boundaries map the
    subtypes by type (the API: 404 vs 503; a pipeline waits for the model).
    """

    def __init__(self, message: str, *, model: str) -> None:
        self.model = model
        super().__init__(message)


class ModelNotServedError(ServingError):
    """No model of that name is served here (HTTP 404); ``serving`` lists the names that are."""

    def __init__(self, model: str, serving: tuple[str, ...]) -> None:
        self.serving = serving
        super().__init__(f"model {model!r} is not served here (serving: {', '.join(serving)})", model=model)


class ModelNotLoadedError(ServingError):
    """The model is served here but no version is loaded yet, or any more (HTTP 503, retry later)."""

    def __init__(self, model: str, message: str | None = None) -> None:
        super().__init__(message or f"model {model!r} is not loaded", model=model)


class FetchError(EdgeRuntimeError):
    """A download failed: HTTP status, timeout, deadline or size cap.

    ``status`` is the final HTTP status when the server answered with one that is
    not retried (404, 403, ...), None otherwise.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class CommandError(EdgeRuntimeError):
    """A fleet command is malformed, unauthorised or failed."""


class LinkError(EdgeRuntimeError):
    """The MQTT link failed: TLS, authentication or connection."""

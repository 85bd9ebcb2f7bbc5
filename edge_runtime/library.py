"""edge-runtime as a library: load a verified model, run it, read its metadata.

The public surface re-exported by :mod:`edge_runtime` (see its ``__all__``).
It composes what the daemon composes — :class:`~edge_runtime.update.store.ModelStore`
for installed models, :func:`~edge_runtime.bundle.reader.read_bundle` for bundle
files, :class:`~edge_runtime.runtime.loaded_model.LoadedModel` to run them — so a
model is verified exactly as ``edge-runtime serve`` verifies it before it runs:
its manifest signature re-checked with the keys trusted now, every file re-hashed.
It sits at the daemon's level (a composition root), above ``update`` and ``runtime``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from numpy.typing import NDArray

from edge_runtime import __version__
from edge_runtime._util.fsutil import remove_tree
from edge_runtime.bundle.reader import read_bundle
from edge_runtime.bundle.requirements import check_requirements, device_tags
from edge_runtime.bundle.signing import load_trusted_keys
from edge_runtime.config.model import Config
from edge_runtime.runtime.backends.base import BackendOptions
from edge_runtime.runtime.loaded_model import LoadedModel
from edge_runtime.update.store import ModelStore

__all__ = ["Model", "ModelMetadata", "TensorMetadata", "load_model", "open_bundle"]


@dataclass(frozen=True)
class TensorMetadata:
    """One model input or output as the runtime sees it: ``shape`` uses None for a dynamic dim."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class ModelMetadata:
    """What a loaded model is: its signed name and version, format, tensors and labels."""

    name: str
    version: int
    format: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]
    labels: tuple[str, ...]


class Model:
    """A verified model loaded in its runtime. Close it (or use ``with``) to free the runtime.

    Calls may come from several threads, but :meth:`close` must come after the last one.
    """

    def __init__(self, loaded: LoadedModel, cleanup: Callable[[], None] | None = None) -> None:
        self._loaded = loaded
        self._cleanup = cleanup
        self._closed = False
        backend = loaded.backend
        self.metadata = ModelMetadata(
            name=loaded.name, version=loaded.version, format=loaded.manifest.format,
            inputs=tuple(TensorMetadata(t.name, str(t.dtype), tuple(t.shape)) for t in backend.inputs),
            outputs=tuple(TensorMetadata(t.name, str(t.dtype), tuple(t.shape)) for t in backend.outputs),
            labels=tuple(loaded.postprocessor.labels),
        )

    @property
    def name(self) -> str:
        """The model's signed name."""
        return self.metadata.name

    @property
    def version(self) -> int:
        """The model's signed version."""
        return self.metadata.version

    def infer(self, feeds: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        """Raw tensors in (input name -> array, batch dim included), raw output tensors out.

        Raises:
            InputError: a feed is missing, unknown, or of the wrong dtype or shape.
            ModelError: the runtime failed (InferenceError).
        """
        return self._loaded.infer(feeds)

    def predict(self, data: bytes) -> list[dict[str, Any]]:
        """Run on JPEG/PNG image bytes (or a .npy tensor) with the model's declared
        pre- and post-processing; one JSON-ready dict per batch item, as ``edge-runtime run`` prints.

        Raises:
            InputError: not an image/.npy, over a size cap, or no preprocessing declared for an image.
            BusyError: the decode budget stayed full. ModelError: the runtime failed.
        """
        return self._loaded.predict_bytes(data).results

    def close(self) -> None:
        """Release the runtime and any staging dir; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loaded.close()
        finally:
            if self._cleanup is not None:
                self._cleanup()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<edge_runtime.Model {self.name} v{self.version}>"


def load_model(name: str, *, state_dir: Path | str, trust_dir: Path | str, version: int | None = None,
               config: Config | None = None) -> Model:
    """Load an installed model (``edge-runtime models install``) from ``state_dir``.

    ``version`` None means the active version. The manifest signature is
    re-checked with the keys in ``trust_dir`` now and every file re-hashed, as
    the daemon does before serving. ``config`` supplies limits and backend
    options (its state and trust dirs are replaced by the arguments).

    Raises:
        CacheError: no such model or version, or none active.
        ConfigError: the trust dir is missing or holds an invalid key.
        BundleError: the stored model no longer verifies (SignatureError, IntegrityError, ...).
        ModelError: the runtime refused the model.
    """
    config = (config or Config()).replace(state_dir=Path(state_dir), trust_dir=Path(trust_dir))
    return Model(ModelStore(config).load(name, version))


def open_bundle(path: Path | str, *, trust_dir: Path | str, config: Config | None = None) -> Model:
    """Verify a bundle file with the keys in ``trust_dir``, unpack it into a private
    temporary dir (removed on :meth:`Model.close`) and load it, without installing it.

    The checks are ``edge-runtime bundle verify``'s plus the bundle's own
    requirements (runtime version, hardware tags, expiry); a device's
    anti-rollback floor does not apply (there is no device state).

    Raises:
        SignatureError: not signed by enough keys trusted in ``trust_dir``.
        BundleError: any other verification failure (ManifestError, IntegrityError, SizeLimitError, ...).
        ConfigError: the trust dir is missing or holds an invalid key.
        ModelError: the runtime refused the model.
    """
    config = (config or Config()).replace(trust_dir=Path(trust_dir))
    tags = device_tags() | set(config.hardware_tags)

    def accept(manifest: Any) -> None:
        check_requirements(manifest, device_tags=tags, runtime_version=__version__,
                           now=dt.datetime.now(dt.timezone.utc))

    staging = Path(tempfile.mkdtemp(prefix="edge-runtime-bundle-"))  # 0700
    try:
        staged = read_bundle(Path(path), trusted=load_trusted_keys(config.trust_dir),
                             threshold=config.trust.threshold, limits=config.limits,
                             staging_root=staging, accept=accept)
        options = BackendOptions(providers=config.backend.providers, threads=config.backend.threads,
                                 spin_wait=config.backend.spin_wait)
        loaded = LoadedModel(staged.manifest, staged.directory, options=options, limits=config.limits)
    except BaseException:
        with contextlib.suppress(OSError):
            remove_tree(staging)
        raise
    return Model(loaded, cleanup=lambda: remove_tree(staging))

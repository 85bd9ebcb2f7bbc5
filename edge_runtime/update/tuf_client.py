"""The update channel as a TUF repository, read with python-tuf's ``tuf.ngclient``.

The repository's metadata is at ``<repository_url>/metadata/`` and its targets
at ``<repository_url>/targets/`` (the layout of python-tuf's own repositories).
Trust starts from a bootstrap ``root.json`` installed with the device in the
trust dir; ngclient then follows root rotations, and keeps the metadata it has
verified in ``<state_dir>/tuf/``. Freeze, rollback, fast-forward, mix-and-match
and key compromise are TUF's to refuse (the TUF specification's client
workflow): every ngclient error is converted here into one of ours, with one line.

Downloads go through the project's own :class:`~edge_runtime.update.fetcher.Fetcher`
(:class:`TufFetcher`), so the size caps, timeouts, overall deadline, Range
resume and TLS rules are the same as for every other download.

A model is the target ``models/<name>.bundle``; what it is goes in its
``custom`` field, checked before anything is downloaded::

    "custom": {"edge_runtime": {"model": "cls", "version": 3,
                                "requires": {"runtime": ">=0.1.0", "hardware": ["aarch64"]}}}
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from edge_runtime._util.fsutil import CHUNK, CLOEXEC, NOFOLLOW, CappedReadError, make_private_dir, read_stream_capped
from edge_runtime._util.retry_policy import redact_url
from edge_runtime.bundle.staging_owner import owner_tag
from edge_runtime.errors import (
    BundleError,
    FetchError,
    IncompatibleError,
    IntegrityError,
    ManifestError,
    RollbackError,
    SignatureError,
    SizeLimitError,
)

__all__ = ["MODEL_TARGET", "DirectoryFetcher", "Downloads", "ModelTarget", "TufFetcher", "TufRepository",
           "model_target_path"]

_log = logging.getLogger(__name__)
MODEL_TARGET = "models/{name}.bundle"
_CUSTOM_KEY = "edge_runtime"


def model_target_path(name: str) -> str:
    """The TUF target path of model ``name``'s bundle."""
    return MODEL_TARGET.format(name=name)


@dataclass(frozen=True)
class ModelTarget:
    """A model version the repository offers: its target, and what its ``custom`` field says."""

    name: str
    version: int
    info: TargetFile
    runtime: str = ""
    hardware: tuple[str, ...] = ()

    @property
    def length(self) -> int:
        return int(self.info.length)

    @property
    def sha256(self) -> str:
        return str(self.info.hashes.get("sha256", ""))


class Downloads(Protocol):
    """The two downloads ngclient needs (:class:`Fetcher` over HTTP, :class:`DirectoryFetcher` from a copy)."""

    def fetch_bytes(self, url: str, max_bytes: int) -> bytes:
        """At most ``max_bytes`` of ``url``. Raises FetchError (``status`` 404 when missing), SizeLimitError."""
        ...

    def fetch_to_file(self, url: str, dest: Path, *, max_bytes: int, expected_size: int | None = None,
                      expected_sha256: str | None = None) -> object:
        """``url`` into ``dest`` (at most ``max_bytes``). Raises like :meth:`fetch_bytes`."""
        ...


class DirectoryFetcher:
    """A copied TUF repository on a local path (a USB stick, an air-gapped site): the same checks, no network.

    Only regular files inside ``root`` are read (no symlink is followed), with the same caps.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, url: str) -> Path:
        path = Path(url)
        try:
            inside = path.resolve(strict=False).is_relative_to(self.root.resolve())
        except OSError:
            inside = False
        if not inside or path.is_symlink():
            raise FetchError(f"{url}: not a file of the repository {self.root}", status=404)
        return path

    @contextlib.contextmanager
    def _open(self, url: str) -> Iterator[IO[bytes]]:
        """The file at ``url`` opened without following a final symlink (a FIFO reads as empty)."""
        path = self._path(url)
        try:
            fd = os.open(path, os.O_RDONLY | CLOEXEC | os.O_NONBLOCK | NOFOLLOW)
        except FileNotFoundError as e:
            raise FetchError(f"{path}: not in the repository", status=404) from e
        except OSError as e:
            raise FetchError(f"{path}: unreadable ({e.strerror or e})") from e
        with os.fdopen(fd, "rb") as fh:
            yield fh

    def fetch_bytes(self, url: str, max_bytes: int) -> bytes:
        with self._open(url) as fh:
            try:
                return read_stream_capped(fh, max_bytes, url)
            except CappedReadError as e:
                raise SizeLimitError(f"{url}: over the {max_bytes}-byte cap") from e
            except OSError as e:
                raise FetchError(f"{url}: unreadable ({e.strerror or e})") from e

    def fetch_to_file(self, url: str, dest: Path, *, max_bytes: int, expected_size: int | None = None,
                      expected_sha256: str | None = None) -> None:
        # Copied in chunks: a bundle may be hundreds of MB, more than a Pi should hold in memory.
        copied = 0
        with self._open(url) as src, open(dest, "wb") as out:
            try:
                while chunk := src.read(CHUNK):
                    copied += len(chunk)
                    if copied > max_bytes:
                        raise SizeLimitError(f"{url}: over the {max_bytes}-byte cap")
                    out.write(chunk)
            except OSError as e:
                raise FetchError(f"{url}: unreadable ({e.strerror or e})") from e


class TufFetcher(FetcherInterface):
    """ngclient's network I/O through our :class:`Fetcher` (caps, deadline, resume, TLS).

    ngclient gives each download its upper bound (the length a signed role declares,
    or its configured maximum for timestamp and root); our fetcher cuts off past it.
    """

    def __init__(self, fetcher: Downloads, staging: Path) -> None:
        self._fetcher = fetcher
        self._staging = staging

    def _fetch(self, url: str) -> Iterator[bytes]:  # unused: both public entry points are overridden
        yield self.download_bytes(url, 1 << 20)

    def download_bytes(self, url: str, max_length: int) -> bytes:
        with _download_errors(url, max_length):
            return self._fetcher.fetch_bytes(url, max_length)

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        # Named by the URL (which, with consistent snapshots, names the content): a cut download resumes.
        key = hashlib.sha256(url.encode()).hexdigest()[:16]
        dest = self._staging / f"tuf-{key}.{owner_tag()}.part"
        with _download_errors(url, max_length):
            self._fetcher.fetch_to_file(url, dest, max_bytes=max_length)
        try:
            with open(dest, "rb") as fh:
                yield fh
        finally:
            dest.unlink(missing_ok=True)


@contextlib.contextmanager
def _download_errors(url: str, max_length: int) -> Iterator[None]:
    """Our download errors as ngclient expects them (it tells a missing next root by the HTTP status)."""
    try:
        yield
    except SizeLimitError as e:
        raise tuf_errors.DownloadLengthMismatchError(f"{redact_url(url)}: over {max_length} bytes") from e
    except FetchError as e:
        if e.status is not None:
            raise tuf_errors.DownloadHTTPError(e.one_line(), e.status) from e
        raise tuf_errors.DownloadError(e.one_line()) from e


class TufRepository:
    """One refresh of the TUF repository at ``url`` (ngclient refreshes once per Updater)."""

    def __init__(self, url: str, bootstrap_root: Path, state_dir: Path, fetcher: Downloads, staging: Path,
                 *, max_metadata_bytes: int = 2 << 20) -> None:
        """Raises:
            SignatureError: the bootstrap or the trusted root does not verify, or is missing.
        """
        self.url = url.rstrip("/")
        self._metadata_dir = make_private_dir(state_dir / "tuf")
        self._bootstrap = bootstrap_root
        self._fetcher = TufFetcher(fetcher, staging)
        self._config = UpdaterConfig(root_max_length=min(512_000, max_metadata_bytes),
                                     timestamp_max_length=16_384, snapshot_max_length=max_metadata_bytes,
                                     targets_max_length=max_metadata_bytes)
        self._updater = self._new_updater()

    def _new_updater(self) -> Updater:
        trusted = self._metadata_dir / "root.json"
        source = trusted if trusted.exists() else self._bootstrap
        try:
            root = source.read_bytes()
        except OSError as e:
            raise SignatureError(f"TUF root {source}: cannot read ({e.strerror}); install the repository's "
                                 "root.json in the trust dir") from e
        with tuf_errors_converted("loading the trusted root"):
            return Updater(str(self._metadata_dir), f"{self.url}/metadata/", None, f"{self.url}/targets/",
                           fetcher=self._fetcher, config=self._config, bootstrap=root)

    def refresh(self) -> None:
        """Update root (following rotations), timestamp, snapshot and targets, in that order.

        Fast-forward recovery (TUF specification 5.3.11): when the new root rotated the snapshot or
        timestamp keys, the trusted snapshot and timestamp are deleted, so a version number that a
        leaked key pushed up stops counting. ngclient does this by itself only where the old files no
        longer verify (a rotated timestamp key); a trusted timestamp that still verifies can keep
        referring to a fast-forwarded snapshot, so the rule is applied here, once, on a rollback error.

        Raises:
            IncompatibleError: metadata expired (a freeze). RollbackError: a role's version went
                back. SignatureError: too few valid signatures (also from revoked keys).
            IntegrityError: metadata does not match what snapshot/timestamp declare.
            FetchError: the repository cannot be read.
        """
        before = self._freshness_keys()
        try:
            with tuf_errors_converted("refreshing the metadata"):
                self._updater.refresh()
        except RollbackError:
            if self._freshness_keys() == before:
                raise
            _log.warning("TUF: the snapshot/timestamp keys were rotated; dropping the trusted snapshot and "
                         "timestamp (fast-forward recovery)")
            for role in ("timestamp", "snapshot"):
                (self._metadata_dir / f"{role}.json").unlink(missing_ok=True)
            self._updater = self._new_updater()
            with tuf_errors_converted("refreshing the metadata"):
                self._updater.refresh()

    def _freshness_keys(self) -> dict[str, list[str]]:
        """The snapshot and timestamp key ids of the trusted root (as ngclient persisted it)."""
        try:
            roles = json.loads((self._metadata_dir / "root.json").read_bytes())["signed"]["roles"]
            return {role: sorted(roles[role]["keyids"]) for role in ("snapshot", "timestamp")}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def model(self, name: str) -> ModelTarget | None:
        """What the repository offers for ``name`` (delegations walked), None when nothing.

        Raises:
            ManifestError: the target's ``custom`` field does not describe model ``name``.
            and what :meth:`refresh` raises.
        """
        path = model_target_path(name)
        with tuf_errors_converted(f"resolving {path}"):
            info = self._updater.get_targetinfo(path)
        if info is None:
            return None
        return _model_target(name, info)

    def small_target(self, path: str, max_bytes: int, dest: Path) -> bytes | None:
        """The content of target ``path`` when the repository has it (at most ``max_bytes``), else None.

        Raises:
            SizeLimitError: the target is declared larger than ``max_bytes``. And what :meth:`download` raises.
        """
        with tuf_errors_converted(f"resolving {path}"):
            info = self._updater.get_targetinfo(path)
        if info is None:
            return None
        if info.length > max_bytes:
            raise SizeLimitError(f"TUF target {path} is {info.length} bytes, over the {max_bytes}-byte cap")
        with tuf_errors_converted(f"downloading {path}"):
            self._updater.download_target(info, str(dest))
        try:
            return dest.read_bytes()
        finally:
            dest.unlink(missing_ok=True)

    def download(self, target: ModelTarget, dest: Path) -> Path:
        """Download ``target`` to ``dest``, checked against its signed length and hashes.

        Raises:
            FetchError: the download failed or exceeded the deadline. IntegrityError: its
                length or hash is not what the targets role signed.
        """
        with tuf_errors_converted(f"downloading {target.info.path}"):
            return Path(self._updater.download_target(target.info, str(dest)))


def _model_target(name: str, info: TargetFile) -> ModelTarget:
    custom: Any = info.custom.get(_CUSTOM_KEY) if isinstance(info.custom, dict) else None
    where = f"TUF target {info.path}"
    if not isinstance(custom, dict):
        raise ManifestError(f"{where}: no custom.{_CUSTOM_KEY} object (model, version)")
    model, version, requires = custom.get("model"), custom.get("version"), custom.get("requires", {})
    if model != name:
        raise ManifestError(f"{where}: custom says model {model!r}, not {name!r}")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= 2**53:
        raise ManifestError(f"{where}: custom version must be an integer from 1, got {version!r}")
    if not isinstance(requires, dict):
        raise ManifestError(f"{where}: custom requires must be an object")
    runtime, hardware = requires.get("runtime", ""), requires.get("hardware", [])
    if not isinstance(runtime, str) or not isinstance(hardware, list) or not all(
            isinstance(h, str) for h in hardware):
        raise ManifestError(f"{where}: custom requires must be {{runtime: str, hardware: [str]}}")
    if "sha256" not in info.hashes:
        raise ManifestError(f"{where}: no sha256 hash")
    return ModelTarget(name, version, info, runtime, tuple(hardware))


@contextlib.contextmanager
def tuf_errors_converted(doing: str) -> Iterator[None]:
    """ngclient's and python-tuf's errors as ours, one line naming what was being done."""
    try:
        yield
    except tuf_errors.ExpiredMetadataError as e:
        raise IncompatibleError(f"TUF {doing}: {e} (a freeze, or the repository is not refreshed)") from e
    except tuf_errors.BadVersionNumberError as e:
        raise RollbackError(f"TUF {doing}: {e} (a rollback)") from e
    except tuf_errors.UnsignedMetadataError as e:
        raise SignatureError(f"TUF {doing}: {e} (not enough valid signatures by the keys the root trusts "
                             "for that role: unsigned, or signed by a revoked key)") from e
    except tuf_errors.LengthOrHashMismatchError as e:
        raise IntegrityError(f"TUF {doing}: {e}") from e
    except tuf_errors.DownloadLengthMismatchError as e:
        raise SizeLimitError(f"TUF {doing}: {e}") from e
    except tuf_errors.DownloadError as e:
        cause = e.__cause__
        if isinstance(cause, FetchError):
            raise FetchError(f"TUF {doing}: {cause.one_line()}", status=cause.status) from e
        raise FetchError(f"TUF {doing}: {e}") from e
    except tuf_errors.RepositoryError as e:
        raise BundleError(f"TUF {doing}: {e}") from e
    except (ValueError, KeyError, TypeError) as e:  # malformed metadata that python-tuf does not wrap
        raise ManifestError(f"TUF {doing}: malformed metadata ({type(e).__name__}: {e})") from e

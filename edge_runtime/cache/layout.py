"""The model cache's directory tree: version dirs, active/previous links, a version's files.

:class:`CacheLayout` knows where things are under the state dir and how links
are read and replaced; it holds no policy (that is
:class:`~edge_runtime.cache.versions.ModelCache`) and takes no lock. Links are
read with ``os.readlink`` and must name a bare decimal version; they are never
followed, so a planted link cannot lead out of the state dir.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from edge_runtime._util.fsutil import fsync_dir, list_files, make_private_dir, remove_tree, replace_symlink, sha256_file
from edge_runtime.bundle.manifest import Manifest, is_valid_name
from edge_runtime.errors import CacheError, IntegrityError

__all__ = ["CacheLayout", "Fault", "cache_errors", "check_hashes", "check_layout", "read_link"]

Fault = Callable[[str], None]
"""``fault(step)``: test hook called at each named step of the *_STEPS tuples."""

_VERSION_RE = re.compile(r"^[1-9][0-9]{0,15}$")
_META = ("manifest.json", "manifest.sig")


@contextlib.contextmanager
def cache_errors(what: str) -> Iterator[None]:
    """Turn an OSError into ``CacheError("<what>: <reason>")``."""
    try:
        yield
    except OSError as e:
        raise CacheError(f"{what}: {e.strerror or e}") from e


def read_link(link: Path) -> int | None:
    """The version ``link`` names, None if there is no link; CacheError if corrupt."""
    try:
        # os.readlink, not Path.readlink: Path would normalise './3' or '3/' to '3'.
        target = os.readlink(link)  # noqa: PTH115
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CacheError(f"{link} is corrupt: not a symlink ({e.strerror})") from e
    if not _VERSION_RE.fullmatch(target):
        raise CacheError(f"{link} is corrupt: target {target!r} is not a bare version number")
    return int(target)


def check_layout(root: Path, manifest: Manifest) -> None:
    """``root`` holds exactly the listed files (sizes match) plus manifest.json/.sig."""
    try:
        found = list_files(root)
    except OSError as e:
        raise IntegrityError(f"{e.filename or root}: {e.strerror or e}") from e
    expected = {**{m: found.get(m, -1) for m in _META}, **{k: v.size for k, v in manifest.files.items()}}
    for rel in sorted(set(expected) | set(found)):
        if rel not in expected:
            raise IntegrityError(f"{root / rel}: not listed in the manifest")
        if rel not in found:
            raise IntegrityError(f"{root / rel}: missing")
        if found[rel] != expected[rel]:
            raise IntegrityError(f"{root / rel}: size {found[rel]} differs from declared {expected[rel]}")


def check_hashes(root: Path, manifest: Manifest) -> None:
    """Every file ``manifest`` lists hashes (and sizes) as declared under ``root``; else IntegrityError."""
    for rel, entry in sorted(manifest.files.items()):
        try:
            digest, size = sha256_file(root / rel)
        except OSError as e:
            raise IntegrityError(f"{root / rel}: unreadable: {e.strerror or e}") from e
        if (digest, size) != (entry.sha256, entry.size):
            raise IntegrityError(f"{root / rel}: sha256 does not match the manifest (bit rot?)")


class CacheLayout:
    """``models/<name>/<version>/``, ``models/<name>/{active,previous}`` and ``staging/`` under ``root``.

    ``fault`` is called at the named steps of a link change ("<op>:<which>-linked",
    "<op>:<which>-set"). Creating it makes ``models/`` and ``staging/`` (0700).

    Raises CacheError: a dir is a symlink or cannot be created.
    """

    def __init__(self, root: Path, fault: Fault) -> None:
        self.root = root
        self.models, self.staging = root / "models", root / "staging"
        self._fault = fault
        for d in (self.models, self.staging):
            with cache_errors(f"cache dir {d} is unusable"):
                make_private_dir(d)

    def names(self) -> list[str]:
        """Model names present, sorted."""
        with cache_errors(f"cannot list {self.models}"), os.scandir(self.models) as it:
            return sorted(e.name for e in it if is_valid_name(e.name) and e.is_dir(follow_symlinks=False))

    def versions(self, name: str) -> list[int]:
        """Installed versions of ``name`` ascending (real dirs named by a decimal version)."""
        ndir = self.name_dir(name)
        if not ndir.is_dir() or ndir.is_symlink():
            return []
        with cache_errors(f"cannot list {ndir}"), os.scandir(ndir) as it:
            return sorted(
                int(e.name) for e in it if _VERSION_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
            )

    def name_dir(self, name: str) -> Path:
        """``models/<name>``, existing or not. Raises CacheError if the name is invalid."""
        if not is_valid_name(name):
            raise CacheError(f"model name {name!r} is not valid")
        return self.models / name

    def make_name_dir(self, name: str) -> Path:
        """``models/<name>``, created (0700, synced) if missing. Raises CacheError if it is no real dir."""
        ndir = self.name_dir(name)
        if not os.path.lexists(ndir):
            make_private_dir(ndir)
            fsync_dir(self.models)
        elif ndir.is_symlink() or not ndir.is_dir():
            raise CacheError(f"{ndir} is not a directory")
        return ndir

    def version_dir(self, name: str, version: int) -> Path:
        """The directory of ``name`` ``version``, existing or not. Raises CacheError if either is invalid."""
        if isinstance(version, bool) or not isinstance(version, int) or not _VERSION_RE.fullmatch(str(version)):
            raise CacheError(f"model version {version!r} is not valid")
        return self.name_dir(name) / str(version)

    def is_version_dir(self, name: str, version: int) -> bool:
        """True if ``name`` ``version`` is a real directory (not a link)."""
        try:
            return stat.S_ISDIR(os.lstat(self.version_dir(name, version)).st_mode)
        except FileNotFoundError:
            return False

    def require_cached(self, name: str, version: int) -> Path:
        """The version's directory; CacheError if it is not in the cache."""
        if not self.is_version_dir(name, version):
            raise CacheError(f"{name} version {version} is not in the cache")
        return self.version_dir(name, version)

    def link_version(self, name: str, which: str) -> int | None:
        """The version link ``which`` ("active", "previous") names; CacheError if corrupt or dangling."""
        version = read_link(self.name_dir(name) / which)
        if version is not None and not self.is_version_dir(name, version):
            raise CacheError(f"{self.name_dir(name) / which} is dangling: version {version} is not cached")
        return version

    def set_link(self, ndir: Path, which: str, version: int, op: str) -> None:
        """Point ``ndir/which`` at ``version`` atomically (symlink + rename; faults named after ``op``)."""
        link = ndir / which
        if link.is_dir() and not link.is_symlink():
            remove_tree(link)  # a real dir where the link belongs: rename cannot replace it
        replace_symlink(link, str(version), lambda: self._fault(f"{op}:{which}-linked"))
        self._fault(f"{op}:{which}-set")

    def staged_paths(self, directory: Path) -> tuple[Path, Path]:
        """(the staged dir, the ``staging/<unique>`` entry holding it), else CacheError."""
        root = Path(os.path.realpath(self.staging))
        # Resolve the parent only: the staged dir itself must be a real dir, not a link.
        src = Path(os.path.realpath(directory.parent)) / directory.name
        if (
            directory.name in ("", ".", "..")
            or root not in src.parents
            or src.is_symlink()
            or not src.is_dir()
        ):
            raise CacheError(f"staged bundle {directory} is not a directory under {self.staging}")
        return src, root / src.relative_to(root).parts[0]

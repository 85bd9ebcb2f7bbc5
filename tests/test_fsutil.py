"""The crash-safe file primitives everything else builds on."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edge_runtime._util import fsutil


def test_open_flags_are_the_platform_ones() -> None:
    assert fsutil.NOFOLLOW == os.O_NOFOLLOW != 0
    assert fsutil.CLOEXEC == os.O_CLOEXEC != 0


def test_atomic_write_is_private_and_never_follows_a_planted_link(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    fsutil.atomic_write(target, b"one")
    assert target.read_bytes() == b"one" and stat.S_IMODE(target.stat().st_mode) == 0o600
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    link = tmp_path / "new.bin"
    link.symlink_to(victim)
    with pytest.raises(FileExistsError), fsutil.create_exclusive(link) as fh:
        fh.write(b"pwned")
    assert victim.read_bytes() == b"keep"
    fsutil.replace_symlink(tmp_path / "active", "3")
    assert os.readlink(tmp_path / "active") == "3"

"""The crash-safe file primitives everything else builds on."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
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


def test_read_capped_refuses_over_the_cap_with_fields(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 10)
    assert fsutil.read_capped(path, 10) == b"x" * 10
    with pytest.raises(fsutil.CappedReadError) as caught:
        fsutil.read_capped(path, 9)
    assert (caught.value.path, caught.value.limit, caught.value.errno) == (str(path), 9, errno.EFBIG)
    assert isinstance(caught.value, OSError)  # a caller that treats every read failure alike still can


def test_read_capped_symlink_policy_is_explicit(tmp_path: Path) -> None:
    target = tmp_path / "real.toml"
    target.write_bytes(b"k = 1\n")
    link = tmp_path / "link.toml"
    link.symlink_to(target)
    with pytest.raises(OSError) as caught:
        fsutil.read_capped(link, 100)
    assert caught.value.errno == errno.ELOOP
    assert fsutil.read_capped(link, 100, follow_symlinks=True) == b"k = 1\n"


def test_read_stream_capped_on_a_pipe(tmp_path: Path) -> None:
    r, w = os.pipe()
    os.write(w, b"y" * 5000)
    os.close(w)
    with os.fdopen(r, "rb") as fh, pytest.raises(fsutil.CappedReadError) as caught:
        fsutil.read_stream_capped(fh, 4096, "pipe")
    assert (caught.value.path, caught.value.limit) == ("pipe", 4096)


@pytest.mark.parametrize("reader", ["load_toml", "key", "password"])
def test_capped_reads_never_allocate_the_whole_cap(tmp_path: Path, reader: str) -> None:
    # Under a 1 GiB address-space limit a read(cap + 1) of a 4 GiB cap fails with MemoryError;
    # the chunked helper reads only what the file holds.
    path = tmp_path / "small.toml"
    path.write_bytes(b"k = 1\n")
    setup, call = {
        "load_toml": ("from edge_runtime.config.typed_toml import load_toml", "load_toml(p, 4 << 30)"),
        "key": ("import edge_runtime.bundle.signing as s; s._MAX_KEY_FILE = 4 << 30", "s._read_key_file(p)"),
        "password": ("import edge_runtime.mqtt.tls as t; from edge_runtime.config.model import MqttConfig; "
                     "t.MAX_PASSWORD_BYTES = 4 << 30", "t.read_password(MqttConfig(password_file=p), None)"),
    }[reader]
    code = (f"import resource; from pathlib import Path; p = Path({str(path)!r}); {setup}; "
            f"resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); {call}; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr[-500:]

"""Issue 9 §6: on a nearly full disk an install first removes old versions (never active, previous or
pinned) and, when even that would not do, refuses in one line naming the bytes free and needed.

The end-to-end case runs the real CLI on a real, small tmpfs (needs root to mount; skipped otherwise).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_helpers import Device, make_device
from daemon_helpers import LENIENT_GATES, PPOCR_IO, golden_npz
from test_model_cache import stage
from test_spool_loss import small_fs

from edge_runtime.bundle.signing import load_private_key
from edge_runtime.bundle.writer import BundleSpec, GoldenSource, pack_bundle
from edge_runtime.cache.disk_room import MARGIN_BYTES, make_room, make_room_for_download
from edge_runtime.cache.versions import ModelCache
from edge_runtime.errors import CacheError

Zoo = Callable[[str], Path]
PAD = 12 << 20  # each bundle's payload is this plus the model: 2x the margin, so one removal makes room


def pack_padded(out: Path, zoo: Zoo, version: int, key: Path, work: Path) -> Path:
    pad = work / "pad.bin"
    if not pad.exists():
        pad.write_bytes(os.urandom(PAD))
    inp, exp = golden_npz(zoo("ppocr_cls"), work)
    inputs, outputs = PPOCR_IO
    spec = BundleSpec(name="ppocr-cls", version=version, format="onnx", model=zoo("ppocr_cls"), inputs=inputs,
                      outputs=outputs, extra_files={"pad.bin": pad}, golden=(GoldenSource(inp, exp),),
                      gates=LENIENT_GATES)
    pack_bundle(out, spec, [load_private_key(key)])
    return out


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def leave_free(fs: Path, free: int, name: str) -> None:
    """Write a filler so that about ``free`` bytes stay free on the small test fs ``fs``."""
    assert os.path.ismount(fs) and os.statvfs(fs).f_blocks * os.statvfs(fs).f_frsize < 64 << 20
    (fs / name).write_bytes(b"\0" * (free_bytes(fs) - free))


def versions(dev: Device) -> tuple[list[int], int | None, int | None]:
    [model] = dev.models()
    return model["versions"], model["active"], model["previous"]


def test_install_on_a_full_disk_makes_room_first_within_the_keep_rules(tmp_path: Path, keys: dict[str, Path],
                                                                      zoo: Zoo) -> None:
    with small_fs(tmp_path / "fs", "60M") as fs:
        dev = make_device(fs / "device", keys)
        bundles = [pack_padded(tmp_path / f"v{v}.bundle", zoo, v, keys["a"], tmp_path) for v in range(1, 6)]
        for bundle in bundles[:3]:
            dev.cli("models", "install", bundle)
        assert versions(dev) == ([1, 2, 3], 3, 2)
        leave_free(fs, PAD // 2, "filler")  # less than one bundle: staging it would hit ENOSPC
        out = dev.cli("models", "install", bundles[3])
        assert "removed ppocr-cls v1 to make room" in out.stderr
        assert versions(dev) == ([2, 3, 4], 4, 3)
        # Now v2 is the one removable version, and removing it would still not be enough: refused, v2 kept.
        leave_free(fs, 1 << 20, "filler2")
        before = dev.tree()
        refused = dev.cli("models", "install", bundles[4], check=False)
        [line] = [x for x in refused.stderr.splitlines() if not x.startswith("INFO")]
        assert refused.returncode == 1 and line.startswith("error: not enough disk space under "), refused.stderr
        assert " bytes free, " in line and f"+ {MARGIN_BYTES} margin)" in line
        assert dev.tree() == before and list((dev.state / "staging").iterdir()) == []


def fake_statvfs(free: Callable[[], int]) -> Callable[[Path], os.statvfs_result]:
    return lambda path: SimpleNamespace(f_bavail=free(), f_frsize=1)  # type: ignore[return-value]


def test_make_room_never_removes_active_previous_or_pinned_and_prefers_the_model_installed(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "state", keep_versions=10)
    for name in ("other", "m"):
        for v in (1, 2, 3, 4):
            cache.install(stage(cache, name, v))
    cache.pin("m", 1)
    removed: list[str] = []
    # Each removal "frees" 100 bytes: asking for 250 more than free takes three removals.
    start = sum(len(cache.versions(n)) for n in cache.names())
    free = lambda: 100 * (start - sum(len(cache.versions(n)) for n in cache.names()))  # noqa: E731
    removed = make_room(cache, 250, prefer="m", margin=0, statvfs=fake_statvfs(free))
    assert [r.split(" to ")[0] for r in removed] == ["removed m v2", "removed other v1", "removed other v2"]
    assert cache.versions("m") == [1, 3, 4] and cache.versions("other") == [3, 4]
    # Nothing more may go (m: pinned v1, previous v3, active v4; other: previous v3, active v4).
    with pytest.raises(CacheError, match=r"0 bytes free, 1 needed .* even with the 0 old versions"):
        make_room(cache, 1, prefer="m", margin=0, statvfs=fake_statvfs(lambda: 0))


def test_a_download_needs_room_only_for_what_it_has_not_written_yet(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "state")
    partial = cache.staging_root() / "download-x.bundle"
    partial.write_bytes(b"\0" * 600)
    assert make_room_for_download(cache, partial, 1000, statvfs=fake_statvfs(lambda: 400 + MARGIN_BYTES)) == []
    with pytest.raises(CacheError, match=rf"{400 + MARGIN_BYTES} bytes free, {401 + MARGIN_BYTES} needed"):
        make_room_for_download(cache, partial, 1001, statvfs=fake_statvfs(lambda: 400 + MARGIN_BYTES))
    assert make_room_for_download(cache, partial, None, statvfs=fake_statvfs(lambda: 0)) == []

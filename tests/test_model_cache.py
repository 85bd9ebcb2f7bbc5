"""ModelCache: install/activate/rollback, anti-rollback, gc, bit rot, recovery, kill -9."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_runtime._util.fsutil import sha256_file
from edge_runtime.bundle.manifest import FileEntry, Manifest, StagedBundle
from edge_runtime.bundle.manifest_parse import parse_manifest
from edge_runtime.cache.versions import ACTIVATE_STEPS, INSTALL_STEPS, ROLLBACK_STEPS, ModelCache
from edge_runtime.errors import CacheError, GateError, IntegrityError, RollbackError

CHILD = Path(__file__).with_name("cache_crash_child.py")


def stage(cache: ModelCache, name: str, version: int, files: dict[str, bytes] | None = None) -> StagedBundle:
    """A verified-looking staged bundle, as the bundle reader would leave it."""
    if files is None:
        files = {"model.onnx": f"model {name} v{version}".encode() * 100, "extra/labels.txt": b"cat\ndog\n"}
    directory = Path(tempfile.mkdtemp(prefix="bundle-", dir=cache.staging_root()))
    for rel, data in files.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)
    entries = {rel: FileEntry(*sha256_file(directory / rel)) for rel in files}
    model = "model.onnx" if "model.onnx" in files else next(iter(files))
    raw = Manifest(name=name, version=version, format="onnx", model=model, files=entries).to_json()
    (directory / "manifest.json").write_bytes(raw)
    (directory / "manifest.sig").write_bytes(b"not checked by the cache")
    return StagedBundle(parse_manifest(raw), raw, b"sig", directory)


@pytest.fixture()
def cache(tmp_path: Path) -> ModelCache:
    return ModelCache(tmp_path / "state")


def three_versions(state: Path) -> ModelCache:
    """m v1, v2, v3 installed; v3 active, v2 previous."""
    cache = ModelCache(state)
    for v in (1, 2, 3):
        cache.install(stage(cache, "m", v))
    assert (cache.active_version("m"), cache.previous_version("m")) == (3, 2)
    return cache


def snapshot(cache: ModelCache) -> dict[str, object]:
    """Everything observable about model 'm', to compare before/after a refused op."""
    return {
        "versions": cache.versions("m"),
        "active": cache.active_version("m"),
        "previous": cache.previous_version("m"),
        "floor": cache.floor("m"),
        "staging": sorted(p.name for p in cache.staging_root().iterdir()),
    }


# ------------------------------------------------------------ install / activate


def test_install_activates_and_keeps_previous(cache: ModelCache) -> None:
    assert cache.install(stage(cache, "m", 1)) == 1
    assert cache.install(stage(cache, "m", 2)) == 2
    assert (cache.active_version("m"), cache.previous_version("m")) == (2, 1)
    assert cache.versions("m") == [1, 2]
    assert cache.names() == ["m"]
    assert cache.manifest("m", 2).version == 2
    cache.verify_version("m", 2)
    assert os.readlink(cache.version_dir("m", 2).parent / "active") == "2"
    assert list(cache.staging_root().iterdir()) == []


def test_install_a_real_model(cache: ModelCache, zoo: Callable[[str], Path]) -> None:
    staged = stage(cache, "cls", 7, {"model.onnx": zoo("ppocr_cls").read_bytes()})
    cache.install(staged)
    cache.verify_version("cls", 7)
    assert cache.manifest("cls", 7).files["model.onnx"].sha256 == sha256_file(zoo("ppocr_cls"))[0]


def test_install_without_activation(cache: ModelCache) -> None:
    cache.install(stage(cache, "m", 1))
    cache.install(stage(cache, "m", 2), activate=False)
    assert (cache.active_version("m"), cache.previous_version("m")) == (1, None)
    assert cache.versions("m") == [1, 2]


def test_list_models(cache: ModelCache) -> None:
    cache.install(stage(cache, "a", 1))
    cache.install(stage(cache, "a", 2))
    cache.install(stage(cache, "b", 5))
    cache.pin("a", 1)
    rows = {r.name: r for r in cache.list_models()}
    assert rows["a"].versions == (1, 2) and rows["a"].active == 2 and rows["a"].previous == 1
    assert rows["a"].pinned == 1 and rows["a"].floor == 2 and rows["a"].problems == ()
    assert rows["b"].active == 5 and rows["b"].previous is None and rows["b"].floor == 5


def test_activate_any_cached_version_runs_check_first(cache: ModelCache) -> None:
    three_versions(cache.state_dir)
    seen: list[tuple[Path, int]] = []
    cache.activate("m", 1, check=lambda d, m: seen.append((d, m.version)))
    assert seen == [(cache.version_dir("m", 1), 1)]
    assert (cache.active_version("m"), cache.previous_version("m")) == (1, 3)

    def refuse(d: Path, m: Manifest) -> None:
        raise GateError("golden case 0 failed")

    with pytest.raises(GateError):
        cache.activate("m", 2, check=refuse)
    assert cache.active_version("m") == 1
    with pytest.raises(CacheError, match="not in the cache"):
        cache.activate("m", 9)


def test_rollback_swaps_with_previous_and_ignores_floor(cache: ModelCache) -> None:
    three_versions(cache.state_dir)
    assert cache.rollback("m") == 2
    assert (cache.active_version("m"), cache.previous_version("m")) == (2, 3)
    assert cache.rollback("m") == 3  # a rollback can be undone
    assert cache.rollback("m", 1) == 1  # below the floor, but cached: allowed
    assert cache.floor("m") == 3
    with pytest.raises(CacheError, match="not in the cache"):
        cache.rollback("m", 4)


def test_rollback_without_previous_is_refused(cache: ModelCache) -> None:
    cache.install(stage(cache, "m", 1))
    with pytest.raises(CacheError, match="no previous version"):
        cache.rollback("m")


def test_invalid_names_are_refused(cache: ModelCache) -> None:
    for name in ("../etc", "a/b", "", ".hidden"):
        with pytest.raises(CacheError, match="not valid"):
            cache.version_dir(name, 1)
    with pytest.raises(CacheError, match="not valid"):
        cache.version_dir("m", 0)


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize("version", [2, 1])
def test_anti_rollback_refuses_equal_and_lower(cache: ModelCache, version: int) -> None:
    cache.install(stage(cache, "m", 2))
    before = snapshot(cache)
    with pytest.raises(RollbackError, match="anti-rollback floor 2"):
        cache.install(stage(cache, "m", version))
    assert snapshot(cache) == before


def test_floor_survives_restart_and_deleted_versions(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "state")
    cache.install(stage(cache, "m", 1))
    cache.install(stage(cache, "m", 5))
    for v in (1, 5):
        cache.version_dir("m", v).rename(tmp_path / f"gone{v}")
    reopened = ModelCache(tmp_path / "state")
    assert reopened.floor("m") == 5
    with pytest.raises(RollbackError):
        reopened.install(stage(reopened, "m", 5))
    assert reopened.install(stage(reopened, "m", 6)) == 6


def test_floor_survives_a_lost_state_file(cache: ModelCache) -> None:
    cache.install(stage(cache, "m", 4))
    cache.state.path.unlink()
    assert cache.floor("m") == 4
    with pytest.raises(RollbackError):
        cache.install(stage(cache, "m", 3))
    assert cache.recover() == ["m: raised anti-rollback floor to installed version 4"]
    assert cache.state.load().model("m").highest == 4


def test_failing_check_leaves_everything_untouched(cache: ModelCache) -> None:
    cache.install(stage(cache, "m", 1))
    before = snapshot(cache)
    calls: list[Path] = []

    def custom_op(directory: Path, manifest: Manifest) -> None:
        calls.append(directory)
        assert (directory / "model.onnx").is_file()
        raise GateError("model uses custom op 'Foo'")

    with pytest.raises(GateError, match="custom op"):
        cache.install(stage(cache, "m", 2), check=custom_op)
    assert len(calls) == 1
    assert snapshot(cache) == before
    assert not cache.version_dir("m", 2).exists()


@pytest.mark.parametrize("step", INSTALL_STEPS[: INSTALL_STEPS.index("install:renamed")])
def test_error_before_rename_changes_nothing(tmp_path: Path, step: str) -> None:
    def fail(at: str) -> None:
        if at == step:
            raise OSError("disk on fire")

    three_versions(tmp_path / "state")
    cache = ModelCache(tmp_path / "state", fault=fail)
    before = snapshot(cache)
    with pytest.raises(OSError, match="disk on fire"):
        cache.install(stage(cache, "m", 4))
    assert snapshot(cache) == before


def test_staged_dir_must_match_its_manifest(cache: ModelCache) -> None:
    staged = stage(cache, "m", 1)
    (staged.directory / "unlisted.bin").write_bytes(b"x")
    with pytest.raises(IntegrityError, match=r"unlisted\.bin: not listed"):
        cache.install(staged)
    assert list(cache.staging_root().iterdir()) == []
    staged = stage(cache, "m", 1)
    (staged.directory / "model.onnx").write_bytes(b"short")
    with pytest.raises(IntegrityError, match=r"model\.onnx: size 5 differs"):
        cache.install(staged)
    assert cache.versions("m") == []


def test_staged_dir_outside_staging_is_refused_and_kept(cache: ModelCache, tmp_path: Path) -> None:
    staged = stage(cache, "m", 1)
    outside = tmp_path / "elsewhere"
    staged.directory.rename(outside)
    with pytest.raises(CacheError, match="not a directory under"):
        cache.install(StagedBundle(staged.manifest, staged.manifest_bytes, b"", outside))
    assert (outside / "model.onnx").is_file()


def test_staged_link_is_refused(cache: ModelCache) -> None:
    staged = stage(cache, "m", 1)
    alias = cache.staging_root() / "alias"
    alias.symlink_to(staged.directory)
    with pytest.raises(CacheError, match="not a directory under"):
        cache.install(StagedBundle(staged.manifest, staged.manifest_bytes, b"", alias))
    assert cache.versions("m") == []


def test_nested_staged_dir_is_installed_and_its_parent_removed(cache: ModelCache) -> None:
    staged = stage(cache, "m", 1)
    holder = cache.staging_root() / "download-1"
    holder.mkdir()
    (holder / "bundle.tar").write_bytes(b"tar")
    nested = holder / "unpacked"
    staged.directory.rename(nested)
    cache.install(StagedBundle(staged.manifest, staged.manifest_bytes, b"", nested))
    cache.verify_version("m", 1)
    assert list(cache.staging_root().iterdir()) == []


def test_keep_versions_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="keep_versions"):
        ModelCache(tmp_path, keep_versions=0)


# ------------------------------------------------------------------------ gc


def test_gc_keeps_newest_n_plus_active_previous_pinned(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "state", keep_versions=2)
    cache.install(stage(cache, "m", 1))
    cache.install(stage(cache, "m", 2))  # active 2, previous 1
    cache.install(stage(cache, "m", 3), activate=False)
    cache.install(stage(cache, "m", 4), activate=False)
    assert cache.versions("m") == [1, 2, 3, 4]  # 1 previous, 2 active, 3-4 newest
    cache.install(stage(cache, "m", 5), activate=False)
    assert cache.versions("m") == [1, 2, 4, 5]
    cache.pin("m", 4)
    cache.install(stage(cache, "m", 6))  # active 6, previous 2
    assert cache.versions("m") == [2, 4, 5, 6]
    cache.pin("m", None)
    assert cache.gc("m") == [4]
    assert cache.versions("m") == [2, 5, 6]


def test_gc_keeps_probation_versions(tmp_path: Path) -> None:
    from edge_runtime.cache.state import Probation

    cache = ModelCache(tmp_path / "state", keep_versions=1)
    cache.install(stage(cache, "m", 1))
    cache.install(stage(cache, "m", 2))
    cache.state.update(lambda s: s.with_model("m", probation=Probation(2, 1, 0.0)))
    cache.install(stage(cache, "m", 3))  # active 3, previous 2; 1 only kept by probation
    assert cache.versions("m") == [1, 2, 3]
    cache.state.update(lambda s: s.with_model("m", probation=None))
    assert cache.gc("m") == [1]


# ------------------------------------------------------------------ bit rot


def flip_byte(path: Path, offset: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_bit_rot_is_caught_and_names_the_file(cache: ModelCache) -> None:
    three_versions(cache.state_dir)
    flip_byte(cache.version_dir("m", 2) / "model.onnx")
    with pytest.raises(IntegrityError, match=r"m/2/model\.onnx: sha256 does not match"):
        cache.verify_version("m", 2)
    results = {(n, v): e for n, v, e in cache.verify_all()}
    assert results[("m", 1)] is None and results[("m", 3)] is None
    assert isinstance(results[("m", 2)], IntegrityError)
    with pytest.raises(IntegrityError):
        cache.rollback("m")  # never switch to a rotten version
    assert cache.active_version("m") == 3


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: (d / "extra" / "labels.txt").unlink(), id="missing-file"),
        pytest.param(lambda d: (d / "stray.bin").write_bytes(b"x"), id="extra-file"),
        pytest.param(lambda d: (d / "manifest.json").write_bytes(b"{"), id="bad-manifest"),
        pytest.param(lambda d: (d / "manifest.json").write_bytes(b" " * (2 << 20)), id="huge-manifest"),
        pytest.param(lambda d: (d / "manifest.sig").unlink(), id="missing-sig"),
    ],
)
def test_incomplete_version_fails_verification(cache: ModelCache, damage: Callable[[Path], object]) -> None:
    cache.install(stage(cache, "m", 1))
    damage(cache.version_dir("m", 1))
    with pytest.raises(IntegrityError):
        cache.verify_version("m", 1)


def test_symlinked_payload_fails_verification(cache: ModelCache, tmp_path: Path) -> None:
    cache.install(stage(cache, "m", 1))
    model = cache.version_dir("m", 1) / "model.onnx"
    (tmp_path / "copy").write_bytes(model.read_bytes())
    model.unlink()
    model.symlink_to(tmp_path / "copy")
    with pytest.raises(IntegrityError, match="symlink"):
        cache.verify_version("m", 1)


# ------------------------------------------------------------------ recover


def link(cache: ModelCache, which: str, target: str) -> None:
    path = cache.version_dir("m", 1).parent / which
    path.unlink()
    os.symlink(target, path)


@pytest.mark.parametrize("target", ["9", "../../etc", "/etc", "3/", "./3", "03"])
def test_recover_replaces_a_bad_active_with_previous(cache: ModelCache, target: str) -> None:
    three_versions(cache.state_dir)
    link(cache, "active", target)
    with pytest.raises(CacheError, match=r"corrupt|dangling"):
        cache.active_version("m")  # never followed, never half-trusted
    notes = cache.recover()
    assert any("activated version 2" in n for n in notes), notes
    assert cache.active_version("m") == 2
    assert cache.previous_version("m") is None  # it became active
    assert os.readlink(cache.version_dir("m", 2).parent / "active") == "2"


def test_recover_replaces_a_directory_named_active(cache: ModelCache) -> None:
    three_versions(cache.state_dir)
    active = cache.version_dir("m", 1).parent / "active"
    active.unlink()
    active.mkdir()
    cache.recover()
    assert cache.active_version("m") == 2


def test_recover_skips_a_rotten_active_and_previous(cache: ModelCache) -> None:
    three_versions(cache.state_dir)
    flip_byte(cache.version_dir("m", 3) / "model.onnx")
    flip_byte(cache.version_dir("m", 2) / "model.onnx")
    notes = cache.recover()
    assert cache.active_version("m") == 1
    assert any("active version 3 is invalid" in n for n in notes), notes


def test_recover_with_nothing_valid_leaves_no_active(cache: ModelCache) -> None:
    cache.install(stage(cache, "m", 1))
    flip_byte(cache.version_dir("m", 1) / "model.onnx")
    cache.recover()
    assert cache.active_version("m") is None


def test_recover_removes_leftovers(cache: ModelCache) -> None:
    cache.install(stage(cache, "m", 1))
    leftover = stage(cache, "m", 2).directory
    ndir = cache.version_dir("m", 1).parent
    os.symlink("1", ndir / ".active.4242.tmp")
    (ndir / ".trash-7-4242").mkdir()
    (cache.state_dir / ".state.json.4242.tmp").write_bytes(b"{")
    notes = cache.recover()
    assert f"removed staging leftover {leftover.name}" in notes
    assert list(cache.staging_root().iterdir()) == []
    assert sorted(p.name for p in ndir.iterdir()) == ["1", "active"]
    assert not (cache.state_dir / ".state.json.4242.tmp").exists()
    assert cache.recover() == []  # idempotent: nothing left to repair


def test_permissions_are_private(cache: ModelCache) -> None:
    old_umask = os.umask(0o022)  # stage() then writes 0644 files; install must tighten them
    try:
        cache.install(stage(cache, "m", 1))
        cache.pin("m", 1)
    finally:
        os.umask(old_umask)
    for path in [cache.state_dir, *cache.state_dir.rglob("*")]:
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


def test_corrupt_state_blocks_installs_instead_of_resetting_floor(cache: ModelCache) -> None:
    cache.install(stage(cache, "m", 3))
    cache.state.path.write_bytes(b"{not json")
    with pytest.raises(CacheError, match="state file is corrupt"):
        cache.install(stage(cache, "m", 1))
    assert cache.state.path.read_bytes() == b"{not json"
    assert list(cache.staging_root().iterdir()) == []
    assert cache.versions("m") == [3]


# ------------------------------------------------------------------- kill -9


def crash(state: Path, step: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, str(CHILD), str(state), step, *args], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, f"step {step!r} never fired: {proc.stderr.decode()}"


def check_consistent(cache: ModelCache, expected_active: int) -> None:
    """After recover(): one valid active version, no leftovers, every version complete."""
    cache.recover()
    assert cache.active_version("m") == expected_active
    ndir = cache.version_dir("m", 1).parent
    assert os.readlink(ndir / "active") == str(expected_active)
    assert [e for e in cache.verify_all() if e[2] is not None] == []
    assert [p.name for p in ndir.iterdir() if p.name.startswith(".")] == []
    assert list(cache.staging_root().iterdir()) == []


@pytest.mark.parametrize("step", INSTALL_STEPS)
def test_kill_during_install(tmp_path: Path, step: str) -> None:
    state = tmp_path / "state"
    cache = three_versions(state)
    # keep=2 in the child so gc really deletes (v1 and v2) and its steps fire.
    crash(state, step, "install", str(stage(cache, "m", 4).directory), "--keep", "2")
    after = ModelCache(state)
    committed = INSTALL_STEPS.index(step) >= INSTALL_STEPS.index("install:renamed")
    switched = INSTALL_STEPS.index(step) >= INSTALL_STEPS.index("install:active-set")
    check_consistent(after, 4 if switched else 3)
    assert (4 in after.versions("m")) == committed
    assert after.floor("m") == (4 if committed else 3)
    # The cache still works: a newer install, and back again by operator action.
    after.install(stage(after, "m", 5))
    assert after.active_version("m") == 5
    after.activate("m", 3)
    assert after.active_version("m") == 3


@pytest.mark.parametrize("step", ACTIVATE_STEPS)
def test_kill_during_activate(tmp_path: Path, step: str) -> None:
    state = tmp_path / "state"
    three_versions(state)
    crash(state, step, "activate", "1")
    after = ModelCache(state)
    check_consistent(after, 1 if step == "activate:active-set" else 3)
    after.install(stage(after, "m", 4))
    assert after.active_version("m") == 4


@pytest.mark.parametrize("step", ROLLBACK_STEPS)
def test_kill_during_rollback(tmp_path: Path, step: str) -> None:
    state = tmp_path / "state"
    three_versions(state)
    crash(state, step, "rollback")
    after = ModelCache(state)
    check_consistent(after, 2 if step == "rollback:active-set" else 3)
    after.activate("m", 1)
    assert after.active_version("m") == 1

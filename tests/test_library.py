"""edge_runtime as a library: the public names, and the real models loaded, run and refused through them."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import PPOCR_SPEC, Device, cli, make_device

import edge_runtime

REPO = Path(__file__).resolve().parent.parent

# The public API. Changing this list is a change users see: it must be deliberate.
PUBLIC = [
    "BundleError",
    "CacheError",
    "ConfigError",
    "EdgeRuntimeError",
    "InputError",
    "Model",
    "ModelError",
    "ModelMetadata",
    "SignatureError",
    "TensorMetadata",
    "__version__",
    "load_model",
    "open_bundle",
]


@pytest.fixture()
def device(tmp_path: Path, keys: dict[str, Path]) -> Device:
    return make_device(tmp_path, keys)


@pytest.fixture()
def private_tmp(tmp_path: Path) -> Iterator[Path]:
    """tempfile's dir pointed at an empty folder, so staging dirs left behind are visible."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    saved, tempfile.tempdir = tempfile.tempdir, str(folder)
    yield folder
    tempfile.tempdir = saved


def pack_ppocr(dev: Device, zoo: Callable[[str], Path], version: int, key: str = "a") -> Path:
    spec = dev.root / "ppocr.toml"
    (dev.root / "labels.txt").write_text("0\n180\n")
    spec.write_text('labels = "labels.txt"\n' + PPOCR_SPEC)
    out = dev.root / f"ppocr-v{version}-{key}.bundle"
    cli("bundle", "pack", "--model", zoo("ppocr_cls"), "--name", "ppocr-cls", "--version", version,
        "--key", dev.keys[key], "--spec", spec, "-o", out)
    return out


def _same_result(library: dict[str, object], printed: dict[str, object]) -> None:
    # The same computation in another process: equal up to float noise.
    assert json.loads(json.dumps(library)).keys() == printed.keys()
    lib_top, cli_top = library["top"], printed["top"]
    assert isinstance(lib_top, list) and isinstance(cli_top, list)
    assert [t["index"] for t in lib_top] == [t["index"] for t in cli_top]
    assert [t["score"] for t in lib_top] == pytest.approx([t["score"] for t in cli_top], abs=1e-5)


def test_public_names_are_guarded_and_documented() -> None:
    assert edge_runtime.__all__ == PUBLIC
    for name in PUBLIC:
        value = getattr(edge_runtime, name)
        if name != "__version__":
            assert (value.__doc__ or "").strip(), f"edge_runtime.{name} has no docstring"
            assert value.__module__.startswith("edge_runtime."), name
    stub = ast.parse((REPO / "edge_runtime" / "__init__.pyi").read_text())
    typed = {a.asname for n in stub.body if isinstance(n, ast.ImportFrom) for a in n.names}
    typed |= {n.target.id for n in stub.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    assert typed == set(PUBLIC) | {"__all__"}, "edge_runtime/__init__.pyi must type exactly the public names"
    with pytest.raises(AttributeError):
        _ = edge_runtime.LoadedModel  # type: ignore[attr-defined]


def test_import_edge_runtime_loads_nothing_else() -> None:
    code = "import sys, edge_runtime; print(sorted(m for m in sys.modules if m.startswith('edge_runtime.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_load_installed_model_matches_cli_run(device: Device, zoo: Callable[[str], Path]) -> None:
    device.cli("models", "install", pack_ppocr(device, zoo, 1))
    device.cli("models", "install", pack_ppocr(device, zoo, 2))
    image = zoo("grace_hopper")
    printed = json.loads(device.cli("run", "--model", "ppocr-cls", image).stdout)
    with edge_runtime.load_model("ppocr-cls", state_dir=device.state, trust_dir=device.keys["trust_dir"]) as model:
        meta = model.metadata
        assert (meta.name, meta.version, meta.format, meta.labels) == ("ppocr-cls", 2, "onnx", ("0", "180"))
        assert [(t.name, t.dtype, t.shape[1:]) for t in meta.inputs] == [("x", "float32", (3, None, None))]
        (result,) = model.predict(image.read_bytes())
        _same_result(result, printed["result"])
        outputs = model.infer({"x": np.zeros((1, 3, 48, 192), np.float32)})
        assert list(outputs) == [t.name for t in meta.outputs] and outputs[meta.outputs[0].name].shape == (1, 2)
    with edge_runtime.load_model("ppocr-cls", state_dir=str(device.state), trust_dir=str(device.keys["trust_dir"]),
                                 version=1) as old:
        assert old.version == 1 and repr(old) == "<edge_runtime.Model ppocr-cls v1>"


def test_open_bundle_runs_without_installing_and_cleans_up(device: Device, zoo: Callable[[str], Path],
                                                           private_tmp: Path) -> None:
    bundle = pack_ppocr(device, zoo, 1)
    image = zoo("grace_hopper")
    with edge_runtime.open_bundle(bundle, trust_dir=device.keys["trust_dir"]) as model:
        assert (model.name, model.version) == ("ppocr-cls", 1)
        assert len(list(private_tmp.iterdir())) == 1  # the private staging dir
        (result,) = model.predict(image.read_bytes())
    assert list(private_tmp.iterdir()) == []
    assert not (device.state / "models").exists()  # nothing installed
    device.cli("models", "install", bundle)
    _same_result(result, json.loads(device.cli("run", image).stdout)["result"])


def _one_line(error: BaseException) -> str:
    assert isinstance(error, edge_runtime.EdgeRuntimeError)
    text = str(error)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_errors_are_public_types_with_one_line_messages(device: Device, zoo: Callable[[str], Path],
                                                        private_tmp: Path) -> None:
    trust = device.keys["trust_dir"]
    with pytest.raises(edge_runtime.CacheError) as unknown:
        edge_runtime.load_model("nope", state_dir=device.state, trust_dir=trust)
    assert "'nope'" in _one_line(unknown.value)

    untrusted = pack_ppocr(device, zoo, 1, key="evil")
    with pytest.raises(edge_runtime.SignatureError) as refused:
        edge_runtime.open_bundle(untrusted, trust_dir=trust)
    assert "untrusted" in _one_line(refused.value)
    assert list(private_tmp.iterdir()) == []  # a refused bundle leaves no staging behind

    device.cli("models", "install", pack_ppocr(device, zoo, 1))
    with pytest.raises(edge_runtime.CacheError) as missing:
        edge_runtime.load_model("ppocr-cls", state_dir=device.state, trust_dir=trust, version=7)
    _one_line(missing.value)
    model_file = device.state / "models" / "ppocr-cls" / "1" / "model.onnx"
    os.chmod(model_file, 0o600)
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0x40
    model_file.write_bytes(bytes(data))
    with pytest.raises(edge_runtime.BundleError) as rotten:  # re-verified as the daemon does: bit rot is refused
        edge_runtime.load_model("ppocr-cls", state_dir=device.state, trust_dir=trust)
    assert "sha256" in _one_line(rotten.value)
    with edge_runtime.open_bundle(pack_ppocr(device, zoo, 2), trust_dir=trust) as model, \
            pytest.raises(edge_runtime.InputError) as bad:
        model.predict(b"not an image")
    _one_line(bad.value)


def test_readme_library_example_runs(device: Device, zoo: Callable[[str], Path]) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Use as a library"):]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)[:1]
    device.cli("models", "install", pack_ppocr(device, zoo, 1))
    code = (code.replace("/var/lib/edge-runtime", str(device.state))
            .replace("/etc/edge-runtime/trust", str(device.keys["trust_dir"]))
            .replace('"photo.jpg"', repr(str(zoo("grace_hopper")))).replace('"face"', '"ppocr-cls"'))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-800:]
    assert "ppocr-cls v1" in out.stdout

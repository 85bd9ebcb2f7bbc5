"""The CLI end to end, in real subprocesses, on real models and real images."""

from __future__ import annotations

import json
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from bundle_helpers import Member, encode, head, manifest_doc, member_offsets, payload_members, write_tar
from cli_helpers import FACE_SPEC, PPOCR_SPEC, Device, bare_face_outputs, cli, face_tensor, make_device

from edge_runtime.bundle.signing import load_private_key


@pytest.fixture()
def device(tmp_path: Path, keys: dict[str, Path]) -> Device:
    return make_device(tmp_path, keys)


def pack_face(dev: Device, zoo: Callable[[str], Path], version: int, *extra: str | Path) -> Path:
    spec = dev.root / "face.toml"
    spec.write_text(FACE_SPEC)
    hopper = zoo("grace_hopper")
    expected = dev.root / "face-expected.npz"
    np.savez(expected, **bare_face_outputs(zoo("face_detection"), face_tensor(hopper)))
    out = dev.root / f"face-v{version}.bundle"
    cli("bundle", "pack", "--model", zoo("face_detection"), "--name", "face", "--version", version,
        "--key", dev.keys["a"], "--spec", spec, "--golden", hopper, expected, "-o", out, *extra)
    return out


def pack_ppocr(dev: Device, zoo: Callable[[str], Path], version: int, key: str = "a") -> Path:
    spec = dev.root / "ppocr.toml"
    spec.write_text(PPOCR_SPEC)
    out = dev.root / f"ppocr-v{version}.bundle"
    cli("bundle", "pack", "--model", zoo("ppocr_cls"), "--name", "ppocr-cls", "--version", version,
        "--key", dev.keys[key], "--spec", spec, "-o", out)
    return out


def test_keygen_writes_private_key_0600_and_refuses_overwrite(tmp_path: Path) -> None:
    key = tmp_path / "publisher.key"
    out = cli("bundle", "keygen", key)
    assert len(out.stdout.strip()) == 64
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PUBLIC KEY" in (tmp_path / "publisher.key.pub").read_bytes()
    again = cli("bundle", "keygen", key, check=False)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_face_detection_end_to_end_on_grace_hopper(device: Device, zoo: Callable[[str], Path]) -> None:
    bundle = pack_face(device, zoo, 1)
    inspected = json.loads(cli("bundle", "inspect", bundle, "--json").stdout)
    assert inspected["manifest"]["name"] == "face" and inspected["manifest"]["golden"]
    verified = json.loads(device.cli("bundle", "verify", bundle, "--json").stdout)
    assert verified["ok"] is True
    installed = json.loads(device.cli("models", "install", bundle, "--json").stdout)
    assert installed["active"] is True and installed["gates"]["golden_passed"] == 1
    out = device.cli("run", zoo("grace_hopper"))
    record = json.loads(out.stdout)
    assert record["model"] == "face" and record["version"] == 1
    assert record["result"]["top"][0]["score"] > 0.8
    assert record["latency_ms"]["total"] > 0


def test_onnx_run_matches_bare_onnxruntime(device: Device, zoo: Callable[[str], Path]) -> None:
    import cv2
    import onnxruntime as ort

    device.cli("models", "install", pack_ppocr(device, zoo, 1))
    record = json.loads(device.cli("run", "--model", "ppocr-cls", zoo("grace_hopper")).stdout)
    bgr = cv2.imread(str(zoo("grace_hopper")))
    x = ((cv2.resize(bgr, (192, 48)).astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)[None]
    bare = ort.InferenceSession(str(zoo("ppocr_cls")), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0][0]
    top = record["result"]["top"]
    assert top[0]["index"] == int(np.argmax(bare))
    assert top[0]["score"] == pytest.approx(float(bare.max()), abs=1e-5)


def test_run_npy_tensor_and_bad_input_is_one_line_error(device: Device, zoo: Callable[[str], Path]) -> None:
    device.cli("models", "install", pack_face(device, zoo, 1))
    tensor = device.root / "x.npy"
    np.save(tensor, face_tensor(zoo("grace_hopper"))[0])  # no batch dim: the runtime adds it
    bad = device.root / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(100))
    out = device.cli("run", tensor, bad, check=False)
    good, broken = (json.loads(line) for line in out.stdout.splitlines())
    assert good["result"]["top"][0]["score"] > 0.8
    assert "error" in broken and out.returncode == 1
    assert [line for line in out.stderr.splitlines() if "error" in line.lower()] == [
        f"error: {bad}: corrupt JPEG: bad marker"
    ]


def test_activate_rollback_list_and_verify_bit_rot(device: Device, zoo: Callable[[str], Path]) -> None:
    device.cli("models", "install", pack_ppocr(device, zoo, 1))
    device.cli("models", "install", pack_ppocr(device, zoo, 2))
    (entry,) = device.models()
    assert (entry["active"], entry["previous"], entry["floor"]) == (2, 1, 2)
    device.cli("models", "rollback", "ppocr-cls")
    assert device.models()[0]["active"] == 1
    device.cli("models", "activate", "ppocr-cls", "2")
    assert device.models()[0]["active"] == 2
    assert device.cli("models", "verify").returncode == 0
    model = device.state / "models" / "ppocr-cls" / "2" / "model.onnx"
    os.chmod(model, 0o600)
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x40
    model.write_bytes(bytes(data))
    out = device.cli("models", "verify", check=False)
    assert out.returncode == 1 and "CORRUPT" in out.stdout and "model.onnx" in out.stdout
    served = device.cli("run", zoo("grace_hopper"), check=False)
    assert served.returncode == 1 and "sha256" in served.stderr  # bit rot is caught, not served


# --------------------------------------------------------------------------- hostile bundles


def _payload(zoo: Callable[[str], Path]) -> dict[str, bytes]:
    return {"model.onnx": zoo("ppocr_cls").read_bytes(), "labels.txt": b"0\n180\n"}


def _bundle(dev: Device, zoo: Callable[[str], Path], members_fn: Callable[[list[Member]], list[Member]] | None = None,
            key: str = "a", version: int = 3) -> Path:
    payload = _payload(zoo)
    manifest = encode(manifest_doc(payload, version=version))
    members = head(manifest, [load_private_key(dev.keys[key])]) + payload_members(payload)
    if members_fn:
        members = members_fn(members)
    return write_tar(dev.root / "crafted.bundle", members)


def _flip_in(path: Path, member: str, at: int = 0) -> Path:
    _, data_off, size = member_offsets(path)[member]
    raw = bytearray(path.read_bytes())
    raw[data_off + (at if at >= 0 else size // 2)] ^= 0x01
    path.write_bytes(bytes(raw))
    return path


def _flip_signature(path: Path) -> Path:
    raw = path.read_bytes()
    at = raw.index(b'"sig": "') + len(b'"sig": "') + 5
    b = bytearray(raw)
    b[at] = ord("A") if b[at] != ord("A") else ord("B")
    path.write_bytes(bytes(b))
    return path


def _with(extra: Member) -> Callable[[list[Member]], list[Member]]:
    return lambda members: [*members, extra]


def _replace(name: str, new: Member) -> Callable[[list[Member]], list[Member]]:
    return lambda members: [new if m.name == name else m for m in members]


CASES: dict[str, tuple[Callable[[Device, Callable[[str], Path]], Path], str]] = {
    "flipped model byte": (lambda d, z: _flip_in(_bundle(d, z), "model.onnx", -1), "sha256"),
    "flipped manifest byte": (lambda d, z: _flip_in(_bundle(d, z), "manifest.json", 10), "signature"),
    "flipped signature byte": (lambda d, z: _flip_signature(_bundle(d, z)), "signature"),
    "untrusted key": (lambda d, z: _bundle(d, z, key="evil"), "untrusted"),
    "dot-dot member": (lambda d, z: _bundle(d, z, _with(Member("../x", b"x"))), "../x"),
    "absolute member": (lambda d, z: _bundle(d, z, _with(Member("/etc/x", b"x"))), "/etc/x"),
    "symlink member": (lambda d, z: _bundle(d, z, _replace("labels.txt", Member(
        "labels.txt", type=tarfile.SYMTYPE, linkname="/etc/passwd"))), "symbolic link"),
    "hardlink member": (lambda d, z: _bundle(d, z, _replace("labels.txt", Member(
        "labels.txt", type=tarfile.LNKTYPE, linkname="model.onnx"))), "hard"),
    "device member": (lambda d, z: _bundle(d, z, _replace("labels.txt", Member(
        "labels.txt", type=tarfile.CHRTYPE))), "device"),
    "duplicate member": (lambda d, z: _bundle(d, z, _with(Member("labels.txt", b"0\n180\n"))), "appears twice"),
    "unlisted member": (lambda d, z: _bundle(d, z, _with(Member("extra.bin", b"x"))), "not listed"),
    "member larger than declared": (lambda d, z: _bundle(d, z, _replace("labels.txt", Member(
        "labels.txt", b"0\n180\n" + b"x" * 4096))), "larger than the"),
    "version not above floor": (lambda d, z: _bundle(d, z, version=1), "floor"),
    "truncated": (lambda d, z: _truncate(_bundle(d, z)), "truncated"),
    "not a tar": (lambda d, z: _write(d, os.urandom(4096)), "not a tar"),
    "empty file": (lambda d, z: _write(d, b""), "empty"),
}


def _truncate(path: Path) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def _write(dev: Device, data: bytes) -> Path:
    path = dev.root / "crafted.bundle"
    path.write_bytes(data)
    return path


@pytest.fixture()
def serving(device: Device, zoo: Callable[[str], Path]) -> Device:
    """A device with ppocr-cls v1 installed and active (via the CLI)."""
    device.cli("models", "install", pack_ppocr(device, zoo, 1))
    return device


def _assert_refused(dev: Device, bundle: Path, message: str, before: dict[str, str]) -> None:
    out = dev.cli("models", "install", bundle, check=False)
    assert out.returncode == 1, out.stdout
    # LiteRT prints one INFO line of its own on stderr; ours is the one error line.
    lines = [line for line in out.stderr.strip().splitlines() if not line.startswith("INFO: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert message.lower() in lines[0].lower(), lines[0]
    assert dev.tree() == before
    assert list((dev.state / "staging").iterdir()) == []


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_bundle_refused_and_cache_untouched(serving: Device, zoo: Callable[[str], Path], case: str) -> None:
    build, message = CASES[case]
    before = serving.tree()
    _assert_refused(serving, build(serving, zoo), message, before)


def test_threshold_and_total_cap_from_config(tmp_path: Path, keys: dict[str, Path],
                                             zoo: Callable[[str], Path]) -> None:
    strict = make_device(tmp_path, keys, "[trust]\nthreshold = 2\n")
    bundle = pack_ppocr(strict, zoo, 1)
    before = strict.tree()
    _assert_refused(strict, bundle, "2 required", before)
    two = tmp_path / "two.bundle"
    cli("bundle", "pack", "--model", zoo("ppocr_cls"), "--name", "ppocr-cls", "--version", "1", "--key", keys["a"],
        "--key", keys["b"], "--spec", tmp_path / "ppocr.toml", "-o", two)
    strict.cli("models", "install", two)
    assert strict.models()[0]["active"] == 1
    capped = make_device(tmp_path / "capped", keys, "[limits]\nmax_bundle_bytes = 100000\n")
    _assert_refused(capped, two, "cap", {})


def test_refused_bundle_keeps_old_model_serving(serving: Device, zoo: Callable[[str], Path]) -> None:
    bad = _flip_in(_bundle(serving, zoo), "model.onnx", -1)
    assert serving.cli("models", "install", bad, check=False).returncode == 1
    record = json.loads(serving.cli("run", zoo("grace_hopper")).stdout)
    assert record["version"] == 1 and record["result"]["top"]


def test_custom_op_model_fails_activation_previous_stays(serving: Device, zoo: Callable[[str], Path],
                                                         tmp_path: Path) -> None:
    spec = tmp_path / "landmark.toml"
    spec.write_text('[[inputs]]\nname = "input_1"\nshape = [1, 192, 192, 3]\ndtype = "float32"\n'
                    '[[outputs]]\nname = "out"\nshape = [1]\ndtype = "float32"\n')
    bundle = tmp_path / "landmark.bundle"
    cli("bundle", "pack", "--model", zoo("face_landmark_attention"), "--name", "ppocr-cls", "--version", "5",
        "--key", serving.keys["a"], "--spec", spec, "-o", bundle)
    before = serving.tree()
    _assert_refused(serving, bundle, "Landmarks2TransformMatrix", before)
    assert json.loads(serving.cli("run", zoo("grace_hopper")).stdout)["version"] == 1


def test_onnx_external_data_refused_at_pack_and_install(serving: Device, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    # A MatMul whose weight lives in "../../etc/passwd"; serialised by hand because
    # onnx.save_model itself refuses such a location.
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../../etc/passwd"), ("offset", "0"), ("length", "64")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    path = tmp_path / "ext.onnx"
    path.write_bytes(model.SerializeToString())
    out = cli("bundle", "pack", "--model", path, "--name", "ppocr-cls", "--version", "9", "--key",
              serving.keys["a"], "-o", tmp_path / "ext.bundle", check=False)
    assert out.returncode == 1 and "external data" in out.stderr
    # A publisher tool that skips the check: craft the bundle by hand; the device refuses it too.
    payload = {"model.onnx": path.read_bytes()}
    manifest = encode(manifest_doc(payload, version=9, postprocess={"type": "raw"}))
    crafted = write_tar(tmp_path / "ext-crafted.bundle",
                        head(manifest, [load_private_key(serving.keys["a"])]) + payload_members(payload))
    _assert_refused(serving, crafted, "external data", serving.tree())


def test_config_check(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('state_dir = "/tmp/x"\n[trust]\nthreshold = 2\n')
    assert cli("config", "check", good).stdout.strip().endswith("OK")
    for text, needle in [("stat_dir = '/x'\n", "stat_dir"), ("[trust]\nthreshold = 0\n", "trust.threshold"),
                         ("[backend]\nthreads = 'two'\n", "backend.threads"), ("x = [", "invalid TOML"),
                         ("[mqtt]\nsession_expiry_seconds = 7200\ncommand_id_window_seconds = 3600\n",
                          "mqtt.session_expiry_seconds")]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        out = cli("config", "check", bad, check=False)
        assert out.returncode == 1 and needle in out.stderr and len(out.stderr.strip().splitlines()) == 1

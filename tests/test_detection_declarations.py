"""Bad detection/segmentation declarations are refused at ``bundle pack`` and at install, in one line.

Install is checked with bundles whose signed manifest carries the bad declaration (re-signed after the
edit, so only the head is wrong): a publisher with an older packer, or a hostile one, gets the same line.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from bundle_helpers import Member, write_tar
from cli_helpers import cli, make_device
from test_detection_oracles import readme_spec

from edge_runtime.bundle.signing import load_private_key, sign_document

Zoo = Callable[[str], Path]
FACE = readme_spec("### Face detector")
YOLO = readme_spec("### YOLO-style detector")

# (spec, model key, edit of the spec text, what the one line must name)
CASES: dict[str, tuple[str, str, tuple[str, str], str]] = {
    "anchors that do not add up": (FACE, "face_detection", ("strides = [8, 16, 16, 16]", "strides = [8, 16, 16]"),
                                   "generate 768 anchors for a 128x128 input, but output 'regressors' has 896"),
    "iou threshold above 1": (FACE, "face_detection", ("iou_threshold = 0.3", "iou_threshold = 1.5"),
                              "postprocess.detection.iou_threshold must be in (0, 1], got 1.5"),
    "iou threshold 0": (YOLO, "nudenet_320n", ("iou_threshold = 0.45", "iou_threshold = 0.0"),
                        "postprocess.detection.iou_threshold must be in (0, 1], got 0"),
    "score threshold 2": (FACE, "face_detection", ("score_threshold = 0.5", "score_threshold = 2.0"),
                          "postprocess.detection.score_threshold must be between 0 and 1, got 2"),
    "class count": (YOLO, "nudenet_320n", ("num_classes = 18", "num_classes = 80"),
                    "postprocess.detection.num_classes is 80, so a box has 84 values, but the head is [-1, 22, -1]"),
    "keypoints beyond the box tensor": (FACE, "face_detection", ("keypoints = 6", "keypoints = 7"),
                                        "postprocess.detection.keypoints 7 need 18 values per box"),
    "unknown output": (FACE, "face_detection", ('boxes = "regressors"', 'boxes = "boxes"'),
                       "postprocess.detection.boxes 'boxes' is not an output of the model"),
    "unknown key": (FACE, "face_detection", ("keypoints = 6", "keypoints = 6\nkeypoint = 6"),
                    "postprocess.detection.keypoint"),
}


def _spec(tmp_path: Path, text: str, labels: int | None = None) -> Path:
    if labels is not None:
        (tmp_path / "nudenet-labels.txt").write_text("".join(f"class{i}\n" for i in range(labels)))
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_pack_refuses_a_bad_head_in_one_line(case: str, zoo: Zoo, keys: dict[str, Path], tmp_path: Path) -> None:
    spec, key, (old, new), why = CASES[case]
    assert old in spec
    proc = cli("bundle", "pack", "--model", zoo(key), "--name", "m", "--version", 1, "--key", keys["a"],
               "--spec", _spec(tmp_path, spec.replace(old, new), labels=18), "-o", tmp_path / "m.bundle", check=False)
    assert proc.returncode == 1, proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and why in errors[0], proc.stderr
    assert not (tmp_path / "m.bundle").exists()


def test_pack_refuses_a_labels_file_shorter_than_the_classes(zoo: Zoo, keys: dict[str, Path],
                                                             tmp_path: Path) -> None:
    proc = cli("bundle", "pack", "--model", zoo("nudenet_320n"), "--name", "m", "--version", 1, "--key", keys["a"],
               "--spec", _spec(tmp_path, YOLO, labels=5), "-o", tmp_path / "m.bundle", check=False)
    assert proc.returncode == 1
    assert "postprocess.detection.num_classes is 18 but the labels file has 5 lines" in proc.stderr


def _resigned(bundle: Path, key: Path, edit: Callable[[dict], None], out: Path) -> Path:
    """``bundle`` as version 2, its manifest edited and signed again by ``key`` (payload untouched)."""
    with tarfile.open(bundle) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    doc = json.loads(members.pop("manifest.json"))
    members.pop("manifest.sig")
    edit(doc)
    doc["version"] = 2  # an update of the good version 1
    manifest = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    head = [Member("manifest.json", manifest), Member("manifest.sig", sign_document(manifest, [load_private_key(key)]))]
    return write_tar(out, head + [Member(n, d) for n, d in members.items()])


def _set(path: str, value: object) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        *parents, leaf = path.split(".")
        node = doc
        for part in parents:
            node = node[part]
        node[leaf] = value
    return edit


INSTALL_CASES = {
    "anchors": ("face_detection", FACE, _set("postprocess.detection.anchors.strides", [8, 16, 16]),
                "generate 768 anchors"),
    "iou threshold": ("face_detection", FACE, _set("postprocess.detection.iou_threshold", 1.5),
                      "postprocess.detection.iou_threshold must be in (0, 1], got 1.5"),
    "class count": ("nudenet_320n", YOLO, _set("postprocess.detection.num_classes", 80),
                    "postprocess.detection.num_classes is 80"),
    "unknown key": ("face_detection", FACE, _set("postprocess.detection.nms_kind", "hard"),
                    "postprocess.detection.nms_kind"),
    "head for another type": ("face_detection", FACE, _set("postprocess.type", "classification"),
                              "postprocess.detection is declared but postprocess.type is 'classification'"),
    "labels shorter than the classes": ("nudenet_320n", YOLO, lambda doc: None, "the labels file has 5 lines"),
}


@pytest.mark.parametrize("case", list(INSTALL_CASES))
def test_install_refuses_a_signed_bad_head_and_keeps_serving(case: str, zoo: Zoo, keys: dict[str, Path],
                                                             tmp_path: Path) -> None:
    key, spec, edit, why = INSTALL_CASES[case]
    labels = 5 if case.startswith("labels") else 18
    good = tmp_path / "good.bundle"
    if labels == 5:  # pack refuses this one: write the short labels file into a well-packed bundle instead
        cli("bundle", "pack", "--model", zoo(key), "--name", "m", "--version", 1, "--key", keys["a"],
            "--spec", _spec(tmp_path, spec, labels=18), "-o", good)
        short = "".join(f"class{i}\n" for i in range(5)).encode()

        def edit(doc: dict, short: bytes = short) -> None:
            import hashlib
            doc["files"]["labels.txt"] = {"sha256": hashlib.sha256(short).hexdigest(), "size": len(short)}
        bad = _resigned(good, keys["a"], edit, tmp_path / "bad.bundle")
        with tarfile.open(bad) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]  # type: ignore[union-attr]
        write_tar(bad, [Member(n, short if n == "labels.txt" else d) for n, d in members])
    else:
        cli("bundle", "pack", "--model", zoo(key), "--name", "m", "--version", 1, "--key", keys["a"],
            "--spec", _spec(tmp_path, spec, labels=18), "-o", good)
        bad = _resigned(good, keys["a"], edit, tmp_path / "bad.bundle")
    device = make_device(tmp_path / "dev", keys)
    if labels == 18:
        device.cli("models", "install", good)
    proc = device.cli("models", "install", bad, check=False)
    assert proc.returncode == 1, proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and why in errors[0], proc.stderr
    listed = {m["name"]: m for m in device.models()}
    if labels == 18:
        assert listed["m"]["active"] == 1  # the good version keeps serving
    assert not re.search(r"\bm/2\b", "\n".join(device.tree()))

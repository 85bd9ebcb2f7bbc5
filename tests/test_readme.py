"""The README is part of the contract: its config and spec examples must parse, and be complete."""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from pathlib import Path

from edge_runtime.cli.bundle_cmd import SpecFile
from edge_runtime.config import Config, PipelineConfig, SourceConfig
from edge_runtime.typed_toml import build, parse_toml

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _block_after(heading: str) -> str:
    section = README[README.index(heading):]
    match = re.search(r"```toml\n(.*?)```", section, re.S)
    assert match, f"no toml block after {heading!r}"
    return match.group(1)


def test_config_reference_parses_and_names_every_key() -> None:
    text = _block_after("## Configuration")
    config = build(Config, parse_toml(text, "README"))
    assert config.pipelines and config.mqtt.prefix == "edge"
    sections = [Config, PipelineConfig, SourceConfig,
                *(t for t in typing.get_type_hints(Config).values() if dataclasses.is_dataclass(t))]
    missing = [f.name for cls in sections for f in dataclasses.fields(cls) if not re.search(rf"\b{f.name}\b", text)]
    assert not missing, f"README config reference lacks: {missing}"


def test_pack_spec_example_parses() -> None:
    spec = build(SpecFile, parse_toml(_block_after("### Pack spec"), "README spec"))
    assert spec.postprocess.type == "classification" and spec.gates.latency_ms_p95 == 50.0


def test_the_two_setup_commands_exist() -> None:
    root = Path(__file__).resolve().parent.parent
    for script in ("tools/demo.sh", "tools/test.sh"):
        assert f"./{script}" in README
        assert os.access(root / script, os.X_OK)
    assert "./tools/test.sh" in (root / ".ci" / "run").read_text()

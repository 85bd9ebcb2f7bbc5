"""The README is part of the contract: its config and spec examples must parse, and be complete
(the commands it gives are run in tests/test_readme_walkthrough.py)."""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from edge_runtime.cli.pack_spec import SpecFile
from edge_runtime.config.model import Config, PipelineConfig, SourceConfig
from edge_runtime.config.monitoring import ShadowConfig
from edge_runtime.config.typed_toml import build, parse_toml
from edge_runtime.errors import ConfigError
from edge_runtime.telemetry.events import EVENT_KINDS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _block_after(heading: str) -> str:
    section = README[README.index(heading):]
    match = re.search(r"```toml\n(.*?)```", section, re.S)
    assert match, f"no toml block after {heading!r}"
    return match.group(1)


def _documented_keys(text: str) -> dict[str, tuple[set[str], set[str]]]:
    """{table: (set keys, commented-out keys)} of a TOML block; a commented key counts only when
    the line without its "# " is itself a valid `key = value` (prose inside comments never counts)."""
    tables: dict[str, tuple[set[str], set[str]]] = {"": (set(), set())}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        header = re.match(r"^\[\[?([\w.]+)\]\]?", line)
        if header:
            current = header.group(1)
            tables.setdefault(current, (set(), set()))
            continue
        key = re.match(r"^(#\s*)?(\w+)\s*=", line)
        if key is None:
            continue
        if key.group(1) is None:
            tables[current][0].add(key.group(2))
            continue
        try:
            parse_toml(line.lstrip("#").strip(), "README comment")
        except ConfigError:
            continue
        tables[current][1].add(key.group(2))
    return tables


def test_config_reference_parses_and_lists_every_key_with_its_default() -> None:
    text = _block_after("## Configuration")
    config = build(Config, parse_toml(text, "README"))
    assert config.pipelines and config.mqtt.prefix == "edge"
    hints = typing.get_type_hints(Config)
    nested = {name: cls for name, cls in hints.items() if dataclasses.is_dataclass(cls)}
    sections: dict[str, Any] = {"": Config, **nested, "pipelines": PipelineConfig, "pipelines.source": SourceConfig,
                                "monitoring.shadow": ShadowConfig}
    structural = {*nested, "pipelines", "source", "shadow"}  # tables, not keys
    documented = _documented_keys(text)
    assert set(documented) == set(sections), f"README config tables {sorted(documented)} != {sorted(sections)}"
    problems = []
    for table, cls in sections.items():
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in structural}
        active, commented = documented[table]
        where = f"[{table}]" if table else "top level"
        problems += [f"{where}: {k} missing" for k in sorted(fields.keys() - active - commented)]
        problems += [f"{where}: {k} is not a key" for k in sorted((active | commented) - fields.keys())]
        problems += [f"{where}: {k} is listed twice" for k in sorted(active & commented)]
        for name in fields.keys() & (active | commented):
            default = None if table.startswith("pipelines") else cls()  # a pipeline is an example
            if name in commented:  # an optional path: no TOML value says None
                if fields[name].default is not None:
                    problems.append(f"{where}: {name} has a default, so show it (not commented out)")
            elif default is not None:
                built: Any = config
                for part in filter(None, table.split(".")):
                    built = getattr(built, part)
                if getattr(built, name) != getattr(default, name):
                    problems.append(f"{where}: {name} = {getattr(built, name)!r}, "
                                    f"default is {getattr(default, name)!r}")
    assert not problems, "README config reference: " + "; ".join(problems)


def test_pack_spec_example_parses() -> None:
    spec = build(SpecFile, parse_toml(_block_after("### Pack spec"), "README spec"))
    assert spec.postprocess.type == "classification" and spec.gates.latency_ms_p95 == 50.0


def test_the_two_setup_commands_exist() -> None:
    root = Path(__file__).resolve().parent.parent
    for script in ("tools/demo.sh", "tools/test.sh"):
        assert f"./{script}" in README
        assert os.access(root / script, os.X_OK)
    assert "./tools/test.sh" in (root / ".ci" / "run").read_text()


def test_pack_spec_example_installs_anywhere_and_does_not_expire_soon() -> None:
    spec = build(SpecFile, parse_toml(_block_after("### Pack spec"), "README spec"))
    assert not spec.requires.hardware, "a copied spec must install on any machine: leave requires.hardware out"
    assert spec.labels is None, "the spec names a labels file the walkthrough does not have"
    if spec.expires:
        expires = datetime.fromisoformat(spec.expires.replace("Z", "+00:00"))
        assert expires - datetime.now(timezone.utc) > timedelta(days=365), f"expires {spec.expires} is too close"


def test_files_the_readme_names_are_in_the_repo() -> None:
    root = Path(__file__).resolve().parent.parent
    unit = root / "systemd" / "edge-runtime.service"
    texts = {"README.md": README, "systemd/edge-runtime.service": unit.read_text()}
    # A repo path (./tools/x.sh, systemd/..., edge_runtime/x.py) or any *.md document.
    path_re = r"(?<![\w/.-])(?:\./)?((?:tools|systemd|edge_runtime|tests|\.ci)/[\w./-]*\w|[\w-]+\.md)\b"
    named = {m for text in texts.values() for m in re.findall(path_re, text)}
    assert "tools/demo.sh" in named and "README.md" in named
    missing = sorted(n for n in named if not (root / n).exists())
    assert not missing, f"README/unit name files that are not in the repo: {missing}"
    assert "Documentation=file:" not in texts["systemd/edge-runtime.service"], "no such file on a device"


def test_sudo_commands_name_the_venv_not_a_bare_edge_runtime() -> None:
    # sudo searches its secure_path, which never has the venv's bin/.
    commands = "\n".join(re.findall(r"```sh\n(.*?)```", README, re.S))
    bare = re.findall(r"(?:^|&&|;)\s*sudo (?:-u \S+ )?edge-runtime\b.*", commands, re.M)
    assert not bare, f"not on sudo's PATH: {bare}"
    assert "sudo /opt/edge-runtime/venv/bin/edge-runtime config check" in README


def test_architecture_names_only_modules_that_exist() -> None:
    # ARCHITECTURE.md names modules relative to edge_runtime/ (`update/ota.py`) and top-level files.
    root = Path(__file__).resolve().parent.parent
    text = (root / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:[a-z_]+/)*[a-z_]+\.py)`", text)) | set(re.findall(r"\b([a-z_]+/)\s", text))
    missing = sorted(n for n in named if not ((root / "edge_runtime" / n).exists() or (root / n).exists()))
    assert len(named) > 30 and not missing, f"ARCHITECTURE.md names what is not in the repo: {missing}"
    assert "ARCHITECTURE.md" in README


def test_the_events_table_lists_every_event_kind_once() -> None:
    section = README[README.index("### Events"):]
    section = section[:section.index("\n#", 1)] if "\n#" in section[1:] else section
    rows = re.findall(r"^\| `([a-z_]+)` \| (.+) \|$", section, re.M)
    kinds = [kind for kind, _ in rows]
    assert len(kinds) == len(set(kinds)), f"README events table lists a kind twice: {sorted(kinds)}"
    assert set(kinds) == EVENT_KINDS, (f"README events table: missing {sorted(EVENT_KINDS - set(kinds))}, "
                                       f"not kinds {sorted(set(kinds) - EVENT_KINDS)}")
    assert all(text.strip() for _, text in rows)

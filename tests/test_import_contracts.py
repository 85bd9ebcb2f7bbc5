"""The import contracts (pyproject.toml [tool.importlinter]) hold on the real tree, and an upward import breaks them.

lint-imports runs as a real subprocess: on the real package, and on a copy of
it with one deliberately added import, checked against the same pyproject.toml
(copied beside it; PYTHONPATH makes ``edge_runtime`` resolve to the copy).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")
LAYERS = "layers: cli > tools > daemon"  # the start of the layers contract's name
ACYCLIC = "acyclic: no import cycle between siblings"


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """A copy of the package and its pyproject.toml, to break on purpose."""
    shutil.copytree(REPO / "edge_runtime", tmp_path / "edge_runtime", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def add_line(path: Path, after: str, line: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert after in text, f"{path.name} no longer has {after!r}"
    path.write_text(text.replace(after, f"{after}\n{line}", 1), encoding="utf-8")


def test_the_real_tree_keeps_every_contract() -> None:
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


BREAKS = {
    # an upward import: bundle is far below the daemon
    "upward": ("edge_runtime/bundle/reader.py", "from edge_runtime.daemon import Daemon  # noqa: F401",
               [LAYERS, "edge_runtime.bundle.reader -> edge_runtime.daemon"]),
    # the cycle the issue names ran through TYPE_CHECKING imports: they are not exempt
    "type_checking": ("edge_runtime/update/ota.py", "from typing import TYPE_CHECKING\n"
                      "if TYPE_CHECKING:\n    from edge_runtime.commands.handlers import Updater",
                      [LAYERS, "edge_runtime.update.ota -> edge_runtime.commands.handlers"]),
    # siblings on one layer do not know each other
    "sibling": ("edge_runtime/api/codec.py", "import edge_runtime.pipelines.pipeline  # noqa: F401",
                [LAYERS, "edge_runtime.api.codec -> edge_runtime.pipelines.pipeline"]),
    # a cycle inside one layer (cli), which the layers contract cannot see
    "cycle": ("edge_runtime/cli/pack_spec.py", "import edge_runtime.cli.bundle_cmd  # noqa: F401", [ACYCLIC]),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_a_deliberately_added_import_breaks_a_contract(tree: Path, case: str) -> None:
    module, line, expected = BREAKS[case]
    add_line(tree / module, "from __future__ import annotations", line)
    result = lint(tree)
    assert result.returncode != 0
    out = result.stdout.replace("\n", " ")
    assert "BROKEN" in out and all(e in out for e in expected), result.stdout


def test_no_import_cycle_at_all() -> None:
    """Between any modules, a package and its own modules included (acyclic_siblings does not see those)."""
    graph = grimp.build_graph("edge_runtime")  # TYPE_CHECKING imports included, as in lint-imports
    cycles = _strongly_connected(graph)
    assert cycles == [], f"import cycles: {cycles}"


def _strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """Tarjan's components of more than one module (iterative: the graph is small, the stack is not the point)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found

"""Modules stay small enough to hold one responsibility (issue 10: no module over 400 lines)."""

from __future__ import annotations

from pathlib import Path

import edge_runtime

MAX_LINES = 400


def test_no_module_is_over_400_lines() -> None:
    root = Path(edge_runtime.__file__).parent
    sizes = {p.relative_to(root.parent).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
             for p in root.rglob("*.py")}
    over = {path: n for path, n in sorted(sizes.items()) if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"

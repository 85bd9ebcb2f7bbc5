#!/usr/bin/env bash
# Shared set-up for tools/demo.sh and tools/test.sh: a venv in .venv with the
# package installed (editable). Usage: source tools/setup_env.sh [EXTRAS]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
    echo "error: Python >= 3.10 is required ($("$PY" --version 2>&1) found)" >&2; exit 1; }
VENV="${EDGE_RUNTIME_VENV:-$REPO/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
extras="${1:-}"
stamp="$VENV/.installed-$(sha256sum "$REPO/pyproject.toml" | cut -c1-16)${extras:+-$extras}"
if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "$REPO${extras:+[$extras]}"
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export EDGE_RUNTIME_MODEL_CACHE="${EDGE_RUNTIME_MODEL_CACHE:-$REPO/.cache/models}"

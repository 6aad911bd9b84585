#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs qv-jax with pinned dependencies. Usage: bash launch/install.sh [test]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
req=requirements.txt
[ "${1:-}" = "test" ] && req=requirements-test.txt
.venv/bin/python -m pip install -q -r "$req" -c constraints.txt
.venv/bin/python -m pip install -q --no-deps -e .

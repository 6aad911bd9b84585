#!/usr/bin/env bash
# Installs everything (with test dependencies) and runs the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh test
# xla_cpu_hang: whole-model context-axis tests that XLA:CPU's collectives can deadlock on 2 loaded cores (#11).
exec .venv/bin/python -m pytest -n 2 --dist loadfile --max-worker-restart=0 -m "not xla_cpu_hang" -q -ra "$@" tests

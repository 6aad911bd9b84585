#!/usr/bin/env bash
# Installs everything (with test dependencies) and runs the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh test
exec .venv/bin/python -m pytest -n 2 --dist loadfile --max-worker-restart=0 -q -ra "$@" tests

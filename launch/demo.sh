#!/usr/bin/env bash
# The README's main command: installs qv-jax (bash launch/install.sh), then runs the CPU demo: procedural scene
# videos -> TFDS -> Grain -> a small Quicksviewer trained from scratch through stages 1-3 -> learned cube
# boundaries vs the true scene cuts and vs the uniform partition. Outputs land in ${DEMO_OUT:-runs/demo}:
# summary.json, boundaries.png, loss.png, and TensorBoard logs under stage*/tensorboard.
# Extra arguments go to `python -m launch.demo` (e.g. --quick, --steps 150,150,1500, --videos 1200).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
exec .venv/bin/python -m launch.demo --out "${DEMO_OUT:-runs/demo}" "$@"

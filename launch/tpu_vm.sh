#!/usr/bin/env bash
# Train on one Cloud TPU VM (all its chips in one process). Run ON the TPU VM from the repository root:
#   bash launch/tpu_vm.sh STAGE WORKDIR [extra flags...]
# e.g. bash launch/tpu_vm.sh 1 gs://bucket/qv/stage1 --config.data.dataset_dir=gs://bucket/tfds \
#        --config.data.dataset_name=videos --config.data.tokenizer_path=/data/qwen/tokenizer.json \
#        --config.train.init_from=gs://bucket/converted/qwen2_7b
# SIZE (default qwen2_7b) and MESH_FSDP (default: all chips) pick the model and the FSDP width.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?usage: tpu_vm.sh STAGE WORKDIR [flags...]}
WORKDIR=${2:?usage: tpu_vm.sh STAGE WORKDIR [flags...]}
shift 2
SIZE=${SIZE:-qwen2_7b}
if [ ! -x .venv/bin/python ]; then
  bash launch/install.sh
  # TPU runtime for the pinned JAX (the CPU wheel from requirements.txt stays the fallback).
  .venv/bin/python -m pip install -q "jax[tpu]==$(.venv/bin/python -c 'import jax; print(jax.__version__)')" \
      -f https://storage.googleapis.com/jax-releases/libtpu_releases.html -c constraints.txt
fi
exec .venv/bin/python -m launch.train \
  --config "configs/quicksviewer.py:size=${SIZE},stage=${STAGE}" \
  --workdir "$WORKDIR" \
  --config.mesh.data=1 --config.mesh.fsdp="${MESH_FSDP:--1}" --config.mesh.tensor="${MESH_TENSOR:-1}" \
  --distributed=off "$@"

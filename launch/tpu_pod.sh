#!/usr/bin/env bash
# Train on a multi-host TPU pod slice: copies the repository to every worker, installs it, and starts the
# same command on all workers at once (each host feeds its own shard; jax.distributed finds the others).
# Run from your workstation:
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh STAGE WORKDIR [extra flags...]
# WORKDIR must be shared by all hosts (a gs:// path). SIZE (default qwen2_7b), MESH_DATA (default 1),
# MESH_FSDP (default -1: the rest) and MESH_TENSOR (default 1) shape the run; PROJECT picks the project.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?usage: tpu_pod.sh STAGE WORKDIR [flags...]}
WORKDIR=${2:?usage: tpu_pod.sh STAGE WORKDIR [flags...]}
shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
SIZE=${SIZE:-qwen2_7b}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR=${REMOTE_DIR:-qv-jax}
EXTRA=$(printf ' %q' "$@")

tar czf /tmp/qv-jax-src.tgz --exclude=.venv --exclude=.git --exclude='*.pyc' .
gcloud compute tpus tpu-vm scp /tmp/qv-jax-src.tgz "$TPU_NAME":/tmp/qv-jax-src.tgz \
  --zone="$ZONE" $PROJECT_FLAG --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="
  set -e
  mkdir -p $REMOTE_DIR && tar xzf /tmp/qv-jax-src.tgz -C $REMOTE_DIR && cd $REMOTE_DIR
  if [ ! -x .venv/bin/python ]; then
    bash launch/install.sh
    .venv/bin/python -m pip install -q \"jax[tpu]==\$(.venv/bin/python -c 'import jax; print(jax.__version__)')\" \
      -f https://storage.googleapis.com/jax-releases/libtpu_releases.html -c constraints.txt
  fi
  .venv/bin/python -m launch.train \
    --config 'configs/quicksviewer.py:size=${SIZE},stage=${STAGE}' --workdir '$WORKDIR' \
    --config.mesh.data=${MESH_DATA:-1} --config.mesh.fsdp=${MESH_FSDP:--1} \
    --config.mesh.tensor=${MESH_TENSOR:-1} --distributed=on $EXTRA 2>&1 | tee -a train_stage${STAGE}.log
"

"""Train Quicksviewer: one stage per run, resuming automatically from the work directory.

  python -m launch.train --config configs/quicksviewer.py:size=small,stage=1 --workdir runs/s1 \
      --config.data.dataset_dir=data/tfds --config.data.dataset_name=scenes \
      --config.data.tokenizer_path=data/tokenizer.json --config.train.total_steps=300

Any config field can be overridden with `--config.<section>.<field>=value`. The next stage starts from
the previous one with `--config.train.init_from=runs/s1`. `--config.data.dataset_name=synthetic` trains on
generated batches (no files). Multi-host (TPU pods): every host runs the same command; `--distributed`
(default `auto`: on when the TPU/cluster environment says so) calls `jax.distributed.initialize()`, or give
`--coordinator`, `--num_processes` and `--process_id` explicitly (also for CPU test clusters).
SIGTERM (and Ctrl-C) save a checkpoint and exit cleanly. Prints a JSON summary on the last line.
Resuming with a config that changes what is computed needs `--allow-config-change=train.learning_rate,...`.
Bad flags, configs or inputs print one `error: ...` line and exit with status 2, before anything compiles.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/quicksviewer.py:size=...,stage=...",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "work directory (checkpoints, metrics, TensorBoard)")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "call jax.distributed.initialize (auto: when a cluster is detected)")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (explicit clusters)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in an explicit cluster")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index in an explicit cluster")
_ALLOW_CHANGE = flags.DEFINE_list("allow-config-change", [],
                                  "resume although these config fields/sections changed (or `all`); "
                                  "see qv_jax/train/config_change.py")
_PLATFORM_DEVICES = flags.DEFINE_integer("cpu_devices", None,
                                         "simulate this many CPU devices (sets XLA_FLAGS before JAX starts)")


def _cluster_detected() -> bool:
  env = os.environ
  return any(k in env for k in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                                "OMPI_COMM_WORLD_SIZE")) and env.get("TPU_WORKER_HOSTNAMES", "x") != "localhost"


def initialize_distributed() -> None:
  import jax
  if _COORDINATOR.value:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      raise app.UsageError("--coordinator needs --num_processes and --process_id")
    jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value == "on" or (_DISTRIBUTED.value == "auto" and _cluster_detected()):
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _PLATFORM_DEVICES.value:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_PLATFORM_DEVICES.value}").strip()
    os.environ.setdefault("PJRT_NPROC", "256")   # simulated devices' collectives: docs/context.md
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)   # orbax's per-save INFO lines
  initialize_distributed()
  import jax
  from data_pipeline.loader import make_data
  from data_pipeline.tfds_builder import NoRecordsError
  from qv_jax.config import ConfigError
  from qv_jax.train.loop import NonFiniteLossError, summary_json, train

  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. configs/quicksviewer.py:size=small,stage=1")
  workdir = _WORKDIR.value or config.train.workdir
  if not workdir:
    raise app.UsageError("--workdir is required")
  config.train.workdir = workdir
  if _ALLOW_CHANGE.value:
    config.train.allow_config_change = tuple(_ALLOW_CHANGE.value)
  try:
    summary = train(config, workdir=workdir, data=make_data, handle_sigint=True)
  except (ConfigError, NonFiniteLossError, NoRecordsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    print(summary_json(summary), flush=True)
  return 0


if __name__ == "__main__":
  from qv_jax.config.cli import parse_flags_or_exit
  app.run(main, flags_parser=parse_flags_or_exit)

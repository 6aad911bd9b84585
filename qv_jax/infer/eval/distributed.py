"""Joining a jax.distributed cluster and gathering every process's prediction records onto process 0."""

import json
import os

import numpy as np

CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


def initialize(mode: str = "auto", coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """`jax.distributed.initialize`: explicitly from a coordinator address, or from the cluster environment
  (mode "on", or "auto" when a TPU pod / SLURM / MPI environment is detected)."""
  import jax
  if coordinator:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator needs --num-processes and --process-id")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
  elif mode == "on" or (mode == "auto" and any(k in os.environ for k in CLUSTER_ENV)
                        and os.environ.get("TPU_WORKER_HOSTNAMES", "x") != "localhost"):
    jax.distributed.initialize()


def gather_records(records: list[dict]) -> list[dict] | None:
  """All processes' records on process 0 (None elsewhere), through JAX collectives, so no shared disk is
  needed. Every process must call it; it is also the end-of-answering barrier."""
  import jax
  from jax.experimental import multihost_utils
  if jax.process_count() == 1:
    return records
  payload = np.frombuffer(json.dumps(records).encode(), dtype=np.uint8)
  sizes = multihost_utils.process_allgather(np.array([payload.size], np.int64))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:payload.size] = payload
  chunks = multihost_utils.process_allgather(padded)
  if jax.process_index() != 0:
    return None
  out = []
  for size, chunk in zip(sizes.reshape(-1), chunks.reshape(len(sizes.reshape(-1)), -1)):
    out.extend(json.loads(chunk[:int(size)].tobytes()))
  return out

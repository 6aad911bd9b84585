"""Joining a jax.distributed cluster and gathering every process's prediction records onto process 0."""

import json
import os

KEY = "qv_eval/records"
CHUNK_BYTES = 1 << 20
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


def gather_records(records: list[dict], timeout_s: float = 7 * 24 * 3600) -> list[dict] | None:
  """All processes' records on process 0 (None elsewhere), through the jax.distributed coordination
  service's key-value store, so no shared disk is needed. Every process must call it; it is also the
  end-of-answering barrier. Not a device collective: those give up when processes arrive more than ~30 s
  apart (gloo's rendezvous), and shards of a real benchmark finish minutes apart; this waits `timeout_s`."""
  import jax
  from jax._src import distributed as jax_distributed
  if jax.process_count() == 1:
    return records
  client = jax_distributed.global_state.client
  me, timeout_ms = jax.process_index(), int(timeout_s * 1000)
  payload = json.dumps(records).encode()
  chunks = [payload[k:k + CHUNK_BYTES] for k in range(0, len(payload), CHUNK_BYTES)]
  for k, chunk in enumerate(chunks):
    client.key_value_set_bytes(f"{KEY}/{me}/{k}", chunk)
  client.key_value_set(f"{KEY}/{me}/chunks", str(len(chunks)))
  out = None
  if me == 0:
    out = list(records)
    for other in range(1, jax.process_count()):
      count = int(client.blocking_key_value_get(f"{KEY}/{other}/chunks", timeout_ms))
      data = b"".join(client.blocking_key_value_get_bytes(f"{KEY}/{other}/{k}", timeout_ms) for k in range(count))
      out.extend(json.loads(data))
  client.wait_at_barrier(f"{KEY}/gathered", timeout_ms)
  return out

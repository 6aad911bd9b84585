"""Shared helpers of the context-parallel tests and benchmark: a tiny model, a long-video batch, the
loss and gradients of the whole model under a given mesh, and the XLA:CPU thread-pool check that keeps
its in-process collectives from deadlocking (docs/context.md, "Simulated devices on XLA:CPU")."""

from __future__ import annotations

import glob
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.quicksviewer import get_config
from qv_jax.config import validate
from qv_jax.batch import MODALITY_VIDEO
from qv_jax.model.quicksviewer import Quicksviewer
from qv_jax.sharding import axis_rules, make_mesh, state_shardings
from qv_jax.train.loop import to_global
from qv_jax.train.loss import chunked_cross_entropy, cubing_aux_per_sample
from qv_jax.train.synthetic_batches import SyntheticBatches


def long_video_config(bucket: int = 64, max_frames: int = 60, seq_len: int = 512, batch: int = 1):
  c = get_config("size=tiny,stage=3")
  c.data.frame_buckets = (bucket,)
  c.data.max_frames = max_frames
  c.data.max_text_len = seq_len
  c.data.max_seq_len = seq_len
  c.data.batch_size = batch
  c.model.compressor.token_chunk = 36 * 4          # 4 frames per chunk: chunk borders inside shards
  return c


def long_video_batch(config, num_frames: int, seed: int = 0) -> dict:
  """A batch whose first sample has exactly `num_frames` valid frames (synthetic scenes)."""
  data = SyntheticBatches(config, seed=seed)
  for sid in range(10_000):
    if len(data.sample(sid)["frames"]) == num_frames:
      return data.batch_for([sid + j for j in range(config.data.batch_size)])
  raise AssertionError(f"no synthetic sample with {num_frames} frames")


def make_model(config):
  config = validate(config)
  return Quicksviewer(config.model, max_seq_len=config.data.max_seq_len, rngs=nnx.Rngs(0))


def loss_fn(model, batch, key, eta, ce_chunk=64):
  out = model(batch, key=key, noise_weight=eta, encode_images=False)
  ce_sum, count = chunked_cross_entropy(out.hidden, out.inputs.labels, model.decoder.logits_from_hidden,
                                        ce_chunk)
  aux = cubing_aux_per_sample(out.cubes.logits, out.cubes.logit_mask, batch["modality"] == MODALITY_VIDEO)
  loss = ce_sum.sum() / jnp.maximum(count.sum(), 1) + 0.001 * aux.mean()
  return loss, dict(boundary=out.cubes.boundary, cube_ids=out.cubes.cube_ids,
                    thumbnail=out.cubes.thumbnail, cube_tokens=out.cubes.cube_tokens)


_COLLECTIVES = frozenset(("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all",
                          "collective-broadcast", "ragged-all-to-all", "all-gather-start", "all-reduce-start",
                          "collective-permute-start"))
_NESTING = frozenset(("while", "conditional", "call"))


def _opcode(instruction: str) -> str:
  """The opcode of one HLO instruction line `%x = <shape> opcode(...)` (tuple shapes included)."""
  rhs = instruction.split("=", 1)[1].lstrip()
  if rhs.startswith("("):
    depth = 0
    for i, ch in enumerate(rhs):
      depth += (ch == "(") - (ch == ")")
      if depth == 0:
        break
    rest = rhs[i + 1:].lstrip()
  else:
    rest = rhs.partition(" ")[2]
  m = re.match(r"([a-z][a-z0-9\-]*)\(", rest)
  return m.group(1) if m else ""


def collective_executors(hlo_text: str) -> int:
  """How many XLA:CPU thunk executors of a compiled program issue collectives: the entry computation,
  while bodies and conditions, conditional branches and calls reached from it that hold a collective
  instruction themselves. Each executor has at most one collective in flight per device."""
  comps, entry, cur = {}, None, None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      words = line.split()
      cur = (words[1] if words[0] == "ENTRY" else words[0]).lstrip("%")
      entry = cur if words[0] == "ENTRY" else entry
      comps[cur] = []
    elif cur and " = " in line:
      op = _opcode(line)
      callees = re.findall(r"(?:body|condition|to_apply|calls)=%?([\w.\-]+)", line) if op in _NESTING else []
      for group in re.findall(r"branch_computations=\{([^}]*)\}", line) if op in _NESTING else []:
        callees += [n.strip().lstrip("%") for n in group.split(",")]
      comps[cur].append((op, callees))
  memo = {}

  def total(name):                      # per call site: a computation called twice is two executors
    if name not in memo:
      ops = comps.get(name, [])
      memo[name] = any(op in _COLLECTIVES for op, _ in ops) + sum(total(c) for _, cs in ops for c in cs)
    return memo[name]

  return total(entry)


def xla_cpu_pool_threads() -> int:
  """Threads of XLA:CPU's intra-op pool (named XLAEigen), where the thunk executor runs collectives."""
  names = []
  for path in glob.glob("/proc/self/task/*/comm"):
    try:
      with open(path) as f:
        names.append(f.read().strip())
    except OSError:
      pass
  if names:
    return sum(n == "tf_XLAEigen" for n in names)
  nproc = next((int(os.environ[v]) for v in ("PJRT_NPROC", "NPROC") if os.environ.get(v, "").isdigit()),
               os.cpu_count() or 1)
  return min(max(nproc, jax.local_device_count()), 256)


def check_collective_threads(hlo_text: str, devices: int) -> None:
  """Refuse to run a program whose in-process collectives could exhaust XLA:CPU's intra-op pool.

  Every simulated device blocks one pool thread per collective it has in flight, and it has at most one
  in flight per executor (`collective_executors`); with more pool threads than devices × executors a
  thread is always free for the device a rendezvous waits for, so the program cannot deadlock. Fewer
  threads (XLA's default is max(cores, devices)) can, on a loaded host: set PJRT_NPROC (tests/conftest.py)."""
  executors = collective_executors(hlo_text)
  threads = xla_cpu_pool_threads()
  if devices > 1 and executors and devices * executors >= threads:
    raise RuntimeError(f"XLA:CPU intra-op pool has {threads} threads but {devices} devices x {executors} "
                       f"collective executors may block {devices * executors}: set PJRT_NPROC (at most 256) "
                       f"above that before JAX starts")


def perturbed(model, rel: float = 1e-7, seed: int = 1):
  """A copy of `model` whose float parameters are scaled by (1 + rel·N(0, 1)): noise of fp32 rounding
  size, to measure how many digits a gradient keeps in fp32."""
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)

  def jitter(v):
    a = np.asarray(v)
    if not np.issubdtype(a.dtype, np.floating):
      return v
    return (a * (1 + rel * rng.standard_normal(a.shape))).astype(a.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map(jitter, state))


def sharded_step(config, model, batch: dict, mesh_sizes: dict, devices=None, eta: float = 1.0,
                 ce_chunk: int = 64, rerun=()):
  """(loss, aux outputs, grads) of the whole model, all fetched to host, under a mesh of `mesh_sizes`
  (context included); the compiled function is returned too for cost analysis, and timings. Models in
  `rerun` (same structure) go through the same executable; their results are under info["rerun"]."""
  sizes = {**dict(data=1, fsdp=1, context=1, tensor=1), **mesh_sizes}
  devices = devices or jax.devices()[:int(np.prod(list(sizes.values())))]
  mesh = make_mesh(sizes, devices)
  graphdef, state = nnx.split(model)
  key = jax.random.key(7)

  def step(state, batch):
    m = nnx.merge(graphdef, state)
    (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(m, batch, key, eta, ce_chunk)
    return loss, aux, nnx.state(grads) if not isinstance(grads, nnx.State) else grads

  with jax.set_mesh(mesh), axis_rules(config.sharding_rules):
    state = jax.device_put(state, state_shardings(state, mesh))
    arrays = to_global(batch, mesh)
    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(state, arrays).compile()
    if jax.default_backend() == "cpu":
      check_collective_threads(compiled.as_text(), len(devices))
    t1 = time.perf_counter()
    loss, aux, grads = jax.block_until_ready(compiled(state, arrays))
    info = dict(compile_s=t1 - t0, run_s=time.perf_counter() - t1)
    if rerun:
      info["rerun"] = [jax.device_get(compiled(jax.device_put(nnx.split(m)[1], state_shardings(state, mesh)),
                                               arrays)) for m in rerun]
    return jax.device_get((loss, aux, grads)), compiled, info

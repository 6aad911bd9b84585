"""Shared helpers of the context-parallel tests and benchmark: a tiny model, a long-video batch, and the
loss and gradients of the whole model under a given mesh."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.quicksviewer import get_config
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
  return Quicksviewer(config, rngs=nnx.Rngs(0))


def loss_fn(model, batch, key, eta, ce_chunk=64):
  out = model(batch, key=key, noise_weight=eta, encode_images=False)
  ce_sum, count = chunked_cross_entropy(out.hidden, out.inputs.labels, model.decoder.logits_from_hidden,
                                        ce_chunk)
  aux = cubing_aux_per_sample(out.cubes.logits, out.cubes.logit_mask, batch["modality"] == MODALITY_VIDEO)
  loss = ce_sum.sum() / jnp.maximum(count.sum(), 1) + 0.001 * aux.mean()
  return loss, dict(boundary=out.cubes.boundary, cube_ids=out.cubes.cube_ids,
                    thumbnail=out.cubes.thumbnail, cube_tokens=out.cubes.cube_tokens)


def sharded_step(config, model, batch: dict, mesh_sizes: dict, devices=None, eta: float = 1.0,
                 ce_chunk: int = 64):
  """(loss, aux outputs, grads) of the whole model, all fetched to host, under a mesh of `mesh_sizes`
  (context included); the jitted function is returned too for cost analysis."""
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
    t1 = time.perf_counter()
    loss, aux, grads = jax.block_until_ready(compiled(state, arrays))
    timing = dict(compile_s=t1 - t0, run_s=time.perf_counter() - t1)
    return jax.device_get((loss, aux, grads)), compiled, timing

"""Plan the inference steps: `prefill` (420 frames through vision, cubing, resampler and assembly, then the
decoder over the merged prompt into an empty KV cache) and `decode` (one token per sequence against a full
cache), compiled for a target with abstract params and an abstract KV cache.

The step bodies are thin: they call `Quicksviewer.prepare_inputs` and `Decoder.__call__` exactly as
`qv_jax/model/generate.py` does for its prefill and loop body, so they follow the model's changes.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qv_jax.model.decoder import CACHE_AXES
from qv_jax.plan.target import Target, target_mesh
from qv_jax.plan.train_plan import analyse, sharded_bytes
from qv_jax.sharding import axis_rules, logical_to_pspec, state_shardings
from qv_jax.train.compile import abstract_batch
from qv_jax.train.flops import matmul_flops
from qv_jax.train.state import abstract_like, model_factory


def abstract_model(config, mesh):
  """-> (graphdef, abstract params as a pure dict with shardings): the whole model, nothing allocated."""
  graphdef, state = nnx.split(nnx.eval_shape(model_factory(config)))
  shardings = nnx.to_pure_dict(state_shardings(state, mesh, config.sharding_rules))
  return graphdef, abstract_like(nnx.to_pure_dict(state), shardings)


def abstract_cache(model_graphdef, params, config, mesh, batch: int, slots: int):
  """The decoder's KV cache [layers, B, slots, kv_heads, head_dim] as sharded ShapeDtypeStructs."""
  def init():
    return nnx.merge(model_graphdef, params).decoder.init_cache(batch, slots)
  shapes = jax.eval_shape(init)
  rules = config.sharding_rules

  def shard(x):
    axes = CACHE_AXES if x.ndim == 5 else (("batch", "length") if x.ndim == 2 else ())
    return NamedSharding(mesh, logical_to_pspec(axes, rules, mesh, x.shape))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shard(x)), shapes)


def make_steps(graphdef):
  def prefill(params, batch, cache):
    model = nnx.merge(graphdef, params)
    merged, _ = model.prepare_inputs(batch, key=jax.random.PRNGKey(0), noise_weight=0.0)
    hidden, cache = model.decoder(inputs_embeds=merged.embeds, positions=merged.positions, mask=merged.mask,
                                  cache=cache, return_hidden=True)
    last = jnp.maximum(merged.mask.sum(-1) - 1, 0)
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)
    return model.decoder.logits_from_hidden(h)[:, 0], cache

  def decode(params, tokens, positions, cache):
    model = nnx.merge(graphdef, params)
    logits, cache = model.decoder(input_ids=tokens[:, None], positions=positions[:, None],
                                  mask=jnp.ones((tokens.shape[0], 1), bool), cache=cache)
    return logits[:, 0], cache
  return prefill, decode


def plan_infer(config, target: Target, mesh_shape, step: str, *, new_tokens: int = 256) -> dict:
  """Compiles `step` ('prefill' or 'decode') for a batch of `data.batch_size` questions of the config's
  frame bucket; the cache holds `data.max_seq_len + new_tokens` slots."""
  if step not in ("prefill", "decode"):
    raise ValueError(f"step must be prefill or decode, got {step!r}")
  mesh = target_mesh(target, mesh_shape)
  d = config.data
  b, slots = int(d.batch_size), int(d.max_seq_len) + int(new_tokens)
  rules = config.sharding_rules
  t0 = time.perf_counter()
  graphdef, params = abstract_model(config, mesh)
  cache = abstract_cache(graphdef, params, config, mesh, b, slots)
  prefill, decode = make_steps(graphdef)
  rep = NamedSharding(mesh, PartitionSpec())
  row = NamedSharding(mesh, logical_to_pspec(("batch",), rules, mesh, (b,)))
  if step == "prefill":
    fn, args = prefill, (params, abstract_batch(config, mesh), cache)
    tokens = float(b * d.max_seq_len)
  else:
    vec = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=row)
    fn, args = decode, (params, vec, vec, cache)
    tokens = float(b)
  shardings = jax.tree.map(lambda x: x.sharding, args)
  cache_sh = jax.tree.map(lambda x: x.sharding, cache)
  with jax.set_mesh(mesh), axis_rules(rules):
    jitted = jax.jit(fn, in_shardings=shardings, out_shardings=(rep, cache_sh), donate_argnums=(len(args) - 1,))
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    flops = matmul_flops(fn, *args)
  report = analyse(compiled, mesh, target, flops=flops, tokens=tokens)
  report["memory_per_chip"].update(state_bytes=sharded_bytes(params), cache_bytes=sharded_bytes(cache))
  return dict(report, step=step, size=config.model.size, stage=int(config.train.stage), batch=b,
              frames=int(max(d.frame_buckets)), max_seq_len=int(d.max_seq_len), cache_slots=slots,
              param_dtype=str(config.model.param_dtype), remat=config.model.vision.remat_policy != "none",
              frame_chunk=int(config.model.vision.frame_chunk), compile_s=compile_s)

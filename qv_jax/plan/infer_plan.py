"""Plan the inference steps: `prefill` (420 frames through vision, cubing, resampler and assembly, then the
decoder over the merged prompt into a fresh KV cache and the first token) and `decode` (one token per
sequence against that cache), compiled for a target with abstract params and an abstract decode state.

The steps are the inference runtime's own: `Quicksviewer.prepare_inputs` as `qv_jax/infer/runner.py` calls
it (η = 0), then `generate.prefill_step`, the Generator's prefill; `decode` is `generate.decode_step`, the
body of the Generator's decode loop. Sampling is greedy, as `qv-ask`'s default.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qv_jax.model import generate
from qv_jax.model.decoder import CACHE_AXES
from qv_jax.plan.cache import PlanCache
from qv_jax.plan.target import Target, target_mesh
from qv_jax.plan.train_plan import analyse, check_state_fits, sharded_bytes
from qv_jax.sharding import SLOT_AXES, axis_rules, logical_to_pspec, state_shardings
from qv_jax.train.compile import abstract_batch
from qv_jax.train.flops import matmul_flops
from qv_jax.train.state import abstract_like, model_factory


def abstract_model(config, mesh):
  """-> (graphdef, abstract params as a pure dict with shardings): the whole model, nothing allocated."""
  graphdef, state = nnx.split(nnx.eval_shape(model_factory(config)))
  shardings = nnx.to_pure_dict(state_shardings(state, mesh, config.sharding_rules))
  return graphdef, abstract_like(nnx.to_pure_dict(state), shardings)


def _abstract(x, sharding):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def abstract_cache(model_graphdef, params, config, mesh, batch: int, slots: int):
  """The decoder's KV cache [layers, B, slots, kv_heads, head_dim] as sharded ShapeDtypeStructs."""
  def init():
    return nnx.merge(model_graphdef, params).decoder.init_cache(batch, slots)
  shapes = jax.eval_shape(init)
  rules = config.sharding_rules

  def shard(x):
    axes = CACHE_AXES if x.ndim == 5 else (SLOT_AXES if x.ndim == 2 else ())
    return NamedSharding(mesh, logical_to_pspec(axes, rules, mesh, x.shape))
  return jax.tree.map(lambda x: _abstract(x, shard(x)), shapes)


def abstract_sampling(mesh, new_tokens: int):
  """-> (the Generator's greedy `Sampling` as replicated ShapeDtypeStructs, its static flags)."""
  greedy = (new_tokens, None, 0, 0.0, 1.0, 0, 1.0, None)   # no eos, pad 0, temperature 0, no top-p/k/penalty
  flags = generate.sampling_settings(*greedy)[1]
  shapes = jax.eval_shape(lambda: generate.sampling_settings(*greedy)[0])
  rep = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda x: _abstract(x, rep), shapes), flags


def abstract_decode_state(model_graphdef, params, config, mesh, batch: int, prompt_len: int, new_tokens: int):
  """The `DecodeState` the Generator's prefill hands to its decode loop (cache of P + N - 1 slots)."""
  cache = abstract_cache(model_graphdef, params, config, mesh, batch, prompt_len + new_tokens - 1)
  rules = config.sharding_rules
  rows = lambda *shape: NamedSharding(mesh, logical_to_pspec(("activation_batch",) + (None,) * (len(shape) - 1), rules,
                                                             mesh, shape))
  vec = lambda dtype: jax.ShapeDtypeStruct((batch,), dtype, sharding=rows(batch))
  return generate.DecodeState(
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec())),
      out=jax.ShapeDtypeStruct((batch, new_tokens), jnp.int32, sharding=rows(batch, new_tokens)),
      cache=cache, token=vec(jnp.int32), finished=vec(jnp.bool_), seen=None, next_position=vec(jnp.int32))


def make_steps(graphdef, *, new_tokens: int, flags: dict):
  """-> (prefill(params, batch, sampling), decode(params, decode_state, sampling)), both -> DecodeState."""
  def prefill(params, batch, sampling):
    model = nnx.merge(graphdef, params)
    merged, _ = model.prepare_inputs(batch, key=None, noise_weight=0.0)
    return generate.prefill_step(model.decoder, None, None, merged.embeds, merged.mask, merged.positions,
                                 sampling, max_new_tokens=new_tokens, cache_dtype=None, **flags)

  def decode(params, decode_state, sampling):
    return generate.decode_step(nnx.merge(graphdef, params).decoder, None, decode_state, sampling, **flags)
  return prefill, decode


def plan_infer(config, target: Target, mesh_shape, step: str, *, new_tokens: int = 256,
               cache: PlanCache | None = None) -> dict:
  """Compiles `step` ('prefill' or 'decode') for a batch of `data.batch_size` questions of the config's
  frame bucket; the KV cache holds `data.max_seq_len + new_tokens - 1` slots, as the Generator's. `cache`:
  the planner's cache of compiled programs (`compile_s` then keeps the stored compile's time)."""
  if step not in ("prefill", "decode"):
    raise ValueError(f"step must be prefill or decode, got {step!r}")
  mesh = target_mesh(target, mesh_shape)
  d = config.data
  b, new_tokens = int(d.batch_size), int(new_tokens)
  t0 = time.perf_counter()
  graphdef, params = abstract_model(config, mesh)
  sampling, flags = abstract_sampling(mesh, new_tokens)
  state = abstract_decode_state(graphdef, params, config, mesh, b, int(d.max_seq_len), new_tokens)
  check_state_fits((params, state.cache), mesh, target, "the params and the KV cache")
  prefill, decode = make_steps(graphdef, new_tokens=new_tokens, flags=flags)
  if step == "prefill":
    fn, args, donate = prefill, (params, abstract_batch(config, mesh), sampling), ()
    tokens = float(b * d.max_seq_len)
  else:
    fn, args, donate = decode, (params, state, sampling), (1,)
    tokens = float(b)
  shardings = jax.tree.map(lambda x: x.sharding, args)
  out_shardings = jax.tree.map(lambda x: x.sharding, state)
  with jax.set_mesh(mesh), axis_rules(config.sharding_rules):
    jitted = jax.jit(fn, in_shardings=shardings, out_shardings=out_shardings, donate_argnums=donate)
    lowered = jitted.lower(*args)
    phases: dict[str, float] = {}
    if cache is not None:
      compiled = cache.compiler(target, mesh)(lowered, phases)
      compile_s = time.perf_counter() - t0 - phases.get("cache_load_s", 0.0) + (
          phases["xla_compile_s"] if getattr(compiled, "cache_hit", False) else 0.0)
    else:
      compiled = lowered.compile()
      compile_s = time.perf_counter() - t0
    flops = matmul_flops(fn, *args)
  report = analyse(compiled, mesh, target, flops=flops, tokens=tokens)
  report["memory_per_chip"].update(state_bytes=sharded_bytes(params), cache_bytes=sharded_bytes(state.cache))
  return dict(report, step=step, size=config.model.size, stage=int(config.train.stage), batch=b,
              frames=int(max(d.frame_buckets)), max_seq_len=int(d.max_seq_len),
              cache_slots=int(state.cache.k.shape[2]),
              param_dtype=str(config.model.param_dtype), remat=config.model.vision.remat_policy != "none",
              frame_chunk=int(config.model.vision.frame_chunk), compile_s=compile_s,
              cache_hit=bool(getattr(compiled, "cache_hit", False)))

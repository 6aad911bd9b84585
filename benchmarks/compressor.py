"""Compressor benchmark: one forward+backward step (gradients of all compressor params) per frame count.

  python benchmarks/compressor.py                       # released size (Dv 1152, D 3584, 28 heads, 576 tok)
  python benchmarks/compressor.py --sizes 60,420 --impl fast
  python benchmarks/compressor.py --quick               # tiny dims, seconds

Prints one JSON line per (impl, F): seconds per step, compile count across the timed calls (each call
uses a different frame count and Gumbel key, so a recompile would show), XLA cost-analysis FLOPs,
analytic FLOPs, achieved FLOP/s, the measured fp32 matmul peak, and peak memory from memory_analysis.
The plain form runs only up to --plain-max-frames (it holds [tokens, D] keys and values).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import (CompileCounter, device_info, emit, flops, matmul_peak,  # noqa: E402
                               memory, time_call)
from configs.quicksviewer import get_config  # noqa: E402
from qv_jax.config import validate  # noqa: E402
from qv_jax.model.compressor import Compressor, max_cubes  # noqa: E402
from qv_jax.model.resampler_fast import fast_flops  # noqa: E402

REFERENCE_SECONDS_AT_60 = 28.0   # PyTorch reference, one fwd+bwd at F=60 on a 2-core CPU (task brief)


def plain_flops(*, batch, frames, tokens, vision_dim, embed_dim, num_queries, num_cubes, **_) -> float:
  """Analytic matmul FLOPs of the plain form's step: per token kv_proj, K and V projections and the
  scores / weighted sums; backward twice the forward (no feature gradient for kv_proj's input)."""
  t = batch * frames * tokens
  dv, d, q = vision_dim, embed_dim, num_queries
  fwd = t * (2 * dv * d + 2 * 2 * d * d + 2 * 2 * q * d) + batch * num_cubes * q * 2 * 3 * d * d
  bwd = 2 * fwd - t * 2 * dv * d
  return float(fwd + bwd)


def build(size: str, dtype: str, impl: str, token_chunk: int | None, save_scores: bool):
  config = get_config(f"size={size}")
  config.model.compute_dtype = dtype
  config.model.compressor.resampler_impl = impl
  if token_chunk:
    config.model.compressor.token_chunk = token_chunk
  config.model.compressor.save_scores = save_scores
  config = validate(config)
  module = Compressor(config.model.compressor, rngs=nnx.Rngs(0))
  return config, module


def make_step(graphdef, feature_grad: bool):
  def step(state, features, num_frames, key):
    def loss(state, features):
      out = nnx.merge(graphdef, state)(features, num_frames, key=key, noise_weight=0.5)
      tokens = out.cube_tokens.astype(jnp.float32)
      return (jnp.mean(jnp.square(tokens)) + jnp.mean(jnp.square(out.thumbnail.astype(jnp.float32)))
              + 1e-3 * out.aux_loss)
    argnums = (0, 1) if feature_grad else 0
    return jax.value_and_grad(loss, argnums=argnums)(state, features)
  return jax.jit(step)


def run(args) -> None:
  size = "small" if args.quick else args.size
  sizes = [int(s) for s in (args.sizes or ("16,32" if args.quick else "60,120,240,420")).split(",")]
  peak = matmul_peak(512 if args.quick else args.peak_n)
  emit({"bench": "matmul_peak", "flops_per_s": peak, "n": 512 if args.quick else args.peak_n,
        **device_info()})
  for impl in args.impl.split(","):
    config, module = build(size, args.dtype, impl, args.token_chunk, not args.recompute_scores)
    c = config.model.compressor
    graphdef, state = nnx.split(module)
    for frames in sizes:
      if impl == "plain" and frames > args.plain_max_frames:
        continue
      p = c.grid_size ** 2
      shape = (args.batch, frames, p, c.vision_dim)
      features = jax.random.normal(jax.random.key(frames), shape, jnp.float32)
      # every call: another frame count and Gumbel key (another partition); one compile expected
      calls = [(jnp.full((args.batch,), max(2, frames - i), jnp.int32), jax.random.key(i))
               for i in range(args.repeats + 1)]
      step = make_step(graphdef, args.feature_grad)
      dims = dict(batch=args.batch, frames=frames, tokens=p, vision_dim=c.vision_dim,
                  embed_dim=c.embed_dim, num_heads=c.num_heads, num_queries=c.num_queries,
                  num_cubes=max_cubes(frames, c.frames_per_cube), token_chunk=c.token_chunk)
      if impl == "fast":
        analytic = fast_flops(feature_grad=args.feature_grad, save_scores=c.save_scores, **dims)["total"]
      else:
        analytic = plain_flops(**dims)
      record = {"bench": "compressor", "impl": impl, "size": size, "frames": frames, "batch": args.batch,
                "dtype": args.dtype, "feature_grad": args.feature_grad, "save_scores": c.save_scores,
                "analytic_flops": analytic, "matmul_peak_flops_per_s": peak}
      if not args.compile_only:
        pending = iter(calls)
        with CompileCounter() as compiles:
          timing = time_call(lambda: step(state, features, *next(pending)), warmup=1, repeats=args.repeats)
        seconds = timing["median_s"]
        record.update(step_s=seconds, min_step_s=timing["min_s"], compiles=compiles.count,
                      achieved_flops_per_s=analytic / seconds, fraction_of_peak=analytic / seconds / peak)
        if frames == 60 and not args.quick:
          record["speedup_vs_reference_28s"] = REFERENCE_SECONDS_AT_60 / seconds
      compiled = step.lower(state, features, *calls[0]).compile()
      record.update(xla_flops=flops(compiled), **memory(compiled))
      emit(record)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="tiny dims (config size=small), F = 16, 32")
  parser.add_argument("--size", default="qwen2_7b", help="config size for the dims (default qwen2_7b)")
  parser.add_argument("--sizes", default=None, help="comma-separated frame counts F (default 60,120,240,420)")
  parser.add_argument("--impl", default="fast,plain", help="fast, plain or fast,plain")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--dtype", default="float32", help="compute dtype (float32 on CPU; bfloat16 on TPU)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--plain-max-frames", type=int, default=60)
  parser.add_argument("--token-chunk", type=int, default=None, help="override compressor.token_chunk")
  parser.add_argument("--recompute-scores", action="store_true",
                      help="fast form: recompute the scores in the backward (compressor.save_scores=False)")
  parser.add_argument("--feature-grad", action="store_true", help="also differentiate w.r.t. the features")
  parser.add_argument("--compile-only", action="store_true", help="report FLOPs and memory, do not run")
  parser.add_argument("--peak-n", type=int, default=4096, help="matmul size for the peak measurement")
  run(parser.parse_args(argv))


if __name__ == "__main__":
  main()

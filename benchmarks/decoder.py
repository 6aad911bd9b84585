"""Decoder prefill and KV-cache decode throughput (tokens/s), with XLA FLOPs, memory and compile counts.

  python benchmarks/decoder.py --quick                                  # tiny only, short sequences
  python benchmarks/decoder.py --sizes tiny,qwen2_0_5b --batch 1 --prompt-len 512 --new-tokens 64

Sizes: the model sizes (tiny, small, qwen2_7b, llama3_8b) and the decoder-only `qwen2_0_5b`
(`qv_jax.config.model.DECODER_EXTRA_SIZES`). Weights are random. Prints one JSON line per size:
prefill = one call writing the prompt into the cache and returning the last token's logits; decode = a
jitted loop of greedy single-token steps over the cache (the body of `generate`); generate = the whole
`generate` call (after a warm-up), for two different prompts: the second compiles nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import CompileCounter, device_info, emit, flops, matmul_peak, memory, time_call  # noqa
from qv_jax.config.typed import decoder_config  # noqa: E402
from qv_jax.model.decoder import Decoder  # noqa: E402
from qv_jax.model.generate import generate  # noqa: E402


def build(size: str, dtype: str):
  cfg = decoder_config(size, dtype=dtype)
  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract)
  state = jax.jit(lambda: nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))[1])()
  return cfg, graphdef, state


def param_counts(cfg) -> tuple[int, int]:
  """(all params, params touched per token excluding the embedding lookup)."""
  d, f, h, kv, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  attn = d * hd * (2 * h + 2 * kv) + (hd * (h + 2 * kv) if cfg.qkv_bias else 0)
  layer = attn + 3 * d * f + 2 * d
  body = cfg.num_layers * layer + d
  head = cfg.vocab_size * d
  return body + head * (1 if cfg.tie_embeddings else 2), body + head


def run(size: str, batch: int, prompt_len: int, new_tokens: int, dtype: str, peak: float) -> dict:
  cfg, graphdef, state = build(size, dtype)
  total_params, per_token_params = param_counts(cfg)
  max_len = prompt_len + new_tokens
  ids = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, cfg.vocab_size, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), ids.shape)
  mask = jnp.ones(ids.shape, bool)

  def prefill(state, ids):
    decoder = nnx.merge(graphdef, state)
    cache = decoder.init_cache(batch, max_len)
    hidden, cache = decoder(input_ids=ids, positions=positions, mask=mask, cache=cache, return_hidden=True)
    return decoder.logits_from_hidden(hidden[:, -1:])[:, 0], cache

  def decode(state, cache, logits):
    decoder = nnx.merge(graphdef, state)

    def step(i, carry):
      cache, logits = carry
      tok = jnp.argmax(logits, -1).astype(jnp.int32)[:, None]
      pos = jnp.full((batch, 1), prompt_len, jnp.int32) + i
      out, cache = decoder(input_ids=tok, positions=pos, mask=jnp.ones((batch, 1), bool), cache=cache)
      return cache, out[:, 0]

    return jax.lax.fori_loop(0, new_tokens, step, (cache, logits))[1]

  with CompileCounter() as compiles:
    prefill_c = jax.jit(prefill).lower(state, ids).compile()
    logits, cache = prefill_c(state, ids)
    decode_c = jax.jit(decode).lower(state, cache, logits).compile()
  prefill_t = time_call(prefill_c, state, ids)
  decode_t = time_call(decode_c, state, cache, logits)

  attn_prefill = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * batch * prompt_len * max_len
  prefill_flops_analytic = 2 * per_token_params * batch * prompt_len + attn_prefill
  decode_flops_analytic = new_tokens * batch * (2 * per_token_params +
                                                4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * max_len)

  decoder = nnx.merge(graphdef, state)
  gen_times, gen_compiles = [], []
  for seed in (2, 3):
    prompt = jax.random.randint(jax.random.key(seed), (batch, prompt_len), 0, cfg.vocab_size, jnp.int32)
    with CompileCounter() as counter:
      gen_times.append(time_call(lambda p: generate(decoder, input_ids=p, max_new_tokens=new_tokens,
                                                    eos_id=None, pad_id=0), prompt, warmup=1, repeats=1))
    gen_compiles.append(counter.count)
  prefill_s, decode_s = prefill_t["median_s"], decode_t["median_s"]
  return {
      "bench": "decoder", "size": size, "dtype": dtype, "batch": batch, "prompt_len": prompt_len,
      "new_tokens": new_tokens, "params": total_params, "attention_impl": cfg.attention_impl,
      "prefill": {"seconds": prefill_t, "tokens_per_s": batch * prompt_len / prefill_s,
                  "xla_flops": flops(prefill_c), "analytic_flops": prefill_flops_analytic,
                  "achieved_flops_per_s": prefill_flops_analytic / prefill_s,
                  "fraction_of_matmul_peak": prefill_flops_analytic / prefill_s / peak,
                  "memory": memory(prefill_c)},
      "decode": {"seconds": decode_t, "tokens_per_s": batch * new_tokens / decode_s,
                 "ms_per_step": 1e3 * decode_s / new_tokens, "analytic_flops": decode_flops_analytic,
                 "achieved_flops_per_s": decode_flops_analytic / decode_s, "memory": memory(decode_c)},
      "generate": {"seconds_per_call": [t["median_s"] for t in gen_times],
                   "compiles_per_prompt": gen_compiles},
      "compiles_prefill_and_decode": compiles.count, "matmul_peak_flops_per_s": peak, **device_info(),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="tiny,qwen2_0_5b")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--prompt-len", type=int, default=512)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--quick", action="store_true", help="tiny only, batch 2, 64-token prompt, 16 new")
  args = parser.parse_args(argv)
  if args.quick:
    args.sizes, args.batch, args.prompt_len, args.new_tokens = "tiny", 2, 64, 16
  peak = matmul_peak(1024 if args.quick else 4096)
  for size in args.sizes.split(","):
    emit(run(size.strip(), args.batch, args.prompt_len, args.new_tokens, args.dtype, peak))


if __name__ == "__main__":
  main()

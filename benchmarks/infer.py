"""Inference measurements, printed as JSON (one object per line):

  ttft     one 420-frame question (a 7-min generated video), tiny and small, random weights: time to
           first token split into video decoding, vision tower, compressor (cubing + resampler +
           assembly) and decoder prefill, then decode tokens/s; a second question compiles nothing
  batch    answer_batch of 8 (video, question) pairs vs the same 8 one by one (small): questions/s
  decode   the decoder's KV-cache decode against HF transformers in the same process: Qwen2.5-0.5B shape,
           fp32, batch 1, 512-token prompt, 64 new tokens, the same random weights (converted with the
           qv-convert tables); greedy outputs compared token for token; our stacked (scanned) and
           unrolled (`split_layers`) layer paths both timed, runs interleaved

  python benchmarks/infer.py --quick              # tiny only, short video, a small decoder for the HF part
  python benchmarks/infer.py                       # everything as above
  python benchmarks/infer.py --parts decode --repeats 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import CompileCounter, device_info, emit  # noqa: E402


def _model(tmp, size):
  from qv_jax.infer import load
  from qv_jax.infer.fixtures import make_workdir
  from qv_jax.sharding import make_mesh
  workdir = os.path.join(tmp, size)
  if not os.path.exists(os.path.join(workdir, "config.json")):
    make_workdir(workdir, size=size)
  return load(workdir, mesh=make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))


def bench_ttft(tmp, sizes, seconds, new_tokens):
  from qv_jax.infer import answer
  from qv_jax.infer.fixtures import make_video
  video, _ = make_video(os.path.join(tmp, f"long_{seconds}.mp4"), seconds=seconds, fps=2, size=96)
  for size in sizes:
    model = _model(tmp, size)
    first = answer(model, video, "What colour is the first shape?", max_new_tokens=new_tokens)
    with CompileCounter() as compiles:
      runs = [answer(model, video, q, max_new_tokens=new_tokens)
              for q in ("Which shape comes last?", "What colour is the first shape?")]
    best = min(runs, key=lambda a: a.prefill_s + a.decode_s)
    t = best.timings
    steps = max(len(best.token_ids) - 1, 1)
    emit({"bench": "infer_ttft", "size": size, "num_frames": best.num_frames, "cubes": len(best.cubes),
          "new_tokens": len(best.token_ids), "ttft_s": t["video_s"] + best.prefill_s,
          "video_s": t["video_s"], "tower_s": t["tower_s"], "compressor_s": t["compressor_s"],
          "prefill_s": t["prefill_s"], "decode_s": t["decode_s"], "decode_tokens_per_s": steps / t["decode_s"],
          "first_call_s": first.prefill_s + first.decode_s + first.timings["video_s"],
          "compiles_second_question": compiles.count, **device_info()})


def bench_batch(tmp, size, n, new_tokens):
  from qv_jax.infer import answer, answer_batch
  from qv_jax.infer.fixtures import make_video
  model = _model(tmp, size)
  videos = [make_video(os.path.join(tmp, f"short_{i}.mp4"), seconds=14, seed=10 + i)[0] for i in range(n)]
  items = [(v, "What colour is the first shape?" if i % 2 else "Which shape comes last?")
           for i, v in enumerate(videos)]
  answer_batch(model, items, max_new_tokens=new_tokens, batch_size=n)      # compile
  answer(model, *items[0], max_new_tokens=new_tokens)
  t0 = time.perf_counter()
  batched = answer_batch(model, items, max_new_tokens=new_tokens, batch_size=n)
  batch_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  single = [answer(model, v, q, max_new_tokens=new_tokens) for v, q in items]
  single_s = time.perf_counter() - t0
  emit({"bench": "infer_batch", "size": size, "questions": n, "new_tokens": new_tokens,
        "batch_questions_per_s": n / batch_s, "one_by_one_questions_per_s": n / single_s,
        "speedup": single_s / batch_s,
        "same_tokens": all(a.token_ids == b.token_ids for a, b in zip(batched, single)), **device_info()})


def _hf_and_ours(size_args):
  import torch
  import transformers
  from flax import nnx
  from qv_jax.convert.derive_config import decoder_config_from_hf
  from qv_jax.convert.parts import convert_decoder
  from qv_jax.convert.writer import nest
  from qv_jax.model.decoder import Decoder
  cfg = transformers.Qwen2Config(**size_args, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                 max_position_embeddings=32768, use_sliding_window=False, hidden_act="silu")
  torch.manual_seed(0)
  hf = transformers.Qwen2ForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif p.ndim == 1:
        p.copy_(0.02 * torch.randn_like(p))
  model_config = decoder_config_from_hf(cfg.to_dict())
  arrays = convert_decoder({k: v.detach().numpy() for k, v in hf.state_dict().items()}, model_config)
  abstract = nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  pure = nnx.to_pure_dict(state)
  flat = {"/".join(map(str, k)): v for k, v in _flat(pure)}
  nnx.replace_by_pure_dict(state, nest({k: jnp.asarray(arrays.pop(k)) for k in list(flat)}))
  return hf, nnx.merge(graphdef, state), model_config


def _flat(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flat(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def bench_decode(size_args, prompt_len, new_tokens, repeats):
  import torch
  from qv_jax.model.decoder import split_layers
  from qv_jax.model.generate import Generator
  hf, decoder, dcfg = _hf_and_ours(size_args)
  ids = np.random.default_rng(1).integers(0, dcfg.vocab_size, (1, prompt_len))
  split, layer_params = split_layers(decoder)
  gens = {"stacked": Generator(decoder, max_new_tokens=new_tokens, eos_id=None, pad_id=0),
          "unrolled": Generator(split, max_new_tokens=new_tokens, eos_id=None, pad_id=0, layer_params=layer_params)}

  def hf_run():
    with torch.no_grad():
      t0 = time.perf_counter()
      out = hf(torch.tensor(ids), use_cache=True)
      past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
      t1 = time.perf_counter()
      toks = [int(tok)]
      for _ in range(new_tokens - 1):
        out = hf(tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(int(tok))
      return t1 - t0, time.perf_counter() - t1, toks

  def ours(gen):
    t0 = time.perf_counter()
    st = jax.block_until_ready(gen.start(input_ids=jnp.asarray(ids, jnp.int32)))
    t1 = time.perf_counter()
    st = jax.block_until_ready(gen.advance(st))
    return t1 - t0, time.perf_counter() - t1, [int(t) for t in np.asarray(st.out)[0]]

  runs = {"hf": [], "stacked": [], "unrolled": []}
  with CompileCounter() as compiles:
    for g in gens.values():
      ours(g)
  hf_run()
  tokens = {}
  for _ in range(repeats):
    for name in runs:
      p, d, toks = hf_run() if name == "hf" else ours(gens[name])
      runs[name].append((p, d))
      tokens[name] = toks
  steps = new_tokens - 1
  best = {k: (min(p for p, _ in v), min(d for _, d in v)) for k, v in runs.items()}
  out = {"bench": "decode_vs_hf", "shape": size_args, "dtype": "float32", "batch": 1, "prompt_len": prompt_len,
         "new_tokens": new_tokens, "torch_threads": torch.get_num_threads(), "repeats": repeats,
         "compiles": compiles.count}
  for k, (p, d) in best.items():
    out[k] = {"prefill_s": p, "decode_ms_per_step": 1e3 * d / steps, "decode_tokens_per_s": steps / d,
              "all_decode_s": [round(d_, 3) for _, d_ in runs[k]]}
  for k in ("stacked", "unrolled"):
    out[f"{k}_vs_hf_decode_speed"] = best["hf"][1] / best[k][1]
    out[f"{k}_vs_hf_prefill_speed"] = best["hf"][0] / best[k][0]
    out[f"{k}_same_greedy_tokens_as_hf"] = tokens[k] == tokens["hf"]
  emit({**out, **device_info()})


QWEN_0_5B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6)
SMALL_DECODER = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--parts", default="ttft,batch,decode")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--repeats", type=int, default=2)
  args = p.parse_args(argv)
  parts = args.parts.split(",")
  jax.config.update("jax_threefry_partitionable", True)
  with tempfile.TemporaryDirectory() as tmp:
    if "ttft" in parts:
      bench_ttft(tmp, ["tiny"] if args.quick else ["tiny", "small"], 40 if args.quick else 420,
                 8 if args.quick else 32)
    if "batch" in parts:
      bench_batch(tmp, "tiny" if args.quick else "small", 8, 8 if args.quick else 32)
    if "decode" in parts:
      bench_decode(SMALL_DECODER if args.quick else QWEN_0_5B, 64 if args.quick else 512,
                   8 if args.quick else 64, args.repeats)


if __name__ == "__main__":
  main()

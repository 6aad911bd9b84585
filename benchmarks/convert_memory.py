"""Peak memory of `qv-convert` on a synthetic checkpoint: it must stay well below the checkpoint size
plus its largest tensor (the converter streams one target param at a time).

  python benchmarks/convert_memory.py            # ~2 GB Qwen2-layout checkpoint (bf16)
  python benchmarks/convert_memory.py --quick    # ~100 MB
  python benchmarks/convert_memory.py --gb 4 --layout quicksviewer

Writes random bf16 safetensors shards (Qwen2.5-7B proportions: the MLP stack is ~1/4 of the weights)
with a config.json into a temporary directory, converts them in a child process (the CLI's code), and
prints JSON: checkpoint bytes, largest source tensor, largest target param (a stacked [L, ...] param),
the converting process's peak RSS, its RSS after the imports and the start of JAX's CPU backend (fixed
runtime memory), and seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = """
import json, resource, sys, time
import jax, orbax.checkpoint.experimental.v1, flax.nnx, tqdm.auto
import qv_jax.model.decoder, qv_jax.model.vision_tower
from qv_jax.convert.cli import main
jax.devices("cpu")   # start the CPU backend: fixed runtime memory, not proportional to the checkpoint
import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
rc = main(sys.argv[1:])
print(json.dumps(dict(rc=rc, seconds=time.perf_counter() - start, import_rss=import_rss,
                      peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""


def decoder_shapes(hidden: int, layers: int, vocab: int) -> tuple[dict, dict[str, tuple[int, ...]]]:
  """Qwen2 config.json fields and tensor shapes (head_dim 64, 4 query heads per KV head, MLP 16/3·D)."""
  heads = hidden // 64
  kv = max(1, heads // 4)
  inter = int(round(hidden * 16 / 3 / 64)) * 64
  cfg = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=vocab, hidden_size=hidden,
             intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
             num_key_value_heads=kv, head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6,
             tie_word_embeddings=False, hidden_act="silu")
  shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
            "model.norm.weight": (hidden,)}
  for i in range(layers):
    p = f"model.layers.{i}."
    shapes.update({
        p + "self_attn.q_proj.weight": (heads * 64, hidden), p + "self_attn.q_proj.bias": (heads * 64,),
        p + "self_attn.k_proj.weight": (kv * 64, hidden), p + "self_attn.k_proj.bias": (kv * 64,),
        p + "self_attn.v_proj.weight": (kv * 64, hidden), p + "self_attn.v_proj.bias": (kv * 64,),
        p + "self_attn.o_proj.weight": (hidden, heads * 64),
        p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
        p + "mlp.down_proj.weight": (hidden, inter),
        p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
  return cfg, shapes


def quicksviewer_extra(hidden: int) -> tuple[dict, dict[str, tuple[int, ...]]]:
  """A small SigLIP (width 256, 4 layers, 14 px patches at 98 px) and the compressor, SPEC §8 names."""
  dv, m, layers = 256, 1024, 4
  vision = dict(hidden_size=dv, intermediate_size=m, num_hidden_layers=layers, num_attention_heads=4,
                image_size=98, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
  pre = "model.vision_tower.vision_tower.vision_model."
  shapes = {pre + "embeddings.patch_embedding.weight": (dv, 3, 14, 14), pre + "embeddings.patch_embedding.bias": (dv,),
            pre + "embeddings.position_embedding.weight": (49, dv),
            pre + "post_layernorm.weight": (dv,), pre + "post_layernorm.bias": (dv,)}
  for i in range(layers):
    p = f"{pre}encoder.layers.{i}."
    for proj in ("q", "k", "v", "out"):
      shapes.update({p + f"self_attn.{proj}_proj.weight": (dv, dv), p + f"self_attn.{proj}_proj.bias": (dv,)})
    shapes.update({p + "mlp.fc1.weight": (m, dv), p + "mlp.fc1.bias": (m,), p + "mlp.fc2.weight": (dv, m),
                   p + "mlp.fc2.bias": (dv,)})
    for ln in ("layer_norm1", "layer_norm2"):
      shapes.update({p + f"{ln}.weight": (dv,), p + f"{ln}.bias": (dv,)})
  r, c = "model.vision_resampler.", "model.cubing."
  shapes.update({r + "query": (4, hidden), r + "kv_proj.weight": (hidden, dv),
                 r + "attn.in_proj_weight": (3 * hidden, hidden), r + "attn.in_proj_bias": (3 * hidden,),
                 r + "attn.out_proj.weight": (hidden, hidden), r + "attn.out_proj.bias": (hidden,),
                 r + "proj": (hidden, hidden),
                 c + "agg_frame_fn.0.weight": (dv, dv), c + "agg_frame_fn.0.bias": (dv,),
                 c + "proj_fn.0.weight": (dv,), c + "proj_fn.0.bias": (dv,),
                 c + "proj_fn.1.weight": (dv, dv), c + "proj_fn.1.bias": (dv,),
                 c + "proj_fn.3.weight": (2, dv), c + "proj_fn.3.bias": (2,),
                 c + "thumbnail_fn.1.weight": (hidden, dv), c + "thumbnail_fn.1.bias": (hidden,)})
  for ln in ("ln_q", "ln_kv", "ln_post"):
    shapes.update({r + f"{ln}.weight": (hidden,), r + f"{ln}.bias": (hidden,)})
  cfg = dict(model_type="quicksviewer_qwen", architectures=["LlavaQwenForCausalLM"], num_queries=4,
             num_heads=max(1, hidden // 128), vision_config=vision)
  return cfg, shapes


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
  """bf16 random tensors written one at a time (never a whole shard in memory)."""
  header, offset = {}, 0
  for name, shape in shapes.items():
    n = math.prod(shape) * 2
    header[name] = dict(dtype="BF16", shape=list(shape), data_offsets=[offset, offset + n])
    offset += n
  raw = json.dumps(header).encode()
  raw += b" " * (-len(raw) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw)
    for shape in shapes.values():
      size = math.prod(shape)
      for start in range(0, size, 1 << 24):
        count = min(1 << 24, size - start)
        values = rng.standard_normal(count, dtype=np.float32) * 0.02
        f.write((values.view(np.uint32) >> 16).astype(np.uint16).tobytes())


def make_checkpoint(directory: Path, target_bytes: float, layout: str, shard_bytes: int = 512 << 20):
  hidden = 384 if target_bytes < 0.5e9 else 1536
  vocab = 32000
  per_layer = sum(math.prod(s) for n, s in decoder_shapes(hidden, 1, vocab)[1].items() if ".layers." in n) * 2
  fixed = (2 * vocab * hidden + hidden) * 2
  layers = max(1, round((target_bytes - fixed) / per_layer))
  config, shapes = decoder_shapes(hidden, layers, vocab)
  if layout == "quicksviewer":
    extra_cfg, extra = quicksviewer_extra(hidden)
    config.update(extra_cfg)
    shapes = {**extra, **shapes}
  shards, current, size = [], {}, 0
  for name, shape in shapes.items():
    nbytes = math.prod(shape) * 2
    if current and size + nbytes > shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = shape
    size += nbytes
  shards.append(current)
  rng = np.random.default_rng(0)
  weight_map = {}
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    write_safetensors(directory / file, shard, rng)
    weight_map.update({n: file for n in shard})
  (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  (directory / "config.json").write_text(json.dumps(config))
  return config, shapes


def run(target_gb: float, layout: str, workdir: Path) -> dict:
  src, out = workdir / "source", workdir / "converted"
  src.mkdir(parents=True)
  t = time.perf_counter()
  config, shapes = make_checkpoint(src, target_gb * 1e9, layout)
  gen_seconds = time.perf_counter() - t
  sizes = {n: math.prod(s) * 2 for n, s in shapes.items()}
  stacked: dict[str, int] = {}
  for n, b in sizes.items():
    head, _, tail = n.partition(".layers.")
    key = f"{head}.layers.{tail.split('.', 1)[-1]}" if tail else n
    stacked[key] = stacked.get(key, 0) + b
  proc = subprocess.run([sys.executable, "-c", CHILD, "--source", str(src), "--output", str(out), "--quiet"],
                        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if proc.returncode != 0:
    raise SystemExit(f"conversion failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  child = json.loads(proc.stdout.strip().splitlines()[-1])
  if child["rc"] != 0:
    raise SystemExit(f"qv-convert exited with {child['rc']}:\n{proc.stderr[-3000:]}")
  converted = json.loads((out / "conversion.json").read_text())["params"]
  checkpoint = sum(sizes.values())
  largest = max(sizes.values())
  return dict(
      layout=layout, layers=config["num_hidden_layers"], hidden=config["hidden_size"],
      source_tensors=len(shapes), converted_params=len(converted),
      checkpoint_bytes=checkpoint, largest_tensor_bytes=largest, largest_param_bytes=max(stacked.values()),
      peak_rss_bytes=child["peak_rss"], import_rss_bytes=child["import_rss"],
      peak_above_imports_bytes=child["peak_rss"] - child["import_rss"],
      bound_bytes=checkpoint + largest, peak_over_bound=round(child["peak_rss"] / (checkpoint + largest), 3),
      peak_above_imports_over_checkpoint=round((child["peak_rss"] - child["import_rss"]) / checkpoint, 3),
      seconds=round(child["seconds"], 2), generate_seconds=round(gen_seconds, 2),
      mb_per_second=round(checkpoint / 2**20 / child["seconds"], 1))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--gb", type=float, default=2.0, help="synthetic checkpoint size in GB (default 2)")
  p.add_argument("--quick", action="store_true", help="~100 MB checkpoint")
  p.add_argument("--layout", choices=("decoder", "quicksviewer"), default="decoder")
  p.add_argument("--workdir", default=None, help="where to write (default: a temporary directory)")
  args = p.parse_args(argv)
  gb = 0.1 if args.quick else args.gb
  if args.workdir:
    result = run(gb, args.layout, Path(args.workdir))
  else:
    with tempfile.TemporaryDirectory(prefix="qv_convert_bench_") as tmp:
      result = run(gb, args.layout, Path(tmp))
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()

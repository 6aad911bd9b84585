"""Compressor kinds side by side on one random-weight model and one synthetic batch, printed as JSON
(one object per kind): the merged prompt length (text + visual tokens), compressor + assembly time, decoder
prefill time and matmul FLOPs at that length. No accuracy: the weights are random (trained accuracy on the
demo data: `launch.compare_compressors`). Budgets are set equal to cubing's bound (thumbnail + Kmax·Q tokens): score_gating
keeps that many tokens, question_select keeps that many frames' worth of cubes.

  python benchmarks/compressors.py --quick      # tiny, bucket 16
  python benchmarks/compressors.py --size small --frames 64
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import device_info, emit, time_call  # noqa: E402


def _settings(c, frames: int) -> dict:
  from qv_jax.model.compressors.registry import visual_token_bound
  q = int(c.model.compressor.num_queries)
  budget = visual_token_bound(c.model, frames)
  kmax = (budget - (int(c.model.compressor.grid_size) ** 2) // int(c.model.compressor.thumbnail_pool)) // q
  return {"cubing": {}, "uniform": {},
          "score_gating": {"keep_ratio": min(1.0, budget / (frames * q))},
          "question_select": {"select_frames": kmax, "select_tokens": "cubes", "segment_frames": 8}}, budget


def run(size: str, frames: int, repeats: int):
  from configs.quicksviewer import get_config
  from qv_jax.config import validate
  from qv_jax.model.quicksviewer import Quicksviewer
  from qv_jax.train.flops import matmul_flops
  from qv_jax.train.synthetic_batches import SyntheticBatches
  base = get_config(f"size={size},stage=3")
  base.data.frame_buckets, base.data.max_frames = (frames,), frames
  base.data.max_text_len = 32 + 8 * frames
  kinds, budget = _settings(base, frames)
  ref = None
  for kind, extra in kinds.items():
    c = get_config(f"size={size},stage=3")
    c.data.frame_buckets, c.data.max_frames, c.data.max_text_len = (frames,), frames, base.data.max_text_len
    c.model.compressor.kind = kind
    for k, v in extra.items():
      c.model.compressor[k] = v
    c.data.max_seq_len = base.data.max_text_len + budget
    c = validate(c)
    model = Quicksviewer(c.model, max_seq_len=c.data.max_seq_len, rngs=nnx.Rngs(params=0))
    batch = {k: jnp.asarray(v) for k, v in next(SyntheticBatches(c, seed=7, num_frames=frames)).items()}
    features = nnx.jit(lambda m, f: m.frame_features(f))(model, batch["frames"])
    prep = nnx.jit(lambda m, b, f: m.prepare_inputs(b, key=None, noise_weight=0.0, encode_images=False,
                                                     features=f))
    merged, cubes = prep(model, batch, features)
    length = int(np.asarray(merged.length).max())
    e, m_, p = merged.embeds[:, :length], merged.mask[:, :length], merged.positions[:, :length]
    prefill = nnx.jit(lambda m, e, mk, p: m.decoder(inputs_embeds=e, positions=p, mask=mk, return_hidden=True)[0])
    record = dict(bench="compressors", kind=kind, size=size, frames=frames, settings=extra,
                  budget_tokens=budget, num_frames=np.asarray(batch["num_frames"]).tolist(),
                  merged_length=np.asarray(merged.length).tolist(),
                  compress_s=time_call(prep, model, batch, features, repeats=repeats)["median_s"],
                  prefill_s=time_call(prefill, model, e, m_, p, repeats=repeats)["median_s"],
                  prefill_flops=matmul_flops(lambda e, mk, p: model.decoder(
                      inputs_embeds=e, positions=p, mask=mk, return_hidden=True)[0], e, m_, p),
                  device=device_info())
    ref = ref or record
    record["prefill_flops_vs_cubing"] = record["prefill_flops"] / ref["prefill_flops"]
    record["prefill_s_vs_cubing"] = record["prefill_s"] / ref["prefill_s"]
    emit(record)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--size", default="tiny")
  ap.add_argument("--frames", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=3)
  a = ap.parse_args()
  run("tiny" if a.quick else a.size, 16 if a.quick else a.frames, a.repeats)


if __name__ == "__main__":
  main()

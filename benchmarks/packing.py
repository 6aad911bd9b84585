"""Sequence buckets and packed rows against one padded sample per row: useful (non-padding) merged decoder
tokens per second of the full jitted train step, and the fraction of decoder slots that are padding.

  python benchmarks/packing.py                      # size=small, 60 % image / 40 % video samples
  python benchmarks/packing.py --samples 96 --rows 2 --slots 8 --buckets 128,256,512

Both runs see the same sample stream (synthetic frames; prompt and answer lengths drawn from a log-normal
like the demo's conversations: median ~60 text tokens, videos of max_frames/2..max_frames frames). "before"
pads every sample to data.max_seq_len in batches of --batch; "after" packs rows first-fit
(data_pipeline/packing.py) into the smallest sequence bucket. Each batch shape is compiled once before
timing (compiles are counted and reported, not timed). Prints one JSON line per setting and one comparing them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import CompileCounter, device_info, emit  # noqa: E402
from data_pipeline.collate import Collator  # noqa: E402
from data_pipeline.packing import PackedCollator, PackingBatch  # noqa: E402
from data_pipeline.seq_buckets import bound_settings, merged_length_bound  # noqa: E402
from qv_jax.batch import IGNORE_INDEX  # noqa: E402
from qv_jax.config import get_config, validate  # noqa: E402
from qv_jax.sharding import axis_rules, make_mesh  # noqa: E402
from qv_jax.train.loop import to_global  # noqa: E402
from qv_jax.train.state import create_train_state  # noqa: E402
from qv_jax.train.compile import compile_train_step  # noqa: E402
from qv_jax.train.step import make_train_step  # noqa: E402
from qv_jax.train.synthetic_batches import SyntheticBatches  # noqa: E402


def demo_like_samples(config, count: int, image_fraction: float, seed: int) -> list[dict]:
  """Synthetic samples with a question of log-normal length prepended and the answer lengthened."""
  synth = SyntheticBatches(config, seed=seed, image_fraction=image_fraction)
  rng = np.random.default_rng(seed)
  vocab = int(config.model.decoder.vocab_size)
  limit = int(config.data.max_text_len)
  out = []
  for sid in range(count):
    x = synth.processed(sid)
    question = rng.integers(40, vocab - 16, int(np.clip(rng.lognormal(np.log(40), 0.7), 4, limit // 3)))
    answer = rng.integers(40, vocab - 16, int(np.clip(rng.lognormal(np.log(20), 0.8), 1, limit // 4)))
    room = limit - len(x["input_ids"])
    question, answer = question[:room // 2], answer[:room - room // 2]
    x["input_ids"] = np.concatenate([question, x["input_ids"], answer]).astype(np.int32)
    x["labels"] = np.concatenate([np.full(len(question), IGNORE_INDEX), x["labels"], answer]).astype(np.int32)
    x["token_frame"] = np.concatenate([np.full(len(question), -1), x["token_frame"],
                                       np.full(len(answer), -1)]).astype(np.int32)
    x["merged_bound"] = merged_length_bound(x["input_ids"], x["token_frame"], x["modality"], len(x["frames"]),
                                            **bound_settings(config.model))
    out.append(x)
  return out


def run(config, batches: list[dict], label: str) -> dict:
  mesh = make_mesh(config.mesh, [jax.devices()[0]])
  with jax.set_mesh(mesh), axis_rules(config.sharding_rules):
    state, spec = create_train_state(config, mesh)
    step = make_train_step(spec.graphdef, config, spec.tx)
    compiled, seconds, useful, slots = {}, 0.0, 0, 0
    with CompileCounter() as compiles:
      for local in batches:
        batch = to_global(local, mesh)
        key = tuple((k, v.shape) for k, v in batch.items())
        if key not in compiled:
          compiled[key] = compile_train_step(step, spec, state, batch)
          state, _ = jax.block_until_ready(compiled[key](state, batch))     # warm-up, not timed
        start = time.perf_counter()
        state, metrics = compiled[key](state, batch)
        metrics = jax.device_get(metrics)
        seconds += time.perf_counter() - start
        useful += int(metrics["merged_tokens"])
        slots += int(round(metrics["merged_tokens"] / max(1.0 - float(metrics["padding_fraction"]), 1e-9)))
  return dict(setting=label, steps=len(batches), shapes=len(compiled), compiles=compiles.count,
              seconds=round(seconds, 3), useful_tokens=useful, decoder_slots=slots,
              padding_fraction=round(1.0 - useful / slots, 4), useful_tokens_per_s=round(useful / seconds, 1))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", default="small")
  p.add_argument("--samples", type=int, default=96)
  p.add_argument("--image_fraction", type=float, default=0.6)
  p.add_argument("--batch", type=int, default=8, help="samples per batch before (one per row)")
  p.add_argument("--rows", type=int, default=2, help="packed rows per batch after")
  p.add_argument("--slots", type=int, default=8, help="data.pack_samples after")
  p.add_argument("--buckets", default="128,256,512", help="data.seq_buckets after")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)

  config = get_config(f"size={args.size}")
  config.data.dataset_name = "synthetic"
  config.mesh.data = config.mesh.fsdp = config.mesh.tensor = 1
  config = validate(config)
  samples = demo_like_samples(config, args.samples, args.image_fraction, args.seed)
  d = config.data
  too_long = [x["sample_id"] for x in samples if x["merged_bound"] > d.max_seq_len]
  samples = [x for x in samples if x["merged_bound"] <= d.max_seq_len]
  common = dict(image_size=d.image_size, max_text_len=d.max_text_len, frame_buckets=d.frame_buckets, pad_id=0,
                normalize_on_host=False)

  collate = Collator(**common)
  before = [collate(samples[i:i + args.batch]) for i in range(0, len(samples) - args.batch + 1, args.batch)]
  config = config.replace(data=dict(batch_size=args.batch))
  result_before = run(config, before, "one sample per row, padded to max_seq_len")

  buckets = tuple(int(b) for b in args.buckets.split(","))
  packed_config = get_config(f"size={args.size}")
  packed_config.data.dataset_name = "synthetic"
  packed_config.mesh.data = packed_config.mesh.fsdp = packed_config.mesh.tensor = 1
  packed_config.data.update(seq_buckets=buckets, pack_samples=args.slots, batch_size=args.rows)
  packed_config = validate(packed_config)
  stream = grain.MapDataset.source(samples).to_iter_dataset()
  packer = PackingBatch(stream, batch_size=args.rows, drop_remainder=True,
                        collator=PackedCollator(**common, seq_buckets=buckets, slots=args.slots))
  after = [{k: v for k, v in b.items() if k != "_meta"} for b in packer]
  result_after = run(packed_config, after, f"packed: {args.rows} rows x {args.slots} slots, buckets {buckets}")

  info = dict(benchmark="packing", size=args.size, samples=len(samples), image_fraction=args.image_fraction,
              skipped_too_long=len(too_long), **device_info())
  emit(dict(info, **result_before))
  emit(dict(info, **result_after))
  emit(dict(info, setting="ratio after/before",
            useful_tokens_per_s=round(result_after["useful_tokens_per_s"]
                                      / result_before["useful_tokens_per_s"], 3),
            padding_before=result_before["padding_fraction"], padding_after=result_after["padding_fraction"]))


if __name__ == "__main__":
  main()

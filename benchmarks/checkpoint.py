"""Cost of checkpoint checksums: the orbax save and restore of a params tree against the CRC-32 pass
that records (after the save is final, on a background thread) and verifies (before the restore) every
file of the step, extrapolated per byte to the released model.

  python benchmarks/checkpoint.py                      # 5e8 fp32 params (2 GB)
  python benchmarks/checkpoint.py --params 1e8 --repeats 1
  python benchmarks/checkpoint.py --quick               # 1e7 params

Prints one JSON line: bytes written, seconds for the orbax save (blocking call + background write), the
checksum recording, the orbax restore and the verification, their ratios and GB/s, and the same seconds
scaled to the released size's train checkpoint (8.3e9 params in fp32 + Adam's two moments; the hashing
is spread over `hash_threads` threads of process 0 at save and over all processes at restore).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qv_jax.train import checkpoint as ckpt            # noqa: E402

RELEASED_BYTES = 8.3e9 * 4 * 3


def _params(n: float, arrays: int) -> dict:
  per = int(n) // arrays
  cols = 4096
  rows = max(1, per // cols)
  key = jax.random.PRNGKey(0)
  return {f"layer_{i:02d}": jax.random.normal(jax.random.fold_in(key, i), (rows, cols), jnp.float32)
          for i in range(arrays)}


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(path) for n in ns)


def run(n_params: float, arrays: int, repeats: int, root: str) -> dict:
  params = _params(n_params, arrays)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  meta = {"step": jnp.asarray(0, jnp.int32)}
  opt = {"count": jnp.asarray(0, jnp.int32)}
  t = {k: [] for k in ("save_call", "save_total", "checksum", "verify", "restore")}
  nbytes = 0
  for r in range(repeats):
    workdir = os.path.join(root, f"run{r}")
    c = ckpt.Checkpointer(workdir, keep=1, async_save=True)
    start = time.perf_counter()
    c.save(1, params=params, opt_state=opt, meta=meta, data_state={})
    t["save_call"].append(time.perf_counter() - start)
    c.manager.wait_until_finished()
    t["save_total"].append(time.perf_counter() - start)
    start = time.perf_counter()
    c.wait()                                         # joins the checksum thread
    t["checksum"].append(time.perf_counter() - start)
    step_dir = c.step_dir(1)
    nbytes = _dir_bytes(step_dir)
    os.system("sync")
    start = time.perf_counter()
    assert c.damage(1) == []
    t["verify"].append(time.perf_counter() - start)
    start = time.perf_counter()
    restored = c.restore(1, params=abstract, opt_state=jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), opt), meta={"step": jax.ShapeDtypeStruct((), jnp.int32)})
    jax.tree.map(lambda x: x.block_until_ready(), restored[0])
    t["restore"].append(time.perf_counter() - start)
    del restored
    c.close()
    shutil.rmtree(workdir)
  med = {k: statistics.median(v) for k, v in t.items()}
  per_byte = {k: v / nbytes for k, v in med.items()}
  return dict(
      params=float(n_params), bytes=nbytes, repeats=repeats, hash_threads=min(8, os.cpu_count() or 1),
      devices=jax.device_count(), backend=jax.default_backend(),
      seconds={k: round(v, 4) for k, v in med.items()},
      checksum_over_save=round(med["checksum"] / med["save_total"], 3),
      verify_over_restore=round(med["verify"] / med["restore"], 3),
      checksum_gb_per_s=round(nbytes / med["checksum"] / 1e9, 3),
      verify_gb_per_s=round(nbytes / med["verify"] / 1e9, 3),
      released_checkpoint_bytes=RELEASED_BYTES,
      released_seconds_one_process={k: round(v * RELEASED_BYTES, 1) for k, v in per_byte.items()},
  )


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--params", type=float, default=5e8)
  p.add_argument("--arrays", type=int, default=16)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--quick", action="store_true", help="1e7 params, one repeat")
  p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
  a = p.parse_args()
  if a.quick:
    a.params, a.repeats = 1e7, 1
  root = a.dir or tempfile.mkdtemp(prefix="qv_ckpt_bench_")
  try:
    print(json.dumps(run(a.params, a.arrays, a.repeats, root)), flush=True)
  finally:
    if a.dir is None:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()

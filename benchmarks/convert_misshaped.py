"""Peak memory of `qv-convert` refusing a mis-shaped tensor: a tiny Qwen2 checkpoint whose `lm_head` is
1 GiB ([8388608, 64] bf16) where the tiny config expects [512, 64]. The refusal should come from the
headers, before any tensor is read, so the peak stays at the runtime's fixed memory.

  python benchmarks/convert_misshaped.py                      # this checkout
  python benchmarks/convert_misshaped.py --code /work/main    # another checkout (before / after)

Prints JSON: the lm_head bytes, the child's exit status, its peak RSS and its RSS after the imports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from convert_memory import CHILD, write_safetensors   # noqa: E402
from qv_jax.convert.fixtures import qwen2_layout, write_config_json  # noqa: E402


def make_checkpoint(directory: Path, lm_head_rows: int) -> dict[str, tuple[int, ...]]:
  import numpy as np
  shapes, config = qwen2_layout(lm_head_rows=lm_head_rows)
  write_safetensors(directory / "model.safetensors", shapes, np.random.default_rng(0))
  write_config_json(directory, config)
  return shapes


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--code", default=str(Path(__file__).resolve().parents[1]),
                 help="checkout whose qv_jax converts (default: this one)")
  p.add_argument("--gib", type=float, default=1.0, help="lm_head size in GiB (bf16 on disk)")
  p.add_argument("--quick", action="store_true", help="a 0.1 GiB lm_head")
  args = p.parse_args(argv)
  rows = int((0.1 if args.quick else args.gib) * 2**30 / (64 * 2))
  with tempfile.TemporaryDirectory(prefix="qv_convert_misshaped_") as tmp:
    src, out = Path(tmp) / "source", Path(tmp) / "converted"
    src.mkdir()
    make_checkpoint(src, rows)
    proc = subprocess.run([sys.executable, "-c", CHILD, "--source", str(src), "--output", str(out), "--quiet",
                           "--size", "tiny"], capture_output=True, text=True,
                          cwd=args.code, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=args.code))
  lines = proc.stdout.strip().splitlines()
  if not lines:
    raise SystemExit(f"the conversion crashed:\n{proc.stderr[-3000:]}")
  child = json.loads(lines[-1])
  print(json.dumps(dict(
      code=args.code, lm_head_shape=[rows, 64], lm_head_bytes=rows * 64 * 2, rc=child["rc"],
      error=proc.stderr.strip().splitlines()[0][:200] if proc.stderr.strip() else "",
      peak_rss_bytes=child["peak_rss"], import_rss_bytes=child["import_rss"],
      peak_above_imports_bytes=child["peak_rss"] - child["import_rss"], seconds=round(child["seconds"], 2)),
      indent=2))


if __name__ == "__main__":
  main()

"""`qv-convert` / `python -m qv_jax.convert.cli`: HF safetensors checkpoints -> a qv-jax orbax checkpoint.

  qv-convert --source DIR [--source DIR2 ...] --output OUT [--size SIZE] [--layout auto|siglip|decoder|
             quicksviewer] [--dtype keep|float32|bfloat16] [--resize-vocab] [--grid-out N] [--overwrite]

Each source is an HF directory of safetensors (a SigLIP, a Qwen2 / Llama 3 LLM, or a whole Quicksviewer
checkpoint); its layout comes from the tensor names or config.json. Several sources fill disjoint parts
of one model (stage 1 starts from SigLIP + Qwen2.5: `--source siglip --source qwen --size qwen2_7b
--resize-vocab`). Tensors stream one at a time into OUT/params (orbax), next to OUT/config.json and
OUT/conversion.json; `qv_jax.convert.writer.load_converted(OUT)` reads it back.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from qv_jax.config import ConfigError
from qv_jax.convert.derive_config import derive_config
from qv_jax.convert.layouts import converted_parts, detect_layout
from qv_jax.convert.mapping import MappingError
from qv_jax.convert.quicksviewer_map import LAYOUTS
from qv_jax.convert.readers import CheckpointReadError, SafetensorsReader, read_config_json
from qv_jax.convert.stream import ConversionReport, convert_tensors
from qv_jax.convert.writer import (CONFIG_FILE, PARAMS_DIR, REPORT_FILE, ParamWriter, converted_params,
                                   flatten, load_converted, read_config, write_metadata)

DTYPES = {"keep": None, "float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}

__all__ = ["convert", "load_converted", "main"]


OUTPUT_FILES = (PARAMS_DIR, CONFIG_FILE, REPORT_FILE)


def _source_dir(source: Path) -> Path:
  return (source if source.is_dir() else source.parent).resolve()


def check_output(sources: Sequence[Path], output: Path, overwrite: bool) -> Path:
  """Refuses an output that would overwrite or sit inside a source (or hold one), a non-empty output
  without `overwrite`, and with it any output holding files no conversion writes. Returns the output's
  real path."""
  real = output.resolve()
  for source in sources:
    root = _source_dir(source)
    if real == root or real.is_relative_to(root) and source.is_dir():
      raise FileExistsError(f"--output {output} is inside --source {source}; write the conversion elsewhere")
    if root.is_relative_to(real):
      raise FileExistsError(f"--source {source} is inside --output {output}; write the conversion elsewhere")
  if os.path.lexists(output):
    if not real.is_dir():
      raise FileExistsError(f"--output {output} exists and is not a directory")
    present = sorted(p.name for p in real.iterdir())
    if present and not overwrite:
      raise FileExistsError(f"--output {output} is not empty ({', '.join(present[:5])}); pass --overwrite to "
                            "replace an earlier conversion there")
    foreign = [n for n in present if n not in OUTPUT_FILES]
    if foreign:
      raise FileExistsError(f"--output {output} holds files a conversion does not write "
                            f"({', '.join(foreign[:5])}); refusing to replace it, even with --overwrite")
  return real


def _verify(staging: Path, written: dict[str, tuple[tuple[int, ...], str]]) -> None:
  """The staged conversion reads back: its config validates and conversion.json and the orbax metadata
  list exactly the params written, with their shapes."""
  from orbax.checkpoint.experimental import v1 as ocp
  read_config(staging)
  expected = {p: tuple(shape) for p, (shape, _) in written.items()}
  listed = {p: tuple(shape) for p, (shape, _) in converted_params(staging).items()}
  tree = ocp.metadata(staging / PARAMS_DIR, checkpointable_name=None).metadata
  stored = {p: tuple(m.shape) for p, m in flatten(tree).items()}
  if listed != expected or stored != expected:
    raise MappingError(f"{staging}: the written checkpoint does not hold the converted params; "
                       "conversion aborted, nothing was replaced")


def _commit(staging: Path, output: Path) -> None:
  """Renames the finished staging directory to `output`; a previous conversion there is moved aside
  first and deleted only once the new one is in place."""
  old = None
  if output.exists() and any(output.iterdir()):
    old = Path(tempfile.mkdtemp(prefix=f".{output.name}.previous-", dir=output.parent))
    try:
      os.rename(output, old)
    except BaseException:
      old.rmdir()
      raise
  try:
    os.rename(staging, output)
  except BaseException:
    if old is not None:
      os.rename(old, output)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def convert(sources: str | os.PathLike | Sequence[str | os.PathLike], output: str | os.PathLike, *,
            size: str | None = None, layout: str = "auto", dtype: str = "keep", resize_vocab: bool = False,
            grid_out: int | None = None, overwrite: bool = False, progress: bool = True,
            flush_bytes: int = 64 << 20) -> list[ConversionReport]:
  """Converts one or more checkpoint directories into `output` (what the CLI runs). Returns one report
  per source.

  The conversion is written into a hidden sibling directory (`.OUTPUT.converting-*`, on the same file
  system) and renamed to `output` only once complete and read back; on any failure `output` is left as
  it was (an earlier conversion there survives a failing `overwrite`)."""
  import ml_dtypes
  if isinstance(sources, (str, os.PathLike)):
    sources = [sources]
  sources = [Path(s) for s in sources]
  if dtype not in DTYPES:
    raise ValueError(f"--dtype {dtype!r}; expected one of {sorted(DTYPES)}")
  cast = ml_dtypes.bfloat16 if DTYPES[dtype] == "bfloat16" else DTYPES[dtype]
  output = Path(output)
  real_output = check_output(sources, output, overwrite)
  readers = []
  try:
    readers.extend(SafetensorsReader(s) for s in sources)
    layouts, specs = [], []
    for reader in readers:
      config_json = read_config_json(reader.path)
      lay = detect_layout(reader.names(), config_json) if layout == "auto" else layout
      layouts.append(lay)
      specs.append((lay, config_json, {n: reader.shape(n) for n in reader.names()}))
    config = derive_config(specs, size=size)
    if grid_out:
      import dataclasses

      from qv_jax.config import validate
      m = config.model
      m = dataclasses.replace(m, vision=dataclasses.replace(m.vision, grid_out=int(grid_out)),
                              compressor=dataclasses.replace(m.compressor, grid_size=int(grid_out)))
      config = validate(dataclasses.replace(config, model=m), converted_parts(layouts))
    real_output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{real_output.name}.converting-", dir=real_output.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)   # mkdtemp makes it private; the output gets the usual permissions
    try:
      writer = ParamWriter(staging, flush_bytes=flush_bytes)
      reports = []
      try:
        for reader, lay in zip(readers, layouts):
          reports.append(convert_tensors(reader, lay, config.model, writer.add, resize_vocab=resize_vocab,
                                         dtype=cast, progress=progress))
        writer.finalize()
      except BaseException:
        writer.abort()
        raise
      params = {}
      for r in reports:
        params.update({p: [list(s), d] for p, (s, d) in r.params.items()})
      write_metadata(staging, config, dict(
          sources=[dict(path=str(rd.path.resolve()), layout=r.layout,
                        mapped={n: list(t) for n, t in r.mapped}, ignored=r.ignored,
                        source_bytes=r.source_bytes, seconds=round(r.seconds, 3))
                   for rd, r in zip(readers, reports)],
          dtype=dtype, resize_vocab=resize_vocab, params=params, created=time.strftime("%Y-%m-%dT%H:%M:%S")))
      _verify(staging, writer.written)
      _commit(staging, real_output)
    finally:
      if staging.exists():
        shutil.rmtree(staging, ignore_errors=True)
    return reports
  finally:
    for reader in readers:
      reader.close()


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="qv-convert", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--source", action="append", required=True,
                 help="HF safetensors directory (repeat to combine a SigLIP and an LLM)")
  p.add_argument("--output", required=True, help="output directory (params/, config.json, conversion.json)")
  p.add_argument("--size", default=None, help="config size (tiny, small, qwen2_7b, llama3_8b); default: "
                 "derived from the checkpoints' config.json")
  p.add_argument("--layout", default="auto", choices=("auto",) + LAYOUTS)
  p.add_argument("--dtype", default="keep", choices=sorted(DTYPES),
                 help="stored dtype (keep: as in the source; load_converted casts to the model's)")
  p.add_argument("--resize-vocab", action="store_true",
                 help="fit embed_tokens / lm_head rows to the config's vocab_size: keep the tokenizer's rows "
                 "and add the 8 special tokens as mean rows, as the reference does")
  p.add_argument("--grid-out", type=int, default=None, help="tokens per side after interpolation (24)")
  p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in --output")
  p.add_argument("--quiet", action="store_true", help="no progress bar and no param listing")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    reports = convert(args.source, args.output, size=args.size, layout=args.layout, dtype=args.dtype,
                      resize_vocab=args.resize_vocab, grid_out=args.grid_out, overwrite=args.overwrite,
                      progress=not args.quiet)
  except (MappingError, CheckpointReadError, ConfigError, ValueError, OSError) as e:
    print(f"qv-convert: error: {e}", file=sys.stderr)
    return 2
  for src, r in zip(args.source, reports):
    print(f"{src}: {r.summary()}")
    if r.ignored:
      print(f"  ignored on purpose: {len(r.ignored)} tensors, e.g. {', '.join(r.ignored[:4])}")
    if not args.quiet:
      for path, (shape, dtype) in sorted(r.params.items()):
        print(f"  {path:<56} {str(list(shape)):<24} {dtype}")
  print(f"wrote {Path(args.output) / PARAMS_DIR} and {CONFIG_FILE}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

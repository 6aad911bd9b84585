"""Writing converted params to orbax one param at a time, and reading them back.

A converted directory holds:

  params/          an orbax pytree checkpoint of the nested param dict, whole-model paths
                   (`vision_tower/...`, `compressor/...`, `decoder/...`), in the stored dtype; the
                   same layout `StandardCheckpointer` writes, so it restores with it too
  config.json      the qv-jax config the params belong to (`Config.to_json`)
  conversion.json  what was converted: layout, source, {path: [shape, dtype]}, mapped and ignored names

`ParamWriter` streams: each `add(path, array)` is buffered until `flush_bytes` and then written by an
orbax partial save, so the process never holds more than the buffer plus the param being built.
`load_converted(dir)` returns (config, params), either as host numpy arrays or, given a target
(an abstract or concrete nnx State / pytree of `jax.ShapeDtypeStruct`s), restored straight into the
target's dtypes and shardings.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from qv_jax.convert.mapping import MappingError
from qv_jax.convert.readers import aligned_empty

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
REPORT_FILE = "conversion.json"
_PARTIAL_SUFFIX = ".partial_save"   # orbax's temporary directory of an unfinished partial save
# What a v0 `StandardCheckpointer` records for a pytree directory (its `_CHECKPOINT_METADATA`).
_STANDARD_HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"


def _ocp():
  from orbax.checkpoint.experimental import v1 as ocp
  return ocp


def nest(flat: Mapping[str, Any]) -> dict:
  """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Inverse of `nest`."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, path + "/"))
    else:
      out[path] = value
  return out


class StackBuffer:
  """A stacked [L, ...] param filled one layer at a time, held once (not as L layers plus a stack).

  The buffer is page-aligned, so handing it to orbax (`jax.device_put` on the CPU backend) aliases it
  instead of copying it."""

  def __init__(self, shape: tuple[int, ...], dtype):
    self.value = aligned_empty(tuple(shape), dtype)

  def set(self, index: int, layer: np.ndarray) -> None:
    self.value[index] = layer


class ParamWriter:
  """Streams {path: array} into `directory/params` with orbax partial saves; `finalize` commits.

  Arrays are buffered until `flush_bytes` (a larger one is saved on its own). A page-aligned array is
  saved without a copy, another is copied once; `compress` (zstd) adds about one more copy and is much
  slower, and weights barely compress, so it is off by default. The partial saves build an orbax v1 checkpoint
  in `directory/params.staging`; `finalize` moves its pytree to `directory/params`, a plain orbax pytree
  directory that `orbax.checkpoint.StandardCheckpointer().restore` reads as well as `load_converted`.
  """

  def __init__(self, directory: str | os.PathLike, *, flush_bytes: int = 64 << 20, compress: bool = False):
    self.directory = Path(directory)
    self.path = self.directory / PARAMS_DIR
    self.staging = self.directory / (PARAMS_DIR + ".staging")
    self.flush_bytes = flush_bytes
    self.compress = compress
    self._cpu = jax.devices("cpu")[0]
    self._buffer: dict[str, np.ndarray] = {}
    self._buffered = 0
    self.written: dict[str, tuple[tuple[int, ...], str]] = {}
    if self.path.exists():
      raise FileExistsError(f"{self.path} already exists")
    self.directory.mkdir(parents=True, exist_ok=True)
    self._remove_staging()

  def add(self, path: str, array: np.ndarray) -> None:
    if path in self.written:
      raise MappingError(f"param {path} written twice")
    array = np.ascontiguousarray(array)
    self.written[path] = (tuple(array.shape), str(array.dtype))
    if self._buffered + array.nbytes > self.flush_bytes:
      self.flush()                     # a large param is saved alone, not with the buffered ones
    self._buffer[path] = array
    self._buffered += array.nbytes
    if self._buffered >= self.flush_bytes:
      self.flush()

  def flush(self) -> None:
    if self._buffer:
      ocp = _ocp()
      context = ocp.Context()
      context.array.saving.use_compression = self.compress
      # Orbax writes CPU jax arrays without a copy and several times faster than numpy leaves;
      # device_put aliases a page-aligned numpy array (reader and StackBuffer outputs) and copies others.
      tree = nest({p: jax.device_put(a, self._cpu) for p, a in self._buffer.items()})
      self._buffer.clear()
      with context:
        ocp.partial.save(self.staging, tree)
      del tree
      gc.collect()   # orbax's async machinery leaves reference cycles that would keep the arrays alive
    self._buffer.clear()
    self._buffered = 0

  def finalize(self) -> None:
    self.flush()
    if not self.written:
      raise MappingError("no params were converted")
    _ocp().partial.finalize(self.staging)
    pytree_dirs = [d for d in self.staging.iterdir() if (d / "_METADATA").exists()]
    if len(pytree_dirs) != 1:
      raise RuntimeError(f"{self.staging}: expected one orbax pytree directory, found {pytree_dirs}")
    os.rename(pytree_dirs[0], self.path)
    meta = json.loads((self.staging / "_CHECKPOINT_METADATA").read_text())
    meta["item_handlers"] = _STANDARD_HANDLER
    (self.path / "_CHECKPOINT_METADATA").write_text(json.dumps(meta))
    if (self.staging / "commit_success.txt").exists():
      shutil.copy(self.staging / "commit_success.txt", self.path / "commit_success.txt")
    shutil.rmtree(self.staging)

  def abort(self) -> None:
    self._buffer.clear()
    self._remove_staging()

  def _remove_staging(self) -> None:
    for d in (self.staging, self.staging.parent / (self.staging.name + _PARTIAL_SUFFIX)):
      if d.exists():
        shutil.rmtree(d)


def write_metadata(directory: str | os.PathLike, config, report: dict) -> None:
  """config: the validated `Config`."""
  directory = Path(directory)
  (directory / CONFIG_FILE).write_text(config.to_json(indent=2) + "\n")
  (directory / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


def read_config(directory: str | os.PathLike):
  """The config of a converted directory, validated for the model parts it holds."""
  from qv_jax.config import validate
  file = Path(directory) / CONFIG_FILE
  if not file.exists():
    raise FileNotFoundError(f"{file}: not a converted checkpoint directory (no {CONFIG_FILE})")
  parts = tuple(sorted({path.split("/")[0] for path in converted_params(directory)}))
  return validate(json.loads(file.read_text()), parts)


def converted_params(directory: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
  """{param path: (shape, stored dtype)} of a converted directory, without reading any array."""
  file = Path(directory) / REPORT_FILE
  if not file.exists():
    raise FileNotFoundError(f"{file}: not a converted checkpoint directory (no {REPORT_FILE})")
  params = json.loads(file.read_text())["params"]
  return {path: (tuple(shape), dtype) for path, (shape, dtype) in params.items()}


def _target_leaves(target) -> dict[str, Any]:
  """{path: leaf} of a target: an nnx State (of Variables or raw leaves) or a nested dict."""
  from flax import nnx
  if isinstance(target, nnx.State):
    flat = nnx.to_flat_state(target)
    return {"/".join(str(p) for p in path): (v.get_value() if isinstance(v, nnx.Variable) else v)
            for path, v in flat}
  return flatten(target)


def _abstract(leaf) -> jax.ShapeDtypeStruct:
  """The leaf's shape, dtype and sharding; unsharded leaves go to the default device."""
  sharding = getattr(leaf, "sharding", None)
  if not isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def load_converted(directory: str | os.PathLike, target: Any = None, *, part: str | None = None,
                   strict: bool = False) -> tuple[Any, Any]:
  """Reads a `qv-convert` output: (config, params).

  target None: params is the nested dict of host numpy arrays, as stored (full-model paths).
  target given (the model's nnx State, abstract or concrete, e.g. `nnx.state(nnx.eval_shape(...))`, or a
  nested dict of arrays / `jax.ShapeDtypeStruct`s): every stored param must exist in the target with the
  same shape; it is restored in the target leaf's dtype and, where the leaf has one, its sharding (each
  process reads only its shards). Returns an nnx State holding just the stored params (apply with
  `nnx.update(model, params)`); with strict=True every target leaf must be stored. Mismatches raise
  `MappingError` listing the paths and shapes.
  part: one model part ("vision_tower", "compressor", "decoder"): only its params are read, and paths
  (of the target and the result) are relative to it, e.g. to fill a lone `SiglipVisionTower`.
  """
  directory = Path(directory)
  config = read_config(directory)
  stored = converted_params(directory)
  if part is not None:
    prefix = part.rstrip("/") + "/"
    stored = {p[len(prefix):]: v for p, v in stored.items() if p.startswith(prefix)}
    if not stored:
      raise MappingError(f"{directory}: holds no {part} params")
  if target is None:
    import jax.numpy as jnp
    abstract = nest({p: np.empty(shape, jnp.dtype(dtype)) for p, (shape, dtype) in stored.items()})
    return config, _load(directory, abstract, part)
  leaves = _target_leaves(target)
  problems = []
  missing = sorted(set(stored) - set(leaves))
  if missing:
    problems.append("stored params the target does not have:\n" +
                    "\n".join(f"  {p}: {list(stored[p][0])}" for p in missing))
  bad = [f"  {p}: stored {list(stored[p][0])}, target {list(leaves[p].shape)}"
         for p in sorted(set(stored) & set(leaves)) if tuple(leaves[p].shape) != stored[p][0]]
  if bad:
    problems.append("mis-shaped params:\n" + "\n".join(bad))
  if strict:
    absent = sorted(set(leaves) - set(stored))
    if absent:
      problems.append("target params the checkpoint does not hold:\n" +
                      "\n".join(f"  {p}: {list(leaves[p].shape)}" for p in absent))
  if problems:
    raise MappingError(f"{directory}: converted params do not match the target:\n" + "\n".join(problems))
  from flax import nnx
  return config, nnx.State(_load(directory, nest({p: _abstract(leaves[p]) for p in stored}), part))


def _load(directory: Path, abstract: dict, part: str | None) -> dict:
  """Restores `abstract` (relative to `part` when given) from directory/params."""
  ocp = _ocp()
  if part is not None:
    abstract = {part.rstrip("/"): abstract}
  context = ocp.Context()
  context.pytree.loading.partial_load = True   # the abstract tree may cover only some stored parts
  with context:
    restored = ocp.load(directory / PARAMS_DIR, abstract, checkpointable_name=None)
  return restored if part is None else restored[part.rstrip("/")]

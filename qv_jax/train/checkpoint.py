"""Checkpoints (orbax): params (the whole model, one pure dict), optimizer state, step, RNG and each
process's data-iterator state; async saves, keep-N, resume from the latest step of a work directory.

Layout: `WORKDIR/checkpoints/<step>/{params,opt_state,meta,data}`; `data/process_<i>-of-<n>.json` holds the
loader state of process i. `meta` holds 0-d jax arrays (orbax cannot restore NumPy scalars) and the
model's param shapes are checked against a checkpoint before anything is restored.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from qv_jax.train.stages import flat_paths


class CheckpointError(ValueError):
  """A checkpoint that cannot be used here; the message names the directory and what differs."""


def _encode_state(state: Any) -> str:
  if isinstance(state, bytes):
    return json.dumps({"bytes": base64.b64encode(state).decode()})
  return json.dumps({"json": state})


def _decode_state(text: str) -> Any:
  obj = json.loads(text)
  return base64.b64decode(obj["bytes"]) if "bytes" in obj else obj["json"]


class DataStateHandler(ocp.CheckpointHandler):
  """Writes one JSON file per process with that process's iterator state (bytes or JSON values)."""

  def save(self, directory: epath.Path, args: "DataStateSave"):
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    (epath.Path(directory) / name).write_text(_encode_state(args.state))

  def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None):
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    path = epath.Path(directory) / name
    if not path.exists():
      found = sorted(p.name for p in epath.Path(directory).iterdir())
      raise CheckpointError(f"{path} does not exist (found {found}): the checkpoint was written by a "
                            f"different number of processes than the {jax.process_count()} running now")
    return _decode_state(path.read_text())

  def metadata(self, directory):
    return None

  def structure(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


def _shape_report(directory, saved: dict, expected: dict) -> list[str]:
  saved_flat = {"/".join(map(str, k)): tuple(getattr(v, "shape", ())) for k, v in flat_paths(saved).items()}
  want_flat = {"/".join(map(str, k)): tuple(v.shape) for k, v in flat_paths(expected).items()}
  problems = []
  for k in sorted(set(want_flat) | set(saved_flat)):
    if k not in saved_flat:
      problems.append(f"missing {k} {want_flat[k]}")
    elif k not in want_flat:
      problems.append(f"unexpected {k} {saved_flat[k]}")
    elif saved_flat[k] != want_flat[k]:
      problems.append(f"{k}: checkpoint {saved_flat[k]} vs model {want_flat[k]}")
  return problems


def check_params_match(directory, saved_metadata: dict, expected: dict, model_size: str | None = None):
  """Raises CheckpointError listing every param whose presence or shape differs."""
  problems = _shape_report(directory, saved_metadata, expected)
  if problems:
    shown = "; ".join(problems[:12]) + (f"; ... {len(problems) - 12} more" if len(problems) > 12 else "")
    size = f" (this run's model size is {model_size!r})" if model_size else ""
    parts = sorted({p.split()[-2 if p.startswith(("missing", "unexpected")) else 0].split("/")[0]
                    for p in problems})
    raise CheckpointError(f"checkpoint {directory} does not match the model{size}: {len(problems)} params "
                          f"differ, in {', '.join(parts)}: {shown}")


def _tree_metadata(item_metadata) -> dict:
  tree = getattr(item_metadata, "tree", item_metadata)
  return dict(tree) if tree is not None else {}


class Checkpointer:
  """Saves and restores train states under `workdir/checkpoints`."""

  ITEMS = ("params", "opt_state", "meta", "data")

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.directory = epath.Path(workdir) / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=int(keep), enable_async_checkpointing=async_save,
                                           create=True)
    handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                "meta": ocp.StandardCheckpointHandler(), "data": DataStateHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, *, params: dict, opt_state: Any, meta: dict, data_state: Any,
           force: bool = True) -> bool:
    args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                              meta=ocp.args.StandardSave(meta), data=DataStateSave(data_state))
    return self.manager.save(int(step), args=args, force=force)

  def restore(self, step: int, *, params: dict, opt_state: Any, meta: dict, model_size: str | None = None):
    """Restores into the abstract trees given (ShapeDtypeStructs with shardings); returns
    (params, opt_state, meta, data_state)."""
    saved = self.manager.item_metadata(step)
    check_params_match(self.directory / str(step), _tree_metadata(saved["params"]), params, model_size)
    out = self.manager.restore(int(step), args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params), opt_state=ocp.args.StandardRestore(opt_state),
        meta=ocp.args.StandardRestore(meta), data=DataStateRestore()))
    return out["params"], out["opt_state"], out["meta"], out["data"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def resolve_params_dir(path: str) -> epath.Path:
  """`path` may be a work directory (its latest checkpoint), a `checkpoints` directory, a step directory
  or a step's `params` directory. Returns the params directory."""
  p = epath.Path(path)
  if not p.exists():
    raise CheckpointError(f"train.init_from: {path} does not exist")
  candidates = [p / "checkpoints", p]
  for base in candidates:
    if (base / "params").is_dir():
      return base / "params"
    if base.is_dir():
      steps = sorted(int(c.name) for c in base.iterdir() if c.name.isdigit() and (c / "params").is_dir())
      if steps:
        return base / str(steps[-1]) / "params"
  if (p / "_METADATA").exists() or (p / "_CHECKPOINT_METADATA").exists():
    return p
  raise CheckpointError(f"train.init_from: no checkpoint under {path} (expected a work directory, "
                        f"a step directory or a params directory)")


def load_params(path: str, abstract: dict, model_size: str | None = None) -> dict:
  """Restores a whole-model param dict from a checkpoint written by this trainer into `abstract`
  (ShapeDtypeStructs with shardings), after checking every name and shape."""
  params_dir = resolve_params_dir(path)
  handler = ocp.StandardCheckpointHandler()
  meta = handler.metadata(params_dir)
  check_params_match(params_dir, _tree_metadata(getattr(meta, "item_metadata", meta)), abstract, model_size)
  return handler.restore(params_dir, args=ocp.args.StandardRestore(abstract))


def is_converted(path: str) -> bool:
  """A `qv-convert` output directory (params/ + config.json + conversion.json)."""
  return os.path.isfile(os.path.join(path, "conversion.json")) and os.path.isdir(os.path.join(path, "params"))


def load_converted_params(path: str, abstract: dict) -> dict:
  """The params a `qv-convert` output holds (e.g. SigLIP + the LLM for stage 1, whose compressor is new),
  restored into `abstract`'s dtypes and shardings; names and shapes are checked (MappingError lists them)."""
  from flax import nnx
  from qv_jax.convert.writer import load_converted
  _, state = load_converted(path, abstract)
  return nnx.to_pure_dict(state) if isinstance(state, nnx.State) else dict(state)


def saved_step_dirs(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def as_numpy_tree(tree):
  return jax.tree.map(np.asarray, tree)

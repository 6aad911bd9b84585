"""Checkpoints (orbax): params (the whole model, one pure dict), optimizer state, step, RNG and each
process's data-iterator state; async saves, keep-N, resume from the latest step of a work directory.

Layout: `WORKDIR/checkpoints/<step>/{params,opt_state,meta,data,qv_checksums-<i>-of-<n>.json}`;
`data/process_<i>-of-<n>.json` holds the loader state of process i; a damaged step found at resume is
renamed `<step>.damaged` and the newest intact one is used (see docs/checkpoints.md). `meta` holds 0-d jax arrays (orbax cannot restore NumPy scalars) and the
model's param shapes are checked against a checkpoint before anything is restored.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import logging
import os
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from qv_jax.train import checkpoint_integrity as integrity

log = logging.getLogger(__name__)


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


def _shape_report(saved: dict, expected: dict) -> list[tuple[str, str]]:
  """[(param path, what differs)] for every param missing, unexpected or of another shape."""
  saved_flat = {"/".join(map(str, k)): tuple(getattr(v, "shape", ()))
                for k, v in traverse_util.flatten_dict(saved).items()}
  want_flat = {"/".join(map(str, k)): tuple(v.shape) for k, v in traverse_util.flatten_dict(expected).items()}
  problems = []
  for k in sorted(set(want_flat) | set(saved_flat)):
    if k not in saved_flat:
      problems.append((k, f"missing {k} {want_flat[k]}"))
    elif k not in want_flat:
      problems.append((k, f"unexpected {k} {saved_flat[k]}"))
    elif saved_flat[k] != want_flat[k]:
      problems.append((k, f"{k}: checkpoint {saved_flat[k]} vs model {want_flat[k]}"))
  return problems


def check_params_match(directory, saved_metadata: dict, expected: dict, model_size: str | None = None):
  """Raises CheckpointError listing every param whose presence or shape differs."""
  if not saved_metadata:
    raise CheckpointError(f"checkpoint {directory} lists no params (its _METADATA is missing or empty)")
  problems = _shape_report(saved_metadata, expected)
  if problems:
    texts = [t for _, t in problems]
    shown = "; ".join(texts[:12]) + (f"; ... {len(texts) - 12} more" if len(texts) > 12 else "")
    size = f" (this run's model size is {model_size!r})" if model_size else ""
    parts = sorted({k.split("/")[0] for k, _ in problems})
    raise CheckpointError(f"checkpoint {directory} does not match the model{size}: {len(problems)} params "
                          f"differ, in {', '.join(parts)}: {shown}")


def _tree_metadata(item_metadata) -> dict:
  tree = getattr(item_metadata, "tree", item_metadata)
  return dict(tree) if tree is not None else {}


class Checkpointer:
  """Saves and restores train states under `workdir/checkpoints`; records checksums of every finalised
  step and verifies them before restoring (checkpoint_integrity.py)."""

  ITEMS = ("params", "opt_state", "meta", "data")

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.directory = epath.Path(workdir) / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=int(keep), enable_async_checkpointing=async_save,
                                           create=True)
    handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                "meta": ocp.StandardCheckpointHandler(), "data": DataStateHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._hashers: list[threading.Thread] = []
    self._last_issued = -1

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    return os.fspath(self.directory / str(int(step)))

  def save(self, step: int, *, params: dict, opt_state: Any, meta: dict, data_state: Any,
           force: bool = True) -> bool:
    args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                              meta=ocp.args.StandardSave(meta), data=DataStateSave(data_state))
    saved = self.manager.save(int(step), args=args, force=force)
    self._last_issued = int(step)
    if saved:
      t = threading.Thread(target=self._checksum_when_final, args=(int(step),), name=f"qv-checksum-{step}",
                           daemon=True)
      t.start()
      self._hashers.append(t)
    return saved

  def _checksum_when_final(self, step: int) -> None:
    # A step is final once orbax has no save in flight or has started a later one (which waits for it).
    while self.manager.is_saving_in_progress() and self._last_issued == step:
      time.sleep(0.02)
    path = self.step_dir(step)
    try:
      if os.path.isdir(path):
        integrity.write_checksums(path, (jax.process_index(), jax.process_count()))
    except OSError as e:       # deleted by keep-N meanwhile, or a full disk: the step stays unverified
      log.warning("could not record checksums of checkpoint %s: %s", path, e)

  def _data_file(self) -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def damage(self, step: int) -> list[str]:
    """What is wrong with a step's files (empty: intact or unverifiable, see the log). Raises
    CheckpointError for a checkpoint that is intact but cannot be used by this run."""
    path = self.step_dir(step)
    problems, incompatible = integrity.structure_problems(path, self._data_file())
    if incompatible:
      raise CheckpointError(f"checkpoint {path}: {incompatible}")
    try:
      recorded = integrity.read_checksums(path)
    except ValueError as e:
      problems.append(str(e))
      recorded = {}
    if recorded is None and not problems:
      log.warning("checkpoint %s has no checksums (written before they existed, or the run stopped while "
                  "they were computed): restoring it unverified", path)
    elif recorded and not problems:
      problems += integrity.content_problems(path, recorded, (jax.process_index(), jax.process_count()))
    if jax.process_count() > 1:               # every process must reach the same decision
      counts = np.asarray(_gather_counts(f"damage_{step}", len(problems)))
      if not problems and np.any(counts):
        problems = [f"damaged files found by processes {np.flatnonzero(counts).tolist()} (see their logs)"]
    return problems

  def restore(self, step: int, *, params: dict, opt_state: Any, meta: dict, model_size: str | None = None):
    """Restores into the abstract trees given (ShapeDtypeStructs with shardings); returns
    (params, opt_state, meta, data_state)."""
    saved = self.manager.item_metadata(step)
    check_params_match(self.directory / str(step), _tree_metadata(saved["params"]), params, model_size)
    out = self.manager.restore(int(step), args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params), opt_state=ocp.args.StandardRestore(opt_state),
        meta=ocp.args.StandardRestore(meta), data=DataStateRestore()))
    return out["params"], out["opt_state"], out["meta"], out["data"]

  def restore_latest(self, **abstract):
    """Restores the newest intact step: (step, (params, opt_state, meta, data_state)), or None when there
    is no checkpoint. A damaged newer step is logged, renamed `<step>.damaged` and skipped; when no step
    is intact, raises CheckpointError naming each one and what is wrong (and renames nothing)."""
    damaged: list[tuple[int, str]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      problems = self.damage(step)
      if not problems:
        verified = integrity.read_checksums(self.step_dir(step)) is not None
        try:
          restored = self.restore(step, **abstract)
        except CheckpointError:
          raise
        except Exception as e:  # noqa: BLE001  (orbax/tensorstore raise many types for unreadable files)
          if verified:
            raise CheckpointError(f"checkpoint {self.step_dir(step)} is intact but cannot be restored: "
                                  f"{_first_line(e)}") from e
          problems = [f"unreadable: {_first_line(e)}"]
      if problems:
        reason = "; ".join(problems[:4]) + (f"; ... {len(problems) - 4} more" if len(problems) > 4 else "")
        log.warning("checkpoint %s is damaged: %s", self.step_dir(step), reason)
        damaged.append((step, reason))
        continue
      if damaged:
        self._set_aside([s for s, _ in damaged], step)
      return step, restored
    if damaged:
      lines = "; ".join(f"step {s}: {r}" for s, r in damaged)
      raise CheckpointError(f"no intact checkpoint in {self.directory} ({lines}); move the damaged step "
                            f"directories away to start afresh")
    return None

  def _set_aside(self, steps: list[int], restored: int) -> None:
    if jax.process_index() == 0:
      for s in steps:
        src = self.step_dir(s)
        dst, n = f"{src}.damaged", 1
        while os.path.exists(dst):
          n += 1
          dst = f"{src}.damaged-{n}"
        os.rename(src, dst)
        log.warning("checkpoint step %d is damaged: kept as %s for inspection; resuming from step %d",
                    s, dst, restored)
    if jax.process_count() > 1:
      _gather_counts("set_aside", 0)
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()
    for t in self._hashers:
      t.join()
    self._hashers.clear()

  def close(self):
    self.wait()
    self.manager.close()


_GATHERS = itertools.count()


def _gather_counts(tag: str, count: int, timeout_ms: int = 10 * 60 * 1000) -> list[int]:
  """Every process's `count`, through the distributed key-value store (no device collective: processes
  may arrive minutes apart while hashing or tracing)."""
  client = ocp.multihost.get_jax_distributed_client()
  key = f"qv_jax/{tag}_{next(_GATHERS)}/"
  client.key_value_set(key + str(jax.process_index()), str(int(count)))
  client.wait_at_barrier(key.replace("/", "_"), timeout_in_ms=timeout_ms)
  values = {int(k.rsplit("/", 1)[-1]): int(v) for k, v in client.key_value_dir_get(key)}
  return [values[i] for i in range(jax.process_count())]


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300] if text else ''}"


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


def _check_params_checksums(params_dir: epath.Path) -> None:
  """Raises CheckpointError when the params of a checksummed step directory are damaged."""
  step_dir = os.fspath(params_dir.parent)
  try:
    recorded = integrity.read_checksums(step_dir)
  except ValueError as e:
    raise CheckpointError(f"train.init_from: checkpoint {step_dir}: {e}") from None
  params = {k: v for k, v in (recorded or {}).items() if k.startswith(params_dir.name + "/")}
  problems = integrity.content_problems(step_dir, params) if params else []
  if problems:
    raise CheckpointError(f"train.init_from: checkpoint {step_dir} is damaged: " + "; ".join(problems[:4]))


def load_params(path: str, abstract: dict, model_size: str | None = None) -> dict:
  """Restores a whole-model param dict from a checkpoint written by this trainer into `abstract`
  (ShapeDtypeStructs with shardings), after checking every name and shape."""
  params_dir = resolve_params_dir(path)
  _check_params_checksums(params_dir)
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

"""The training loop: config checks, the mesh, sharded state (fresh, resumed from the work directory, or
initialised from the previous stage), the compiled step, host→device feeding, metrics, checkpoints,
SIGTERM and non-finite losses.

    summary = train(config, workdir="runs/stage1")

Every process runs this; each feeds its loading group's shard of the global batch
(`jax.make_array_from_process_local_data`; hosts whose devices hold the same batch rows load the same
rows: `qv_jax.sharding.loading_groups`). Resuming is automatic: the latest checkpoint of
`workdir/checkpoints` restores params, optimizer state, step, RNG and the data-iterator state, so a killed
and resumed run continues with the losses an uninterrupted run would have had.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import threading
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from qv_jax.batch import BATCH_KEYS, MODALITY_IMAGE, MODALITY_VIDEO, batch_keys
from qv_jax.config import require, validate
from qv_jax.config.train import validate_train_against
from qv_jax.sharding import axis_rules, data_sharding, loading_groups, make_mesh
from qv_jax.train import checkpoint as ckpt
from qv_jax.train.config_change import check_resume_config, write_config
from qv_jax.train.flops import matmul_flops
from qv_jax.train.metrics import MetricsWriter, StepTimer, compiled_flops
from qv_jax.train.state import (TrainState, create_train_state, full_params, merge_trees, split_tree,
                                train_state_spec)
from qv_jax.train.compile import compile_train_step
from qv_jax.train.step import make_train_step

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the message names the step and the samples."""


@dataclasses.dataclass
class TrainSummary:
  workdir: str
  start_step: int
  final_step: int
  interrupted: bool
  losses: dict[int, float]              # step (1-based, after the update) -> loss
  step_time_s: float | None
  flops_per_step: float | None
  last_metrics: dict[str, Any]


def check_config(config, mesh, groups: int | None = None) -> None:
  """Static checks that must fail before anything compiles. `mesh` may be a topology's mesh and `groups`
  its loading groups (default: `loading_groups(mesh)`: hosts holding the same batch rows load together)."""
  config = validate(config)
  validate_train_against(config)
  n_groups = loading_groups(mesh)[0] if groups is None else int(groups)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  b = int(config.data.batch_size)
  require(b % n_groups == 0, "data.batch_size",
          f"global batch {b} is not divisible by the {n_groups} loading groups (hosts holding distinct "
          f"batch rows) of mesh {dict(mesh.shape)}")
  require(b % shards == 0, "data.batch_size",
          f"global batch {b} is not divisible by the {shards} batch shards of mesh {dict(mesh.shape)}")
  micro = b // int(config.train.grad_accum)
  require(micro % shards == 0, "train.grad_accum",
          f"micro-batch {micro} (= {b} / {config.train.grad_accum}) is not divisible by the {shards} batch "
          f"shards of mesh {dict(mesh.shape)}")


class _Stop:
  """SIGTERM (and SIGINT when asked) set a flag the loop polls once per step."""

  def __init__(self, handle_sigint: bool = False):
    self.flag = False
    self._old = {}
    if threading.current_thread() is threading.main_thread():
      sigs = [signal.SIGTERM] + ([signal.SIGINT] if handle_sigint else [])
      for s in sigs:
        self._old[s] = signal.signal(s, self._handler)

  def _handler(self, signum, frame):
    log.warning("signal %d: saving a checkpoint and stopping after this step", signum)
    self.flag = True

  def requested(self) -> bool:
    if jax.process_count() == 1:
      return self.flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self.flag, np.int32))))

  def restore(self):
    for s, old in self._old.items():
      signal.signal(s, old)


def default_data(config, mesh=None) -> Iterator[dict]:
  """The batches `train` uses when none are handed in: generated ones for `data.dataset_name ==
  "synthetic"`. A dataset on disk is read by the application layer above the library
  (`data_pipeline.loader.make_data`, which `launch/train.py` calls) and passed as `data=`."""
  d = config.data
  require(d.dataset_name == "synthetic", "data.dataset_name",
          f"{d.dataset_name!r} is read from disk: pass train(data=data_pipeline.loader.make_data) "
          f"(as launch/train.py does) or an iterator of batches")
  from qv_jax.train.synthetic_batches import process_synthetic_batches
  return process_synthetic_batches(config, mesh=mesh)


def check_batch(batch: dict, config, step: int) -> None:
  """Host-side checks of one local batch before it goes to the device."""
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"step {step}: batch lacks keys {missing} (see qv_jax/batch.py)")
  video = batch["modality"] == MODALITY_VIDEO
  short = video & (batch["num_frames"] < 2)
  if short.any():
    raise ValueError(f"step {step}: video samples {batch['sample_id'][short].tolist()} have fewer than 2 "
                     f"frames; the cubing network needs N >= 2")
  if not config.train.encode_images and (batch["modality"] == MODALITY_IMAGE).any():
    ids = batch["sample_id"][batch["modality"] == MODALITY_IMAGE].tolist()
    raise ValueError(f"step {step}: image samples {ids} in the data but train.encode_images is False")


def to_global(batch: dict, mesh) -> dict:
  """This process's rows -> global arrays sharded over (data, fsdp): G loading groups x the local rows
  (the hosts of one group hand in identical rows)."""
  out = {}
  n_groups = loading_groups(mesh)[0]
  for k in batch_keys(batch):
    x = np.asarray(batch[k])
    global_shape = (x.shape[0] * n_groups,) + x.shape[1:]
    sharding = data_sharding(mesh, x.ndim, shape=global_shape)
    out[k] = jax.make_array_from_process_local_data(sharding, x, global_shape)
  return out


def loader_counts(it) -> dict[str, float]:
  stats = getattr(it, "loader_stats", None)
  if stats is None:
    return {}
  return {f"loader/{k}": float(v) for k, v in stats().items()}


def _restore_or_init(config, mesh, rules, checkpointer: ckpt.Checkpointer, data_iter):
  resumed = _restore(config, mesh, rules, checkpointer, data_iter)
  if resumed is not None:
    return resumed
  init_from = config.train.init_from
  if init_from and ckpt.is_converted(init_from):
    # A converted release (qv-convert): its params replace the fresh ones, the rest stays new.
    log.info("initialising from the converted checkpoint %s", init_from)
    return create_train_state(config, mesh, rules, partial=True,
                              params_loader=lambda abstract: ckpt.load_converted_params(init_from, abstract))
  if init_from:
    log.info("initialising from the checkpoint %s", init_from)
    return create_train_state(config, mesh, rules,
                              params_loader=lambda abstract: ckpt.load_params(init_from, abstract,
                                                                               config.model.size))
  return create_train_state(config, mesh, rules)


def _restore(config, mesh, rules, checkpointer, data_iter):
  """The newest intact checkpoint of the work directory as (state, spec), or None when there is none."""
  if checkpointer.latest_step() is None:
    return None
  abstract, spec = train_state_spec(config, mesh, rules)
  abs_meta = {"step": abstract.step, "rng": abstract.rng}
  found = checkpointer.restore_latest(
      params=merge_trees(abstract.params, abstract.frozen), opt_state=abstract.opt_state,
      meta=abs_meta, model_size=config.model.size)
  if found is None:
    return None
  step, (params, opt_state, meta, data_state) = found
  trainable, frozen = split_tree(params, abstract.params)
  if data_iter is not None and data_state is not None:
    data_iter.set_state(data_state)
  log.info("resumed from %s at step %d", checkpointer.directory, step)
  return TrainState(step=meta["step"], params=trainable, frozen=frozen, opt_state=opt_state,
                    rng=meta["rng"]), spec


def train(config, *, workdir: str | None = None,
          data: Iterator[dict] | Callable[[Any], Iterator[dict]] | None = None,
          on_step: Callable[[int, dict], None] | None = None, handle_sigint: bool = False,
          devices=None) -> TrainSummary:
  """Runs (or resumes) one stage to `train.total_steps` (or `train.stop_at`). `data`: an iterator of this
  process's batches with get_state/set_state, or a function config -> such an iterator, called after the
  config and resume checks (`data_pipeline.loader.make_data`); default: the generated batches of
  `default_data`, for `data.dataset_name == "synthetic"` only. `devices`: the mesh's devices
  (default: all); `on_step(step, host_metrics)` is called after every step."""
  workdir = workdir or config.train.workdir
  require(bool(workdir), "train.workdir", "a work directory is required")
  require(not os.path.exists(workdir) or os.path.isdir(workdir), "train.workdir",
          f"{workdir} exists and is not a directory")
  config = validate(config)              # before the mesh: mesh.data=0 is a config error, not a device count
  mesh = make_mesh(config.mesh, devices)
  check_config(config, mesh)
  rules = config.sharding_rules
  t = config.train
  saved_steps = ckpt.saved_step_dirs(workdir)
  resumed_step = saved_steps[-1] if saved_steps else None
  check_resume_config(config, workdir, resumed_step)
  os.makedirs(workdir, exist_ok=True)
  if t.compilation_cache_dir:
    enable_compilation_cache(t.compilation_cache_dir)
  if jax.process_index() == 0:
    write_config(config, workdir, resumed_step)
  if data is None:
    data_iter = default_data(config, mesh)
  elif callable(data) and not hasattr(data, "__next__"):
    data_iter = data(config)
  else:
    data_iter = data
  checkpointer = ckpt.Checkpointer(workdir, keep=t.keep_checkpoints, async_save=t.async_checkpointing)
  stop = _Stop(handle_sigint)
  writer = None
  try:
    with jax.set_mesh(mesh), axis_rules(rules):
      state, spec = _restore_or_init(config, mesh, rules, checkpointer, data_iter)
      start = int(jax.device_get(state.step))
      step_fn = make_train_step(spec.graphdef, config, spec.tx)
      compiled: dict[tuple, Any] = {}
      flops = xla_flops = None
      end = int(t.total_steps) if not t.stop_at else min(int(t.stop_at), int(t.total_steps))
      writer = MetricsWriter(workdir, total_steps=int(t.total_steps), start_step=start,
                             tensorboard=t.tensorboard, progress_bar=t.progress_bar, stage=int(t.stage))
      timer = StepTimer()
      losses: dict[int, float] = {}
      pending = None           # (step, metrics future) of the step in flight
      last: dict[str, Any] = {}
      interrupted = False

      def finish(step_done: int, metrics) -> None:
        nonlocal last
        host = jax.device_get(metrics)
        loss = float(host["loss"])
        if not math.isfinite(loss):
          bad = ~np.isfinite(host["sample_ce"])
          ids = host["sample_id"][bad] if bad.any() else host["sample_id"]
          raise NonFiniteLossError(
              f"non-finite loss {loss} at step {step_done} (stage {t.stage}, workdir {workdir}); "
              f"samples (sample_id) {ids.tolist()}; ce={float(host['ce'])} aux={float(host['aux'])} "
              f"grad_norm={float(host['grad_norm'])}")
        losses[step_done] = loss
        writer.accumulate_histogram(np.asarray(host["cube_length_hist"]))
        timer.tick()
        writer.advance()
        if on_step is not None:
          on_step(step_done, host)
        if step_done % t.log_every == 0 or step_done == end:
          dt = timer.mean_recent(t.log_every)
          scalars = {k: float(host[k]) for k in ("loss", "ce", "aux", "eta", "learning_rate", "grad_norm",
                                                 "supervised_tokens", "merged_tokens", "truncated_tokens",
                                                 "padding_fraction")}
          if dt:
            scalars.update(step_time_s=dt, tokens_per_s=float(host["merged_tokens"]) / dt)
            if flops:
              scalars["tflops_per_device"] = flops / jax.device_count() / dt / 1e12
            if xla_flops:
              scalars["xla_tflops_per_device"] = xla_flops / dt / 1e12
          scalars.update(loader_counts(data_iter))
          writer.write(step_done, scalars)
          last = scalars

      step = start
      while step < end:
        if stop.requested():
          interrupted = True
          break
        try:
          local = next(data_iter)
        except StopIteration:
          log.warning("data exhausted at step %d", step)
          break
        check_batch(local, config, step)
        batch = to_global(local, mesh)
        key = tuple((k, v.shape, str(v.dtype)) for k, v in batch.items())
        if key not in compiled:
          compiled[key] = compile_train_step(step_fn, spec, state, batch)
          xla_flops = compiled_flops(compiled[key])
          flops = matmul_flops(step_fn, state, batch)
        state, metrics = compiled[key](state, batch)
        if pending is not None:
          finish(*pending)
        pending = (step + 1, metrics)
        step += 1
        if step % t.checkpoint_every == 0 and step < end:
          finish(*pending)
          pending = None
          _save(checkpointer, state, step, data_iter)
      if pending is not None:
        finish(*pending)
      _save(checkpointer, state, step, data_iter)
      checkpointer.wait()
      return TrainSummary(workdir=workdir, start_step=start, final_step=step, interrupted=interrupted,
                          losses=losses, step_time_s=timer.mean_recent(len(timer.times) or 1),
                          flops_per_step=flops, last_metrics=last)
  finally:
    stop.restore()
    if writer is not None:
      writer.close()
    checkpointer.close()


def enable_compilation_cache(directory: str) -> None:
  """Persists compiled executables under `directory`, so a resumed or repeated run skips compiling."""
  if jax.config.jax_compilation_cache_dir != directory:
    from jax.experimental.compilation_cache import compilation_cache
    compilation_cache.reset_cache()     # re-checked at the next compile, also if one already ran
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _save(checkpointer, state: TrainState, step: int, data_iter) -> None:
  if checkpointer.latest_step() == step:
    return
  get_state = getattr(data_iter, "get_state", None)
  data_state = get_state() if get_state is not None else None
  checkpointer.save(step, params=full_params(state), opt_state=state.opt_state,
                    meta={"step": state.step, "rng": state.rng}, data_state=data_state)


def summary_json(summary: TrainSummary) -> str:
  d = dataclasses.asdict(summary)
  d["losses"] = {str(k): v for k, v in d["losses"].items()}
  return json.dumps(d, default=float)

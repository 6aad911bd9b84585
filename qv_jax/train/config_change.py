"""Resuming with another config: a work directory's `config.json` is the config its checkpoints were
trained with. A resume whose config differs in a field that changes what is computed (learning rate,
batch size, step count, model, data...) is refused unless `train.allow_config_change`
(`--allow-config-change=train.learning_rate,data.batch_size`, a section such as `data`, or `all`) names
it. Fields that only change how the run executes (logging, checkpoint cadence, the mesh, remat, chunk
sizes, loader threads) may always change. The previous config is kept as `config.before-step-<S>.json`.
"""

from __future__ import annotations

import difflib
import json
import logging
import os

from qv_jax.config.errors import ConfigError

log = logging.getLogger(__name__)

# Execution knobs: the same math (up to float rounding), other speed, memory or bookkeeping.
HARMLESS = frozenset({
    "train.workdir", "train.init_from", "train.compilation_cache_dir", "train.checkpoint_every",
    "train.keep_checkpoints", "train.async_checkpointing", "train.stop_at", "train.log_every",
    "train.tensorboard", "train.progress_bar", "train.allow_config_change", "train.ce_chunk",
    "model.vision.frame_chunk", "model.vision.remat_policy", "model.compressor.resampler_impl",
    "model.compressor.token_chunk", "model.compressor.save_scores", "model.decoder.remat_policy",
    "model.decoder.attention_impl", "model.decoder.attention_chunk", "model.decoder.context_attention",
    "data.num_workers", "data.prefetch", "data.read_threads", "data.read_buffer", "data.decode_threads",
    "data.decode_strategy", "mesh.data", "mesh.fsdp", "mesh.tensor", "sharding_rules",
})


def flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_dict(config) -> dict:
  return flatten(json.loads(config.to_json()))


def differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
  """(field, saved value, current value) for fields both configs have and that differ. Fields only one
  side has (added or removed by a code change) are not differences."""
  return [(k, saved[k], current[k]) for k in sorted(set(saved) & set(current)) if saved[k] != current[k]]


def _allowed(field: str, allow: tuple[str, ...]) -> bool:
  return any(a == "all" or field == a or field.startswith(a + ".") for a in allow)


def check_allow_names(allow, fields: dict) -> None:
  """Every name in train.allow_config_change is `all`, a field or a section; a typo names the nearest."""
  sections = {k.rsplit(".", i)[0] for k in fields for i in range(1, k.count(".") + 1)}
  known = set(fields) | sections | {"all"}
  for a in allow:
    if a not in known:
      near = difflib.get_close_matches(str(a), sorted(known), n=1)
      hint = f"; did you mean {near[0]!r}?" if near else ""
      raise ConfigError("train.allow_config_change", f"{a!r} is not a config field or section{hint}")


def check_resume_config(config, workdir: str, resumed_step: int | None) -> None:
  """Refuses (ConfigError) a resume (`resumed_step` not None) whose config differs from the work
  directory's config.json in a field neither harmless nor allowed; logs the allowed differences."""
  current = config_dict(config)
  allow = tuple(str(a) for a in config.train.allow_config_change)
  check_allow_names(allow, current)
  path = os.path.join(workdir, "config.json")
  if resumed_step is None or not os.path.exists(path):
    return
  try:
    with open(path) as f:
      saved = flatten(json.load(f))
  except (OSError, ValueError) as e:
    raise ConfigError("train.workdir", f"{path} is not readable JSON ({type(e).__name__}); it records the "
                      f"config the checkpoints were trained with") from None
  diffs = [d for d in differences(saved, current) if d[0] not in HARMLESS]
  refused = [d for d in diffs if not _allowed(d[0], allow)]
  shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in (refused or diffs))
  if refused:
    names = ",".join(k for k, _, _ in refused)
    raise ConfigError("train.allow_config_change",
                      f"resuming {workdir} (step {resumed_step}) with a config that differs from its "
                      f"config.json: {shown}. Pass --allow-config-change={names} to accept (or start a new "
                      f"work directory)")
  if diffs:
    log.warning("resuming %s with config changes (allowed): %s", workdir, shown)


def write_config(config, workdir: str, resumed_step: int | None) -> None:
  """Writes config.json, keeping a different previous one as config.before-step-<S>.json."""
  path = os.path.join(workdir, "config.json")
  text = config.to_json(indent=2)
  if resumed_step is not None and os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if old != text:
      with open(os.path.join(workdir, f"config.before-step-{resumed_step}.json"), "w") as f:
        f.write(old)
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)

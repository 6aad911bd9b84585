"""The size presets as one config: `get_config("size=qwen2_7b,stage=2")`.

Sizes: `qwen2_7b` (SigLIP so400m + Qwen2.5-7B, D=3584, 28 resampler heads), `llama3_8b` (SigLIP so400m +
Llama-3.1-8B, D=4096, 32 heads), `small` (the CPU demo) and `tiny` (tests). Stages 1-3 as in SPEC §7.
The experiment file `configs/quicksviewer.py` is a thin wrapper for ml_collections' config_flags
(`--config=configs/quicksviewer.py:size=tiny,stage=1`); either way run `qv_jax.config.validate` before use.
"""

import difflib

import ml_collections

from qv_jax.config.data import data_defaults
from qv_jax.config.errors import ConfigError
from qv_jax.config.mesh import LOGICAL_AXIS_RULES, mesh_defaults
from qv_jax.config.model import model_defaults
from qv_jax.config.sizes import check_size
from qv_jax.config.train import train_defaults


def _parse(arg: str | None) -> dict:
  out = {"size": "tiny", "stage": "1"}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key.strip() not in out:
      near = difflib.get_close_matches(key.strip(), list(out), n=1)
      hint = f"did you mean {near[0]!r}? " if near else ""
      raise ConfigError("config argument", f"{item!r}; {hint}expected size=<size> and/or stage=<1|2|3>")
    out[key.strip()] = value.strip()
  return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The unvalidated config of `arg` ("size=<size>,stage=<1|2|3>", default tiny / stage 1)."""
  args = _parse(arg)
  size = check_size(args["size"])
  try:
    stage = int(args["stage"])
  except ValueError:
    raise ConfigError("train.stage", f"unknown stage {args['stage']!r}; expected 1, 2 or 3") from None
  config = ml_collections.ConfigDict()
  config.model = model_defaults(size)
  config.data = data_defaults(size)
  config.mesh = mesh_defaults()
  config.sharding_rules = LOGICAL_AXIS_RULES
  config.train = train_defaults(stage)
  return config

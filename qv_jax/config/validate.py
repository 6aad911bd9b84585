"""`validate(config)`: every check, run before anything compiles; returns the frozen, typed `Config`."""

from qv_jax.config.data import validate_data
from qv_jax.config.errors import require
from qv_jax.config.mesh import validate_mesh
from qv_jax.config.model import MODEL_PARTS, validate_model
from qv_jax.config.sizes import check_size
from qv_jax.config.train import validate_train
from qv_jax.config.typed import Config


def validate(config, parts=MODEL_PARTS) -> Config:
  """A ConfigDict or the dict of a config.json (or a `Config`, re-checked) -> the typed `Config`; raises
  `ConfigError` naming the first bad field. parts: the model parts to check (a conversion checks only the
  parts it converts)."""
  from qv_jax.parallel.context import check_config as check_context   # (it imports this package)
  if not isinstance(config, Config):
    for section in ("model", "data", "mesh", "train"):
      require(section in config, section, "missing section")
    require("size" in config["model"], "model.size", "missing field")
    check_size(config["model"]["size"])
  config = Config.from_config_dict(config)
  check_size(config.model.size)
  validate_model(config.model, parts)
  validate_data(config.data, config.model)
  validate_mesh(config.mesh)
  check_context(config)
  validate_train(config.train)
  return config

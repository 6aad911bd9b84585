"""Validated ml_collections configs.

A config is built by `get_config("size=...,stage=...")` (`presets.py`; the experiment file
`configs/quicksviewer.py` calls it) from the per-section defaults in this package (one module per section,
each with `defaults(size)` and `validate(section)`), and checked by `validate(config)` before anything compiles. Errors are `ConfigError`s naming the field.
"""

from qv_jax.config.errors import ConfigError, require
from qv_jax.config.presets import get_config
from qv_jax.config.validate import validate

__all__ = ["ConfigError", "get_config", "require", "validate"]

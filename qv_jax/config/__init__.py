"""Validated configs.

A config is built by `get_config("size=...,stage=...")` (`presets.py`; the experiment file
`configs/quicksviewer.py` calls it) as an ml_collections ConfigDict from the per-section defaults in this
package (one module per section, each with `defaults(size)` and `validate(section)`); command-line
overrides apply to it. `validate(config)` checks it before anything compiles and returns the frozen, typed
`Config` (`typed.py`) whose parts the modules take. Errors are `ConfigError`s naming the field.
"""

from qv_jax.config.errors import ConfigError, require
from qv_jax.config.presets import get_config
from qv_jax.config.typed import (CompressorConfig, Config, DataConfig, DecoderConfig, MeshConfig, ModelConfig,
                                 RopeScaling, TrainConfig, VisionConfig)
from qv_jax.config.validate import validate

__all__ = ["CompressorConfig", "Config", "ConfigError", "DataConfig", "DecoderConfig", "MeshConfig",
           "ModelConfig", "RopeScaling", "TrainConfig", "VisionConfig", "get_config", "require", "validate"]

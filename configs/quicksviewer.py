"""Quicksviewer experiment config: `--config configs/quicksviewer.py:size=qwen2_7b,stage=2`.

The presets live in the library (`qv_jax.config.presets.get_config`, sizes `qwen2_7b`, `llama3_8b`,
`small`, `tiny`; stages 1-3); this file is what ml_collections' config_flags loads. Copy it to start an
experiment of your own: change fields of the returned config here, or with `--config.<section>.<field>=`.
"""

from qv_jax.config.presets import get_config

__all__ = ["get_config"]

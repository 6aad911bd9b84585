"""Memory experiment config (issue #15, fitting a 420-frame video on 16 GiB v5e chips):
`--config configs/lowmem.py:size=qwen2_7b,stage=3`. Measured with the planner (docs/packing.md): on v5e-64
it did NOT lower XLA's per-chip figure (one video per chip 19.9 GiB where the preset fails at 16.47 G of
temporaries; one video per 2 chips over context 20.4 GiB against the preset's 16.9 GiB), so these two
buffers do not set the peak. Kept as the record of those rows.

The preset with two activation savings that change no value: the fast resampler recomputes its fp32 scores
[B, F·P, H·Q] in the backward instead of keeping them (`model.compressor.save_scores=False`: 1.7 GB per
420-frame video at the released size, for about +25 % resampler FLOPs), and the loss takes 512 decoder
positions per logits chunk instead of 2048 (`train.ce_chunk`: the [B, c, V] fp32 logits of Qwen2.5's
151673-token vocabulary are 0.31 GB per sample instead of 1.24 GB).
"""

from qv_jax.config.presets import get_config as _preset


def get_config(arg=None):
  config = _preset(arg)
  config.model.compressor.save_scores = False
  config.train.ce_chunk = 512
  return config

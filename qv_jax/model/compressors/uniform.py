"""`uniform`: Quicksviewer's cubing with fixed partitions (cube j starts at frame floor(j·N/(k+1))), the
same k + 1 cubes, resampler and thumbnail, so it spends the same visual-token budget as `cubing`. The
cubing network's params are kept (same tree as `cubing`, so checkpoints load) and its aux term still
applies; it never moves a boundary."""

from __future__ import annotations

import dataclasses

from qv_jax.model.compressor import Compressor


class UniformCubes(Compressor):

  def __init__(self, config, *, rngs):
    super().__init__(config, rngs=rngs)
    self.settings = dataclasses.replace(self.settings, partition="uniform")

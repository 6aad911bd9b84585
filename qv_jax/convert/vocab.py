"""Vocabulary resizing: embedding / lm_head rows to the config's vocab_size, as the reference does.

`stream.convert_tensors(resize_vocab=True)` applies it to `quicksviewer_map.VOCAB_TENSORS`.
"""

from __future__ import annotations

import numpy as np

from qv_jax.batch import SPECIAL_TOKENS
from qv_jax.convert.mapping import MappingError


def resize_vocab_rows(table: np.ndarray, vocab_size: int, num_new: int = len(SPECIAL_TOKENS)
                      ) -> np.ndarray:
  """[R, D] embedding / lm_head rows -> [vocab_size, D] as the reference builds its vocabulary: keep the
  first min(R, vocab_size − num_new) rows (the tokenizer's; Qwen2.5 pads 152064 rows for 151665 tokens)
  and fill the rest with the mean of the kept rows (`initialize_vision_tokenizer`, SPEC §8)."""
  keep = min(table.shape[0], vocab_size - num_new)
  if keep <= 0:
    raise MappingError(f"cannot resize a vocabulary of {table.shape[0]} rows to {vocab_size}")
  kept = table[:keep]
  mean = kept.mean(axis=0, dtype=np.float64).astype(table.dtype)   # buffered: no float64 copy of the table
  return np.concatenate([kept, np.broadcast_to(mean, (vocab_size - keep,) + table.shape[1:])])

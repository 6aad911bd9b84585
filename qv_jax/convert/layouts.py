"""Which layout a checkpoint has (`detect_layout`), and which model parts sources of given layouts fill.

The layouts themselves and their tables are in `quicksviewer_map.py`.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from qv_jax.convert.mapping import MappingError
from qv_jax.convert.quicksviewer_map import LAYOUT_PARTS, LAYOUTS
from qv_jax.convert.siglip_map import SIGLIP_MODEL_TYPES

_QV_MARKERS = ("model.vision_tower.", "model.vision_resampler.", "model.cubing.")
_SIGLIP_NAME = re.compile(r"(?:vision_model\.)?(?:embeddings|encoder\.layers)\.")
_DECODER_NAME = re.compile(r"model\.(?:layers\.\d+|embed_tokens)\.")


def detect_layout(names: Iterable[str], config_json: Mapping | None = None) -> str:
  """The layout from the tensor names (decisive), else from config.json `model_type`."""
  names = list(names)
  if any(n.startswith(_QV_MARKERS) for n in names):
    return "quicksviewer"
  if any(_SIGLIP_NAME.match(n) for n in names):
    return "siglip"
  if any(_DECODER_NAME.match(n) for n in names):
    return "decoder"
  model_type = str((config_json or {}).get("model_type", "")).lower()
  if "quicksviewer" in model_type or "llava" in model_type:
    return "quicksviewer"
  if model_type in SIGLIP_MODEL_TYPES:
    return "siglip"
  if model_type in ("qwen2", "llama"):
    return "decoder"
  raise MappingError(f"cannot tell the checkpoint layout from its {len(names)} tensor names (e.g. "
                     f"{names[:3]}) or model_type {model_type!r}; pass --layout one of {LAYOUTS}")


def converted_parts(layouts: Iterable[str]) -> tuple[str, ...]:
  """The model parts ("vision_tower", "compressor", "decoder") that sources of these layouts fill."""
  held = {part for layout in layouts for part in LAYOUT_PARTS[layout]}
  return tuple(p for p in LAYOUT_PARTS["quicksviewer"] if p in held)

"""Checkpoint layouts and their composed tables: source-name rules, ignore lists and expected shapes.

Layouts (targets are whole-model param paths, so partial conversions combine):

  siglip        HF SigLIP, `vision_model.*` or unprefixed                 -> vision_tower/...
  decoder       HF Qwen2 / Qwen2.5 / Llama 3.x, `model.*` and `lm_head`   -> decoder/...
  quicksviewer  the released checkpoint (SPEC §8): SigLIP under `model.vision_tower.vision_tower.`,
                resampler `model.vision_resampler.`, cubing `model.cubing.`, LLM `model.embed_tokens|
                layers|norm` and `lm_head`                                -> vision_tower/, compressor/, decoder/

Tables only. Which layout a checkpoint has: `layouts.py`; the config it implies: `derive_config.py`; the
streaming conversion that applies these tables: `stream.py`; vocabulary resizing: `vocab.py`.
"""

from __future__ import annotations

import re

from qv_jax.convert.compressor_map import COMPRESSOR_IGNORE, COMPRESSOR_TABLE, reference_shapes
from qv_jax.convert.decoder_map import decoder_ignore, decoder_table, expected_decoder_shapes
from qv_jax.convert.mapping import MappingError, Rule, with_prefix
from qv_jax.convert.siglip_map import SIGLIP_IGNORE, SIGLIP_TABLE, expected_vision_shapes

LAYOUTS = ("siglip", "decoder", "quicksviewer")
LAYOUT_PARTS = {"siglip": ("vision_tower",), "decoder": ("decoder",),
                "quicksviewer": ("vision_tower", "compressor", "decoder")}
QV_VISION_PREFIX = "model.vision_tower.vision_tower."
QV_COMPRESSOR_PREFIX = "model."
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def layout_parts(layout: str) -> tuple[str, ...]:
  """`LAYOUT_PARTS[layout]`; an unknown layout raises `MappingError` naming the known ones."""
  if layout not in LAYOUTS:
    raise MappingError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
  return LAYOUT_PARTS[layout]


def layout_table(layout: str, model_config) -> tuple[list[Rule], list[str]]:
  """(rules, ignore regexes) from source names to whole-model param paths."""
  layout_parts(layout)
  if layout == "siglip":
    return with_prefix(SIGLIP_TABLE, "vision_tower/"), list(SIGLIP_IGNORE)
  if layout == "decoder":
    return with_prefix(decoder_table(model_config), "decoder/"), list(decoder_ignore(model_config))
  rules = (with_prefix(SIGLIP_TABLE, "vision_tower/", QV_VISION_PREFIX)
           + with_prefix(COMPRESSOR_TABLE, "compressor/", QV_COMPRESSOR_PREFIX)
           + with_prefix(decoder_table(model_config), "decoder/"))
  ignore = ([re.escape(QV_VISION_PREFIX) + p for p in SIGLIP_IGNORE]
            + [re.escape(QV_COMPRESSOR_PREFIX) + p for p in COMPRESSOR_IGNORE]
            + list(decoder_ignore(model_config)))
  return rules, ignore


def expected_shapes(layout: str, model_config) -> dict[str, tuple[int, ...]]:
  """{whole-model param path: shape} of the parts the layout holds, built abstractly (of the compressor:
  the params a reference checkpoint provides, `compressor_map.reference_shapes`)."""
  parts = layout_parts(layout)
  out = {}
  if "vision_tower" in parts:
    out.update({f"vision_tower/{p}": s for p, s in expected_vision_shapes(model_config).items()})
  if "compressor" in parts:
    out.update({f"compressor/{p}": s for p, s in reference_shapes(model_config).items()})
  if "decoder" in parts:
    out.update({f"decoder/{p}": s for p, s in expected_decoder_shapes(model_config).items()})
  return out

"""Per-part conversion in memory: one part's tensors -> {param path: array} through its table, checked
against the part's shapes (`convert_siglip`, `convert_decoder`, `convert_compressor`), and the compressor
params no reference checkpoint holds (`initialised_params`).

For a whole checkpoint on disk use `qv_jax.convert.cli.convert`, which streams (`stream.py`) to orbax.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import numpy as np

from qv_jax.convert.compressor_map import (COMPRESSOR_IGNORE, COMPRESSOR_TABLE, kind_only_shapes,
                                           reference_shapes)
from qv_jax.convert.decoder_map import decoder_ignore, decoder_table, expected_decoder_shapes
from qv_jax.convert.derive_config import compressor_config_from_tensors
from qv_jax.convert.mapping import apply_table
from qv_jax.convert.siglip_map import SIGLIP_IGNORE, SIGLIP_TABLE, expected_vision_shapes


def convert_siglip(names: Iterable[str], load: Callable[[str], np.ndarray], model_config,
                   sink: Callable[[str, np.ndarray], None] | None = None) -> dict[str, np.ndarray]:
  """Maps HF SigLIP tensors to tower params ({path: array}); a mismatch raises `MappingError`.
  For a whole checkpoint on disk prefer `qv_jax.convert.cli.convert`, which streams to orbax."""
  out, _ = apply_table(SIGLIP_TABLE, names, load, expected_vision_shapes(model_config),
                       ignore=SIGLIP_IGNORE, sink=sink)
  return out


def convert_decoder(tensors: Mapping[str, np.ndarray] | tuple[Iterable[str], Callable[[str], np.ndarray]],
                    model_config, *, sink: Callable[[str, np.ndarray], None] | None = None
                    ) -> dict[str, np.ndarray]:
  """HF tensors -> {Decoder param path: array}, checked against the model's shapes.

  tensors: {name: array} or (names, load) to stream a large checkpoint one tensor at a time. Raises
  `MappingError` listing every missing, extra or mis-shaped tensor.
  """
  names, load = ((list(tensors), tensors.__getitem__) if isinstance(tensors, Mapping) else tensors)
  out, _ = apply_table(decoder_table(model_config), names, load, expected=expected_decoder_shapes(model_config),
                       ignore=decoder_ignore(model_config), sink=sink)
  return out


def convert_compressor(tensors: Mapping[str, np.ndarray], model_config=None) -> dict[str, np.ndarray]:
  """Reference compressor tensors (names with or without the leading `model.`, PyTorch layouts) ->
  {Compressor param path: np.ndarray}. Expected shapes come from the compressor of `model_config` (a `ModelConfig`)
  or, without it, from dims read off the tensors (Dv, D from kv_proj, Q from query). Raises MappingError
  listing every missing, extra or mis-shaped tensor. The configured kind's own params
  (`kind_only_shapes`) are not returned: `initialised_params` makes them."""
  names = {(n[len("model."):] if n.startswith("model.") else n): n for n in tensors}
  if model_config is None:
    model_config = compressor_config_from_tensors(names, tensors)
  out, _ = apply_table(COMPRESSOR_TABLE, list(names), lambda n: np.asarray(tensors[names[n]]),
                       expected=reference_shapes(model_config), ignore=COMPRESSOR_IGNORE)
  return out


def initialised_params(model_config, seed: int = 0) -> dict[str, np.ndarray]:
  """{path: array} of `kind_only_shapes` at the kind's initialisation (`nnx.Rngs(seed)`); jitted, so the
  params the reference provides are never materialised."""
  import jax
  from flax import nnx

  from qv_jax.convert.writer import flatten
  from qv_jax.model.compressors.registry import build_compressor
  paths = sorted(kind_only_shapes(model_config))
  if not paths:
    return {}

  @jax.jit
  def init():
    flat = flatten(nnx.to_pure_dict(nnx.state(build_compressor(model_config.compressor, rngs=nnx.Rngs(seed)))))
    return {p: flat[p] for p in paths}
  return {p: np.asarray(v) for p, v in init().items()}

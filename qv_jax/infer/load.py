"""`load`: a converted checkpoint (`qv-convert` output) or a training work directory (its latest step) onto
a mesh, with its config, tokenizer and chat template, as a `Model` the answering functions take."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qv_jax.config import Config, validate
from qv_jax.config.errors import ConfigError
from qv_jax.config.mesh import LOGICAL_AXIS_RULES
from qv_jax.layers.stack import unstack_layer_state
from qv_jax.model.quicksviewer import Quicksviewer
from qv_jax.sharding import axis_rules, make_mesh, state_shardings
from qv_jax.train import checkpoint as ckpt
from qv_jax.train.state import model_factory


class CheckpointLoadError(ValueError):
  """A checkpoint directory that cannot be loaded; the message names it and what is wrong."""


@dataclasses.dataclass(eq=False)
class Model:
  """A loaded Quicksviewer: `graphdef` + `state` (params placed by `mesh` and the config's logical-axis
  rules), the validated `config`, the tokenizer and the ids generation needs."""
  config: Config
  graphdef: Any
  state: Any
  mesh: Mesh
  rules: tuple
  tokenizer: Any
  template: str
  eos_id: int
  pad_id: int
  bos_id: int | None
  path: str
  kind: str                       # "converted" | "workdir"
  step: int | None = None
  layer_params: list | None = None  # per-layer decoder params when unstacked (state's layers are then empty)

  @property
  def module(self) -> Quicksviewer:
    """The whole model; with `layer_params` set its decoder runs only given `layer_params=`."""
    return nnx.merge(self.graphdef, self.state)

  @property
  def data_size(self) -> int:
    """Devices the batch is split over (the mesh's data × fsdp axes)."""
    return int(self.mesh.shape.get("data", 1) * self.mesh.shape.get("fsdp", 1))

  def context(self):
    """The mesh and logical-axis rules every traced inference function runs under."""
    return _Context(self.mesh, self.rules)


class _Context:
  def __init__(self, mesh, rules):
    self.mesh, self.rules = mesh, rules
    self._stack = []

  def __enter__(self):
    a, b = jax.set_mesh(self.mesh), axis_rules(self.rules)
    a.__enter__()
    b.__enter__()
    self._stack = [b, a]
    return self

  def __exit__(self, *exc):
    for c in self._stack:
      c.__exit__(*exc)


def _rules(config) -> tuple:
  rules = config.sharding_rules or LOGICAL_AXIS_RULES
  return tuple((str(name), tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in rules)


def _read_config(path: str) -> tuple[Config, str]:
  if not os.path.exists(path):
    raise CheckpointLoadError(f"checkpoint {path}: no such directory")
  if not os.path.isdir(path):
    raise CheckpointLoadError(f"checkpoint {path}: not a directory (expected a qv-convert output or a "
                              "training work directory)")
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise CheckpointLoadError(f"checkpoint {path}: no config.json (expected a qv-convert output, with "
                              "params/ config.json conversion.json, or a training work directory)")
  try:
    raw = json.load(open(file))
  except json.JSONDecodeError as e:
    raise CheckpointLoadError(f"checkpoint {path}: config.json is not valid JSON ({e})") from None
  try:
    config = validate(raw)
  except (ConfigError, KeyError, AttributeError, TypeError) as e:
    raise CheckpointLoadError(f"checkpoint {path}: config.json is not a valid qv-jax config: {e}") from None
  return config, ("converted" if ckpt.is_converted(path) else "workdir")


def default_mesh(config, devices=None) -> Mesh:
  """All local devices: the batch over `data` when a replica of the params fits a device (half its memory,
  when the device reports it), else the params over `fsdp` (and the batch over both)."""
  devices = list(devices or jax.local_devices())
  n = len(devices)
  abstract = nnx.state(nnx.eval_shape(model_factory(config)))
  param_bytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract))
  stats = devices[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  if limit and param_bytes > 0.5 * limit:
    return make_mesh({"data": 1, "fsdp": n, "tensor": 1}, devices)
  return make_mesh({"data": n, "fsdp": 1, "tensor": 1}, devices)


def _tokenizer_path(path: str, config, tokenizer) -> str:
  for candidate in (tokenizer, os.path.join(path, "tokenizer.json"), config.data.tokenizer_path):
    if candidate and os.path.exists(candidate):
      return os.fspath(candidate)
  raise CheckpointLoadError(f"checkpoint {path}: no tokenizer (looked for {path}/tokenizer.json and the "
                            f"config's data.tokenizer_path {config.data.tokenizer_path!r}); pass "
                            "tokenizer=PATH (a local tokenizer.json)")


def load(path: str | os.PathLike, *, mesh: Mesh | None = None, dtype: str | None = None,
         tokenizer: str | os.PathLike | None = None, unstack_layers: bool | None = None) -> Model:
  """Loads a `qv-convert` output directory or a training work directory (its latest step).

  The config is the one stored there. dtype ("bfloat16", "float32", ...) overrides the compute and param
  dtypes (None: as stored in the config). mesh None: `default_mesh` over all local devices. The params are
  restored straight into their shardings (fsdp / tensor as the mesh has them, replicated over data).
  unstack_layers (default: on the CPU backend only) keeps the decoder's layer params as one array per
  layer, so decoding never slices a stacked weight (XLA:CPU copies such a slice before each matmul).
  Raises CheckpointLoadError (a ValueError) naming the directory and what is missing or differs."""
  path = os.fspath(path)
  config, kind = _read_config(path)
  if dtype is not None:
    if str(dtype) not in ("float32", "bfloat16", "float16"):
      raise CheckpointLoadError(f"dtype {dtype!r}; expected float32, bfloat16 or float16")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, compute_dtype=str(dtype),
                                                                   param_dtype=str(dtype)))
  mesh = mesh or default_mesh(config)
  rules = _rules(config)
  from data_pipeline.tokenizer import bos_token_id, eos_token_id, load_tokenizer, pad_token_id
  template = config.data.template
  tok = load_tokenizer(_tokenizer_path(path, config, tokenizer), template)
  if tok.get_vocab_size() > config.model.decoder.vocab_size:
    raise CheckpointLoadError(f"checkpoint {path}: the tokenizer has {tok.get_vocab_size()} tokens but the "
                              f"decoder's vocab_size is {config.model.decoder.vocab_size}")
  step = None
  with jax.set_mesh(mesh), axis_rules(rules):
    graphdef, abstract = nnx.split(nnx.eval_shape(model_factory(config)))
    shardings = state_shardings(abstract, mesh, rules)
    from qv_jax.train.state import abstract_like
    target = abstract_like(nnx.to_pure_dict(abstract), nnx.to_pure_dict(shardings))
    try:
      if kind == "converted":
        from qv_jax.convert.writer import load_converted
        _, state = load_converted(path, target, strict=True)
        params = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else dict(state)
      else:
        params_dir = ckpt.resolve_params_dir(path)
        step = int(params_dir.parent.name) if params_dir.parent.name.isdigit() else None
        params = ckpt.load_params(path, target, config.model.size)
    except (ckpt.CheckpointError, FileNotFoundError) as e:
      raise CheckpointLoadError(str(e).replace("train.init_from: ", "checkpoint ")) from None
    except ValueError as e:   # MappingError (one line per differing param) and orbax's shape complaints
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      shown = "; ".join(lines[:13]) + (f"; ... {len(lines) - 13} more" if len(lines) > 13 else "")
      raise CheckpointLoadError(f"checkpoint {path}: {shown}") from None
  nnx.replace_by_pure_dict(abstract, params)
  if unstack_layers is None:
    unstack_layers = jax.default_backend() == "cpu"
  layer_params = None
  if unstack_layers:
    abstract["decoder"]["layers"], layer_params = unstack_layer_state(abstract["decoder"]["layers"],
                                                                      int(config.model.decoder.num_layers))
  return Model(layer_params=layer_params, config=config, graphdef=graphdef, state=abstract, mesh=mesh, rules=rules, tokenizer=tok,
               template=template, eos_id=eos_token_id(tok), pad_id=pad_token_id(tok), bos_id=bos_token_id(tok),
               path=path, kind=kind, step=step)

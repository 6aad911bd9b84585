"""Frozen, typed configs: what `validate(config)` returns and what every module takes.

`Config(model, data, mesh, sharding_rules, train)` mirrors the ConfigDict of `get_config` field for field
(sequences as tuples, `rope_scaling` as `RopeScaling`), so `Config.from_config_dict(cd).to_dict() ==
cd.to_dict()` and a checkpoint's `config.json` keeps its format. Parts: `ModelConfig.vision`
(`SiglipVisionTower`), `.compressor` (the compressor kinds), `.decoder` (`Decoder`); each also carries the
model's `dtype` / `param_dtype` (dtype names) and, for the compressor, the decoder's `decoder_layers`:
derived fields, set by `ModelConfig` and never written by `to_dict`. Change a validated config with
`dataclasses.replace` or `Config.replace(data=dict(...))` (`ModelConfig` re-derives its parts' dtypes).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing

from qv_jax.config.errors import ConfigError

_DERIVED = {"derived": True}


def _derived(default):
  return dataclasses.field(default=default, metadata=_DERIVED, compare=True)


class _Part:
  """`from_config_dict` / `to_dict` for the frozen dataclasses below."""

  @classmethod
  def from_config_dict(cls, raw, path: str = ""):
    """A ConfigDict / dict (or an instance, returned as is) -> the typed part; unknown or missing fields
    raise ConfigError naming the field."""
    if isinstance(raw, cls):
      return raw
    path = path or cls._path
    if not hasattr(raw, "items"):
      raise ConfigError(path, f"expected a section of fields, got {type(raw).__name__}")
    values = dict(raw.items())
    cls._legacy(values, path)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("derived")}
    for name in values:
      if name not in fields:
        near = difflib.get_close_matches(str(name), list(fields), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{path}.{name}", f"unknown field{hint}")
    kwargs = {}
    for name, f in fields.items():
      if name in values:
        kwargs[name] = _convert(hints[name], values[name], f"{path}.{name}")
      elif f.default is dataclasses.MISSING:
        raise ConfigError(f"{path}.{name}", "missing field")
    return cls(**kwargs)

  @classmethod
  def _legacy(cls, values: dict, path: str) -> None:
    """Translates fields of older configs in place."""

  def to_dict(self) -> dict:
    """JSON-able nested dict of the config fields (derived fields left out); the inverse of
    `from_config_dict`."""
    return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
            if not f.metadata.get("derived")}

  def to_json(self, indent: int | None = 2) -> str:
    return json.dumps(self.to_dict(), indent=indent)


def _convert(hint, value, path: str):
  if value is None:
    return None
  args = typing.get_args(hint)
  part = next((a for a in (hint, *args) if isinstance(a, type) and issubclass(a, _Part)), None)
  if part is not None:
    return part.from_config_dict(value, path)
  if hint is tuple or typing.get_origin(hint) is tuple or tuple in args:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
      raise ConfigError(path, f"expected a sequence, got {value!r}")
    return _tuples(value)
  return value


def _tuples(value):
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def _plain(value):
  if isinstance(value, _Part):
    return value.to_dict()
  return value


def expect(config, cls: type, module: str) -> None:
  """TypeError unless `config` is a `cls` (a module given a ConfigDict or another part)."""
  if not isinstance(config, cls):
    raise TypeError(f"{module} takes a {cls.__module__}.{cls.__name__} (from qv_jax.config.validate), "
                    f"got {type(config).__name__}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig(_Part):
  """`model.vision`: SigLIP tower sizes and execution knobs."""
  _path = "model.vision"
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  patch_size: int
  image_size: int
  grid_out: int
  layer_norm_eps: float
  frame_chunk: int
  remat_policy: str
  gather_once: bool = False
  dtype: str = _derived("float32")
  param_dtype: str = _derived("float32")

  @classmethod
  def _legacy(cls, values: dict, path: str) -> None:
    if "remat" in values:      # configs before remat_policy: True -> "nothing_saveable", False -> "none"
      remat = values.pop("remat")
      if not isinstance(remat, bool):
        raise ConfigError(f"{path}.remat", f"must be True or False, got {remat!r}")
      values["remat_policy"] = "nothing_saveable" if remat else "none"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompressorConfig(_Part):
  """`model.compressor`: cubing network, resampler, thumbnail and the kind-specific fields."""
  _path = "model.compressor"
  vision_dim: int
  embed_dim: int
  num_heads: int
  num_queries: int
  grid_size: int
  momentum_alpha: float
  gumbel_tau: float
  frames_per_cube: int
  partition: str
  resampler_impl: str
  thumbnail_pool: int
  token_chunk: int
  save_scores: bool
  mlp_layer_norm_eps: float
  resampler_layer_norm_eps: float
  pos_temperature: float
  kind: str = "cubing"
  keep_ratio: float = 0.1
  policy_hidden: int = 256
  select_frames: int = 8
  segment_frames: int = 8
  select_layers: tuple = ()
  select_tokens: str = "pooled"
  question_len: int = 32
  dtype: str = _derived("float32")
  param_dtype: str = _derived("float32")
  decoder_layers: int = _derived(0)     # model.decoder.num_layers (question_select scores its layers)

  @property
  def tokens_per_frame(self) -> int:
    return self.grid_size * self.grid_size


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling(_Part):
  """`model.decoder.rope_scaling` (Llama 3.x)."""
  _path = "model.decoder.rope_scaling"
  type: str
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig(_Part):
  """`model.decoder`: Qwen2 / Llama 3.x sizes and execution knobs."""
  _path = "model.decoder"
  family: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  rope_scaling: RopeScaling | None
  rms_norm_eps: float
  tie_embeddings: bool
  qkv_bias: bool
  remat_policy: str
  scan_layers: bool
  attention_impl: str
  attention_chunk: int
  context_attention: str = "auto"
  dtype: str = _derived("float32")
  param_dtype: str = _derived("float32")

  def with_dtypes(self, dtype: str, param_dtype: str) -> "DecoderConfig":
    return dataclasses.replace(self, dtype=str(dtype), param_dtype=str(param_dtype))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(_Part):
  """`model`: the size name, dtypes and the three parts (whose derived fields it sets)."""
  _path = "model"
  size: str
  compute_dtype: str
  param_dtype: str
  vision: VisionConfig
  compressor: CompressorConfig
  decoder: DecoderConfig

  def __post_init__(self):
    dt = dict(dtype=str(self.compute_dtype), param_dtype=str(self.param_dtype))
    object.__setattr__(self, "vision", dataclasses.replace(self.vision, **dt))
    object.__setattr__(self, "decoder", dataclasses.replace(self.decoder, **dt))
    object.__setattr__(self, "compressor", dataclasses.replace(
        self.compressor, decoder_layers=int(self.decoder.num_layers), **dt))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig(_Part):
  """`data`: sampling, template, static shapes and the loader (qv_jax/config/data.py)."""
  _path = "data"
  dataset_dir: str
  dataset_name: str
  split: str
  tokenizer_path: str = ""
  template: str
  fps: float
  max_frames: int
  frame_buckets: tuple
  image_size: int
  normalize_on_host: bool
  max_images: int
  max_text_len: int
  max_seq_len: int
  seq_buckets: tuple = ()
  pack_samples: int = 1
  batch_size: int
  num_workers: int
  prefetch: int
  read_threads: int = 2
  read_buffer: int = 4
  decode_threads: int
  decode_strategy: str
  min_frames: int
  shuffle_seed: int
  drop_remainder: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig(_Part):
  """`mesh`: axis sizes (one may be -1)."""
  _path = "mesh"
  data: int = -1
  fsdp: int = 1
  context: int = 1
  tensor: int = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(_Part):
  """`train`: stage, optimiser, schedules, checkpoints and metrics (qv_jax/config/train.py)."""
  _path = "train"
  stage: int
  learning_rate: float
  warmup_ratio: float
  total_steps: int
  grad_accum: int
  grad_clip: float
  adam_b1: float
  adam_b2: float
  adam_eps: float
  weight_decay: float
  aux_weight: float
  aux_normalization: str
  gumbel_eta_max: float
  gumbel_eta_min: float
  gumbel_anneal_fraction: float
  reference_frozen_vision_tower: bool
  trainable_override: tuple
  encode_images: bool
  ce_chunk: int
  score_rollouts: int = 0
  score_ce_tolerance: float = 0.05
  score_curriculum: str = "videos"
  score_repeat: int = 4
  seed: int
  compilation_cache_dir: str
  workdir: str
  init_from: str
  checkpoint_every: int
  keep_checkpoints: int
  allow_config_change: tuple = ()
  async_checkpointing: bool
  stop_at: int
  log_every: int
  tensorboard: bool
  progress_bar: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(_Part):
  """The whole validated config."""
  _path = "config"
  model: ModelConfig
  data: DataConfig
  mesh: MeshConfig
  sharding_rules: tuple = ()
  train: TrainConfig

  @classmethod
  def from_config_dict(cls, raw, path: str = ""):
    if not isinstance(raw, cls) and hasattr(raw, "items"):
      for section in ("model", "data", "mesh", "train"):
        if section not in dict(raw.items()):
          raise ConfigError(section, "missing section")
    return super().from_config_dict(raw, path)

  def replace(self, **sections: dict) -> "Config":
    """A copy with fields of sections replaced: `config.replace(data=dict(batch_size=4))`."""
    return dataclasses.replace(self, **{name: dataclasses.replace(getattr(self, name), **fields)
                                        for name, fields in sections.items()})


__all__ = ["Config", "CompressorConfig", "DataConfig", "DecoderConfig", "MeshConfig", "ModelConfig", "decoder_config",
           "RopeScaling", "TrainConfig", "VisionConfig", "expect"]


def decoder_config(size: str, *, dtype: str = "float32", param_dtype: str = "float32", **fields) -> DecoderConfig:
  """The validated `model.decoder` of a model size or a `DECODER_EXTRA_SIZES` name, with these dtypes and
  fields replaced (decoder-only benchmarks and tests)."""
  from qv_jax.config.model import decoder_defaults, validate_decoder
  d = dataclasses.replace(DecoderConfig.from_config_dict(decoder_defaults(size)), dtype=str(dtype),
                          param_dtype=str(param_dtype), **fields)
  validate_decoder(d)
  return d

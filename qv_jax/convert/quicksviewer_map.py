"""Checkpoint layouts, their composed tables, the config they imply, and the streaming conversion.

Layouts (targets are whole-model param paths, so partial conversions combine):

  siglip        HF SigLIP, `vision_model.*` or unprefixed                 -> vision_tower/...
  decoder       HF Qwen2 / Qwen2.5 / Llama 3.x, `model.*` and `lm_head`   -> decoder/...
  quicksviewer  the released checkpoint (SPEC §8): SigLIP under `model.vision_tower.vision_tower.`,
                resampler `model.vision_resampler.`, cubing `model.cubing.`, LLM `model.embed_tokens|
                layers|norm` and `lm_head`                                -> vision_tower/, compressor/, decoder/

`convert_tensors` streams: it plans which source tensors make which target param (names only), checks
that nothing is unmatched, missing, extra or mis-shaped (from the headers) before reading a byte,
then builds one target param at a time (a stacked [L, ...] param filled in place from its L layer
tensors), hands it to a sink (the orbax writer, which saves it without a copy) and drops it. Peak memory
is about the largest target param plus a few layer tensors (a transposed non-stacked tensor such as
lm_head briefly costs twice its size), never the model.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from qv_jax.batch import SPECIAL_TOKENS
from qv_jax.config.typed import Config
from qv_jax.convert.mapping import MappingError, Rule, apply_table, raise_mismatch, with_prefix
from qv_jax.convert.siglip_map import (SIGLIP_IGNORE, SIGLIP_MODEL_TYPES, SIGLIP_TABLE,
                                       expected_vision_shapes, vision_config_from_hf)

LAYOUTS = ("siglip", "decoder", "quicksviewer")
LAYOUT_PARTS = {"siglip": ("vision_tower",), "decoder": ("decoder",),
                "quicksviewer": ("vision_tower", "compressor", "decoder")}
QV_VISION_PREFIX = "model.vision_tower.vision_tower."
QV_COMPRESSOR_PREFIX = "model."
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")

# numpy's empty structured dtype: arrays of any shape that hold no bytes, for mapping shapes alone.
SHAPE_ONLY = np.dtype([])

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


def _check_layout(layout: str) -> None:
  if layout not in LAYOUTS:
    raise MappingError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def layout_table(layout: str, model_config) -> tuple[list[Rule], list[str]]:
  """(rules, ignore regexes) from source names to whole-model param paths."""
  from qv_jax.convert.decoder_map import decoder_ignore, decoder_table
  _check_layout(layout)
  if layout == "siglip":
    return with_prefix(SIGLIP_TABLE, "vision_tower/"), list(SIGLIP_IGNORE)
  if layout == "decoder":
    return with_prefix(decoder_table(model_config), "decoder/"), list(decoder_ignore(model_config))
  from qv_jax.convert import compressor_map
  rules = (with_prefix(SIGLIP_TABLE, "vision_tower/", QV_VISION_PREFIX)
           + with_prefix(compressor_map.COMPRESSOR_TABLE, "compressor/", QV_COMPRESSOR_PREFIX)
           + with_prefix(decoder_table(model_config), "decoder/"))
  ignore = ([re.escape(QV_VISION_PREFIX) + p for p in SIGLIP_IGNORE]
            + [re.escape(QV_COMPRESSOR_PREFIX) + p for p in compressor_map.COMPRESSOR_IGNORE]
            + list(decoder_ignore(model_config)))
  return rules, ignore


def expected_shapes(layout: str, model_config) -> dict[str, tuple[int, ...]]:
  """{whole-model param path: shape} of the parts the layout holds, built abstractly (of the compressor:
  the params a reference checkpoint provides, `compressor_map.reference_shapes`)."""
  _check_layout(layout)
  parts = LAYOUT_PARTS[layout]
  out = {}
  if "vision_tower" in parts:
    out.update({f"vision_tower/{p}": s for p, s in expected_vision_shapes(model_config).items()})
  if "compressor" in parts:
    from qv_jax.convert.compressor_map import reference_shapes
    out.update({f"compressor/{p}": s for p, s in reference_shapes(model_config).items()})
  if "decoder" in parts:
    from qv_jax.convert.decoder_map import expected_decoder_shapes
    out.update({f"decoder/{p}": s for p, s in expected_decoder_shapes(model_config).items()})
  return out


# --- the config a checkpoint implies -------------------------------------------------------------

def _so400m_like(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> bool:
  patch = shapes.get(prefix + "vision_model.embeddings.patch_embedding.weight",
                     shapes.get(prefix + "embeddings.patch_embedding.weight"))
  return patch is not None and tuple(patch) == (1152, 3, 14, 14)


def derive_config(sources: Iterable[tuple[str, Mapping | None, Mapping[str, tuple[int, ...]]]],
                  size: str | None = None) -> Config:
  """The qv-jax config for one or more checkpoints, each given as (layout, config.json dict or None,
  {tensor name: shape}). With `size`: the preset of that size (the checkpoints must fit it). Without:
  each part comes from the checkpoint holding it (SigLIP / Qwen2 / Llama config.json fields; for a
  Quicksviewer checkpoint its LLM fields, `vision_config` or the so400m preset, and `num_queries`,
  `num_heads`), the rest from the matching released size. Validated for the parts the sources hold only
  (a decoder of width 72 converts although no compressor could be built on it)."""
  from qv_jax.config.presets import get_config
  from qv_jax.config import validate
  from qv_jax.convert.decoder_map import decoder_config_from_hf
  sources = list(sources)
  seen: dict[str, str] = {}
  for layout, _, _ in sources:
    _check_layout(layout)
    for part in LAYOUT_PARTS[layout]:
      if part in seen:
        raise MappingError(f"two sources hold the {part} ({seen[part]} and {layout} layouts)")
      seen[part] = layout
  parts = converted_parts(layout for layout, _, _ in sources)
  if size:
    return validate(get_config(f"size={size}"), parts)
  decoder, vision, qv_json = None, None, {}
  for layout, config_json, shapes in sources:
    cj = dict(config_json or {})
    if not cj:
      raise MappingError(f"the {layout} checkpoint has no config.json; pass --size to name its config")
    if layout in ("decoder", "quicksviewer"):
      decoder = decoder_config_from_hf(cj)
    if layout == "siglip":
      vision = vision_config_from_hf(cj)
    elif layout == "quicksviewer":
      qv_json = cj
      if cj.get("vision_config"):
        vision = vision_config_from_hf(cj["vision_config"])
      elif not _so400m_like(shapes, QV_VISION_PREFIX):
        raise MappingError("the Quicksviewer config.json has no vision_config and the tower is not "
                           "SigLIP so400m/14 (patch_embedding [1152, 3, 14, 14]); pass --size")
  config = get_config("size=" + ("llama3_8b" if decoder is not None and decoder.family == "llama3"
                                 else "qwen2_7b")).to_dict()
  m = config["model"]
  if decoder is not None:
    m["decoder"] = dict(decoder.to_dict(), remat_policy=m["decoder"]["remat_policy"],
                        scan_layers=m["decoder"]["scan_layers"])
  if vision is not None:
    m["vision"].update(vision)
  c, v, d = m["compressor"], m["vision"], m["decoder"]
  c.update(vision_dim=v["hidden_size"], grid_size=v["grid_out"], embed_dim=d["hidden_size"])
  width = d["hidden_size"]
  c["num_heads"] = int(qv_json.get("num_heads") or (width // 128 if width >= 1024 else 4))
  c["num_queries"] = int(qv_json.get("num_queries") or
                         (64 if width >= 1024 else v["grid_out"] ** 2 // c["thumbnail_pool"]))
  config["data"]["image_size"] = v["image_size"]
  return validate(config, parts)


# --- vocabulary resizing ---------------------------------------------------------------------------

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


# --- streaming conversion --------------------------------------------------------------------------

@dataclasses.dataclass
class ConversionReport:
  layout: str
  mapped: list[tuple[str, tuple[str, ...]]]
  ignored: list[str]
  params: dict[str, tuple[tuple[int, ...], str]]
  source_bytes: int
  seconds: float
  initialised: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

  def summary(self) -> str:
    text = (f"{self.layout}: mapped {len(self.mapped)} source tensors to {len(self.params)} params, "
            f"ignored {len(self.ignored)}, read {self.source_bytes / 2**20:.1f} MiB in {self.seconds:.1f} s")
    if self.initialised:
      text += (f"; {len(self.initialised)} params initialised, not in the checkpoint: "
               + ", ".join(sorted(self.initialised)))
    return text


@dataclasses.dataclass
class Group:
  """The source names that build one set of target params, and the rule that maps them."""
  rule: Rule
  names: list[str]


def plan(table: Iterable[Rule], names: Iterable[str], ignore: Iterable[str] = ()
         ) -> tuple[dict[tuple[str, ...], Group], list[str], list[str], list[str]]:
  """Groups source names by the target params they build, first matching rule wins (as `apply_table`).
  Returns ({target paths: Group}, ignored names, unmatched names, target paths claimed by several
  rules). Reads no tensor."""
  compiled = [(re.compile(r.source), r) for r in table]
  ignore_re = [re.compile(p) for p in ignore]
  groups: dict[tuple[str, ...], Group] = {}
  ignored, unmatched, clashes = [], [], []
  for name in names:
    for regex, r in compiled:
      match = regex.fullmatch(name)
      if match:
        key = tuple(t.format(**match.groupdict()) for t in r.targets)
        group = groups.setdefault(key, Group(r, []))
        if group.rule is not r:
          clashes.extend(key)
        group.names.append(name)
        break
    else:
      (ignored if any(p.fullmatch(name) for p in ignore_re) else unmatched).append(name)
  owner: dict[str, int] = {}
  for key in groups:
    for path in key:
      owner[path] = owner.get(path, 0) + 1
  clashes += [p for p, n in owner.items() if n > 1]
  return groups, ignored, unmatched, sorted(set(clashes))


def _source_line(name: str, shape: Callable[[str], Any], dtype: Callable[[str], Any]) -> str:
  return f"{name}: {list(shape(name))} {dtype(name)}"


def _fmt_source(names: Iterable[str], shape: Callable[[str], Any], dtype: Callable[[str], Any]) -> str:
  return "\n".join(f"  {_source_line(n, shape, dtype)}" for n in names)


def build_group(table: list[Rule], paths: tuple[str, ...], group: Group, load: Callable[[str], np.ndarray],
                expected: Mapping[str, tuple[int, ...]], sink: Callable[[str, Any], None], dtype: Any = None):
  """Maps one group through `apply_table` and hands its params to `sink`, cast to `dtype` if given.
  A stacked group is mapped layer by layer (targets `path[i]`) into a preallocated [L, ...] buffer
  (`StackBuffer`), so it is held once, not as L layers plus their stack. Returns the `apply_table`
  report."""
  from qv_jax.convert.writer import StackBuffer
  r = group.rule
  if r.stack is None:
    def cast(path, value):
      sink(path, value if dtype is None else value.astype(dtype))
    return apply_table(table, group.names, load, {p: expected[p] for p in paths}, sink=cast)[1]
  layer_rule = Rule(r.source, tuple(t + "[{%s}]" % r.stack for t in r.targets), r.transform)
  per_layer = {f"{p}[{i}]": tuple(expected[p][1:]) for p in paths for i in range(expected[p][0])}
  stacked: dict[str, StackBuffer] = {}

  def fill(layer_path: str, value: np.ndarray) -> None:
    path, index = layer_path[:-1].rsplit("[", 1)
    if path not in expected or not 0 <= int(index) < expected[path][0]:
      return   # apply_table reports it as a target the model does not have
    if path not in stacked:
      stacked[path] = StackBuffer(expected[path], value.dtype if dtype is None else dtype)
    stacked[path].set(int(index), value)

  _, report = apply_table([layer_rule], group.names, load, per_layer, sink=fill)
  report.mapped = [(name, tuple(t.rsplit("[", 1)[0] for t in targets)) for name, targets in report.mapped]
  for path in paths:
    sink(path, stacked.pop(path).value)
  return report


def convert_tensors(reader, layout: str, model_config, sink: Callable[[str, np.ndarray], None], *,
                    resize_vocab: bool = False, dtype: Any = None, progress: bool = True
                    ) -> ConversionReport:
  """Streams `reader`'s tensors (a `SafetensorsReader` or anything with names/shape/dtype/nbytes/load)
  into `sink(path, array)`, one whole-model target param at a time. For a layout holding the compressor,
  the params the configured `compressor.kind` adds (no reference source, e.g. `score_gating`'s policy)
  are then written from their initialisation and listed in the report's `initialised`.

  resize_vocab: resize `model.embed_tokens.weight` / `lm_head.weight` rows to the config's vocab_size
  (`resize_vocab_rows`) when they differ. dtype: cast every param (None keeps the source dtype).
  Raises `MappingError` listing unmatched source names, missing / extra / duplicated targets and
  mis-shaped tensors (source names and shapes included), all before reading any tensor: shapes are
  checked by a dry run of the mapping on zero-byte stand-ins (`SHAPE_ONLY`) of the header shapes.
  """
  start = time.perf_counter()
  where = " ".join([f"{layout} checkpoint"] + ([str(reader.path)] if hasattr(reader, "path") else []))
  table, ignore = layout_table(layout, model_config)
  expected = expected_shapes(layout, model_config)
  names = reader.names()
  groups, ignored, unmatched, clashes = plan(table, names, ignore)

  owner = {p: g.names for paths, g in groups.items() for p in paths}
  raise_mismatch(f"{where} does not match the model config", [
      ("source tensors no rule maps", [_source_line(n, reader.shape, reader.dtype) for n in unmatched]),
      ("targets written by several rules", clashes),
      ("target params no source tensor provides",
       [f"{p}: {list(expected[p])}" for p in sorted(set(expected) - set(owner))]),
      ("targets the model does not have (from source tensors)",
       [f"{p} <- {owner[p][:3]}" for p in sorted(set(owner) - set(expected))]),
  ])

  vocab = int(model_config.decoder.vocab_size) if "decoder" in LAYOUT_PARTS[layout] else None
  first = {n: i for i, n in enumerate(names)}
  ordered = sorted(groups.items(), key=lambda kv: first[kv[1].names[0]])

  def resized(name: str, shape: tuple[int, ...]) -> bool:
    return resize_vocab and name in VOCAB_TENSORS and shape[0] != vocab

  def build_all(load, write, cast) -> list:
    mapped, failures = [], []
    for paths, group in ordered:
      try:
        mapped.extend(build_group(table, paths, group, load, expected, write, cast).mapped)
      except MappingError as e:
        hint = ""
        if any(n in VOCAB_TENSORS for n in group.names) and not resize_vocab:
          hint = f"\n  (vocabulary rows differ from vocab_size {vocab}: --resize-vocab adapts them)"
        failures.append(str(e).replace("checkpoint does not match the model:\n", "") +
                        "\n  from:\n" + _fmt_source(group.names, reader.shape, reader.dtype) + hint)
    if failures:
      raise MappingError(f"{where} does not match the model config:\n" + "\n".join(failures))
    return mapped

  def shape_only(name: str) -> np.ndarray:
    shape = tuple(reader.shape(name))
    if resized(name, shape):
      shape = (vocab,) + shape[1:]
    return np.empty(shape, SHAPE_ONLY)

  # Dry run on zero-byte stand-ins: every shape is checked from the headers before a byte is read.
  build_all(shape_only, lambda path, array: None, None)

  def load(name: str) -> np.ndarray:
    array = reader.load(name)
    bar.update(reader.nbytes(name))
    if resized(name, array.shape):
      array = resize_vocab_rows(array, vocab)
    return array

  params: dict[str, tuple[tuple[int, ...], str]] = {}

  def write(path: str, array) -> None:
    sink(path, array)
    params[path] = (tuple(array.shape), str(array.dtype))

  total = sum(reader.nbytes(n) for g in groups.values() for n in g.names)
  from tqdm.auto import tqdm
  with tqdm(total=total, unit="B", unit_scale=True, desc=f"convert {layout}", disable=not progress) as bar:
    mapped = build_all(load, write, dtype)
  initialised = {}
  if "compressor" in LAYOUT_PARTS[layout]:
    from qv_jax.convert.compressor_map import initialised_params
    for path, value in initialised_params(model_config).items():
      write(f"compressor/{path}", value if dtype is None else value.astype(dtype))
      initialised[f"compressor/{path}"] = tuple(value.shape)
  return ConversionReport(layout=layout, mapped=mapped, ignored=ignored, params=params, source_bytes=total,
                          seconds=time.perf_counter() - start, initialised=initialised)

"""The streaming conversion: a checkpoint's tensors -> whole-model params, one target param at a time.

`convert_tensors` streams: it plans which source tensors make which target param (names only, through the
layout's table, `quicksviewer_map.layout_table`), checks that nothing is unmatched, missing, extra or
mis-shaped (from the headers) before reading a byte, then builds one target param at a time (a stacked
[L, ...] param filled in place from its L layer tensors), hands it to a sink (the orbax writer, which saves
it without a copy) and drops it. Peak memory is about the largest target param plus a few layer tensors
(a transposed non-stacked tensor such as lm_head briefly costs twice its size), never the model.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from qv_jax.convert.mapping import MappingError, Rule, apply_table, raise_mismatch
from qv_jax.convert.parts import initialised_params
from qv_jax.convert.quicksviewer_map import LAYOUT_PARTS, VOCAB_TENSORS, expected_shapes, layout_table
from qv_jax.convert.vocab import resize_vocab_rows

# numpy's empty structured dtype: arrays of any shape that hold no bytes, for mapping shapes alone.
SHAPE_ONLY = np.dtype([])


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
    for path, value in initialised_params(model_config).items():
      write(f"compressor/{path}", value if dtype is None else value.astype(dtype))
      initialised[f"compressor/{path}"] = tuple(value.shape)
  return ConversionReport(layout=layout, mapped=mapped, ignored=ignored, params=params, source_bytes=total,
                          seconds=time.perf_counter() - start, initialised=initialised)

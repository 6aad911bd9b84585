"""A TFDS dataset of the reference's jsonl samples, stored as ArrayRecord without TensorFlow.

One jsonl line (LLaVA style) is one record, in file order (TFDS shuffling is disabled, so record i of a split is
its i-th non-blank line):

  {"id": ..., "video" | "video_id": "rel/path.mp4" | "image": "rel.jpg" | ["a.jpg", "b.jpg"],
   "conversations": [{"from": "human" | "gpt", "value": ...}, ...], "start_sec": sec, "end_sec": sec}

(the keys read and refused: `jsonl_samples`; which media files are read: `media_files`).

Record features (media are the encoded file bytes; decoding happens in the loader's workers):

| feature       | type                     | meaning |
|---------------|--------------------------|---------|
| id            | Text                     | the sample's "id" ("" if absent; undecodable bytes as `\\xNN`) |
| origin        | Text                     | "file.jsonl:LINE", for error messages |
| modality      | Text                     | "video", "image", "text" (no media) or "frames" (a TSV video) |
| media         | string Tensor [n]        | encoded media bytes (1 video, n images, 0 for text, n JPEGs for frames) |
| media_path    | string Tensor [n]        | the paths as written in the jsonl (UTF-8, bytes escaped) |
| conversations | Text                     | "conversations" as JSON (ASCII; undecodable bytes kept as escapes) |
| start, end    | float32                  | clip bounds in seconds, NaN when absent |
| timestamps    | float32 Tensor [n]       | a "frames" sample's own `timestamps` (empty: none; since 1.1.0) |
| error         | Text                     | "" for a good record, else why it cannot be used |
| error_detail  | Text                     | a human-readable message for `error` |

Choice for problems found at build time: the record is still written, with empty media and `error` set
(e.g. "missing_file", "outside_media_root", "not_regular_file", "bad_json", "unknown_media_key"; the full list
is in `jsonl_samples` and `media_files`). No line stops the build: it goes on, logs each one and reports
counts by reason; the loader skips such records with the same reason, so build counts and loader skip counts
agree and record indices stay aligned with the jsonl.
Everything about the media content itself (corrupt, truncated, zero-length, audio-only, unsupported codec)
and about the text (non-UTF-8, empty) is found by the loader's decoders, which skip and count it.
"""

import collections
import logging
import os
import re
import types

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipeline.jsonl_samples import count_lines, parse_line, read_jsonl  # noqa: F401 (parse_line: public)
from data_pipeline.media_files import DEFAULT_MAX_MEDIA_BYTES, MediaReader, escape
from data_pipeline.tsv_frames import TsvStores

log = logging.getLogger(__name__)

DATASET_VERSION = "1.1.0"
REPORT_EXAMPLES = 5  # skipped lines named per reason in the report
MODALITIES = ("video", "image", "text", "frames")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class NoRecordsError(FileNotFoundError):
  """A data directory holds no dataset, or the requested split has no records. Names the directory."""


def features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "origin": tfds.features.Text(),
      "modality": tfds.features.Text(),
      "media": tfds.features.Tensor(shape=(None,), dtype=np.object_),
      "media_path": tfds.features.Tensor(shape=(None,), dtype=np.object_),
      "conversations": tfds.features.Text(),
      "start": np.float32,
      "end": np.float32,
      "timestamps": tfds.features.Tensor(shape=(None,), dtype=np.float32),
      "error": tfds.features.Text(),
      "error_detail": tfds.features.Text(),
  })


class JsonlMediaBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Builds splits "train" (from `jsonl`) and, optionally, "validation" (from `validation_jsonl`).

  `media_root`: the directory the jsonl's media paths are relative to. Use `builder_class(name)` to get a
  builder with a dataset name of your choice; `report` holds per-split counts after
  `download_and_prepare()`.
  """

  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {"1.0.0": "Encoded media bytes, conversations JSON, build-time errors per record.",
                   DATASET_VERSION: "The reference's TSV frame stores (modality 'frames', timestamps)."}
  name = "quicksviewer_jsonl"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's default probes package resources through `importlib_resources`, absent here (editable install).
    return epath.Path(__file__)

  def __init__(self, *, jsonl: str, media_root: str, validation_jsonl: str | None = None,
               progress: bool = False, allow_outside_media_root: bool = False,
               max_media_bytes: int = DEFAULT_MAX_MEDIA_BYTES, video_tsv_folder: str | None = None, **kwargs):
    self._jsonl = {"train": os.fspath(jsonl)}
    if validation_jsonl:
      self._jsonl["validation"] = os.fspath(validation_jsonl)
    root = os.fspath(media_root)
    if "://" not in root and not os.path.isdir(root):
      raise FileNotFoundError(f"media root {escape(root)} is not a directory")
    self._reader = MediaReader(root, allow_outside=allow_outside_media_root, max_bytes=max_media_bytes)
    self._tsv = TsvStores(os.fspath(video_tsv_folder)) if video_tsv_folder else None
    self._progress = progress
    self.report: dict[str, dict] = {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="Quicksviewer jsonl samples with encoded media bytes (qv-jax).",
        features=features(), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    for split, path in self._jsonl.items():
      if count_lines(path) == 0:
        raise ValueError(f"{split} jsonl {escape(path)} has no samples (only blank lines)")
    return {split: self._generate_examples(split, path) for split, path in self._jsonl.items()}

  def _generate_examples(self, split: str, path: str):
    counts = collections.Counter()
    examples: dict[str, list[str]] = {}
    self.report[split] = {"jsonl": escape(path), "written": 0, "skipped": counts, "skipped_examples": examples}
    records = read_jsonl(path, self._reader, self._tsv)
    if self._progress:
      from tqdm import tqdm
      records = tqdm(records, total=count_lines(path), desc=f"{split} ({os.path.basename(path)})", unit="sample")
    for line_no, record in records:
      if record["error"]:
        counts[record["error"]] += 1
        shown = examples.setdefault(record["error"], [])
        if len(shown) < REPORT_EXAMPLES:
          shown.append(f"{record['origin']} (id={record['id']!r}): {record['error_detail']}")
        log.warning("build: %s (id=%r): %s [%s]", record["origin"], record["id"], record["error_detail"],
                    record["error"])
      self.report[split]["written"] += 1
      yield line_no, record


def builder_class(name: str) -> type[JsonlMediaBuilder]:
  """A `JsonlMediaBuilder` subclass whose TFDS name is `name` (snake_case, as TFDS requires)."""
  if not _NAME_RE.match(name):
    raise ValueError(f"dataset name {name!r}: expected snake_case ([a-z][a-z0-9_]*)")
  camel = "".join(part.capitalize() for part in name.split("_"))
  return types.new_class(camel, (JsonlMediaBuilder,), {"skip_registration": True},
                         lambda ns: ns.update(name=name, __module__=__name__))


def build_dataset(*, jsonl: str, media_root: str, data_dir: str, name: str,
                  validation_jsonl: str | None = None, overwrite: bool = False, progress: bool = False,
                  allow_outside_media_root: bool = False, max_media_bytes: int = DEFAULT_MAX_MEDIA_BYTES,
                  video_tsv_folder: str | None = None) -> dict:
  """Builds (or, unless `overwrite`, reuses) `data_dir/name/DATASET_VERSION`.

  Returns {split: {"jsonl", "written", "skipped": {reason: n}, "skipped_examples": {reason: [line: why]}}}."""
  builder = builder_class(name)(jsonl=jsonl, media_root=media_root, validation_jsonl=validation_jsonl,
                                data_dir=data_dir, file_format="array_record", progress=progress,
                                allow_outside_media_root=allow_outside_media_root, max_media_bytes=max_media_bytes,
                                video_tsv_folder=video_tsv_folder)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
  if not builder.report:  # reused: report what is there
    builder.report = {split: {"written": info.num_examples, "skipped": {}, "reused": True}
                      for split, info in builder.info.splits.items()}
  return {split: {**r, "skipped": dict(r["skipped"]), "skipped_examples": dict(r.get("skipped_examples", {}))}
          for split, r in builder.report.items()}


def find_datasets(data_dir: str | os.PathLike) -> list[str]:
  """Names of the TFDS datasets under `data_dir` (folders holding `<version>/dataset_info.json`)."""
  root = epath.Path(data_dir)
  if not root.is_dir():
    return []
  return sorted(d.name for d in root.iterdir()
                if d.is_dir() and any((v / "dataset_info.json").exists() for v in d.iterdir() if v.is_dir()))


def open_split(data_dir: str, name: str, split: str):
  """Random-access source (`tfds.data_source`) of one split; `name` "" picks the only dataset in `data_dir`.

  Raises `NoRecordsError` naming the directory when there is no dataset or the split is empty."""
  if not data_dir:
    raise NoRecordsError("no data directory given (config field `data.dataset_dir` is empty)")
  if not epath.Path(data_dir).is_dir():
    raise NoRecordsError(f"data directory {data_dir} does not exist (config field `data.dataset_dir`)")
  datasets = find_datasets(data_dir)
  if not name:
    if len(datasets) != 1:
      found = f"several datasets {datasets}" if datasets else "no TFDS dataset"
      raise NoRecordsError(f"data directory {data_dir}: {found}; set `data.dataset_name` "
                           "(build one with `python -m data_pipeline.build`)")
    name = datasets[0]
  if name not in datasets:
    raise NoRecordsError(f"data directory {data_dir} holds no TFDS dataset {name!r} (found: {datasets or 'none'}); "
                         "build it with `python -m data_pipeline.build`")
  sources = tfds.data_source(name, data_dir=data_dir)
  if split not in sources:
    raise NoRecordsError(f"dataset {name!r} in {data_dir} has no split {split!r} (splits: {sorted(sources)})")
  source = sources[split]
  if len(source) == 0:
    raise NoRecordsError(f"split {split!r} of dataset {name!r} in {data_dir} has no records")
  return source

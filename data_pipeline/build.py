"""Build a TFDS (ArrayRecord) dataset from a reference-style jsonl; no TensorFlow needed.

  python -m data_pipeline.build --jsonl train.jsonl --media-root /data/media --data-dir /data/tfds \\
      --name my_videos [--validation-jsonl val.jsonl] [--overwrite] [--allow-outside-media-root] \\
      [--max-media-bytes 2080374784] [--video-tsv-folder DIR]

Shows a progress bar per split and prints JSON counts per split: "written" records (one per non-blank jsonl
line), "skipped" by reason and "skipped_examples" (the first lines per reason, with why): records found unusable
at build time (a missing or refused media file, a line that is not a usable sample); they are written with empty
media and the loader skips them with the same reason. Media must be regular files inside --media-root (symlinks
resolved) of at most --max-media-bytes. Manual: docs/data_pipeline_build.md.
Exit status 2 on bad arguments or an unreadable / empty jsonl.
"""

import argparse
import contextlib
import json
import logging
import sys

from data_pipeline import tfds_builder
from data_pipeline.media_files import DEFAULT_MAX_MEDIA_BYTES, RECORD_LIMIT_BYTES


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m data_pipeline.build", description=__doc__.split("\n")[0])
  parser.add_argument("--jsonl", required=True, help="train split: one LLaVA-style sample per line")
  parser.add_argument("--media-root", required=True, help="directory the jsonl's video/image paths are relative to")
  parser.add_argument("--data-dir", required=True, help="TFDS data_dir to write (becomes data.dataset_dir)")
  parser.add_argument("--name", required=True, help="dataset name, snake_case (becomes data.dataset_name)")
  parser.add_argument("--validation-jsonl", default=None, help="optional validation split")
  parser.add_argument("--overwrite", action="store_true", help="rebuild even if the dataset exists")
  parser.add_argument("--allow-outside-media-root", action="store_true",
                      help="read media paths that resolve outside --media-root (absolute paths, '..', symlinks)")
  parser.add_argument("--max-media-bytes", type=int, default=DEFAULT_MAX_MEDIA_BYTES,
                      help=f"larger media files are skipped (file_too_large); default {DEFAULT_MAX_MEDIA_BYTES} "
                      f"(~35 min of 1080p at 8 Mbit/s), at most {RECORD_LIMIT_BYTES} (one record < 2 GiB)")
  parser.add_argument("--video-tsv-folder", default=None,
                      help="the reference's video_folder of TSV frame stores (imgs.tsv + fname2idx.json); videos "
                      "named in them are read from there")
  parser.add_argument("--quiet", action="store_true", help="no progress bar, no per-record warnings")
  args = parser.parse_args(argv)
  if not 0 < args.max_media_bytes <= RECORD_LIMIT_BYTES:
    parser.error(f"--max-media-bytes {args.max_media_bytes}: expected 1..{RECORD_LIMIT_BYTES} (a record is one "
                 "protobuf message, at most 2 GiB)")

  logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="%(levelname)s %(message)s")
  import tensorflow_datasets as tfds
  tfds.display_progress_bar(False)  # our own bar counts samples against the jsonl's length
  try:
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints its own progress lines; stdout is the JSON
      report = tfds_builder.build_dataset(
          jsonl=args.jsonl, media_root=args.media_root, data_dir=args.data_dir, name=args.name,
          validation_jsonl=args.validation_jsonl, overwrite=args.overwrite, progress=not args.quiet,
          allow_outside_media_root=args.allow_outside_media_root, max_media_bytes=args.max_media_bytes,
          video_tsv_folder=args.video_tsv_folder)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = {"name": args.name, "data_dir": args.data_dir, "version": tfds_builder.DATASET_VERSION, "splits": report}
  print(json.dumps(out, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Build a TFDS (ArrayRecord) dataset from a reference-style jsonl; no TensorFlow needed.

  python -m data_pipeline.build --jsonl train.jsonl --media-root /data/media --data-dir /data/tfds \\
      --name my_videos [--validation-jsonl val.jsonl] [--overwrite]

Shows a progress bar per split and prints JSON counts per split: "written" records (one per non-blank jsonl
line) and "skipped" by reason: records found unusable at build time (a missing media file, a line that is not
a JSON sample); they are written with empty media and the loader skips them with the same reason.
Exit status 2 on bad arguments or an unreadable / empty jsonl.
"""

import argparse
import contextlib
import json
import logging
import sys

from data_pipeline import tfds_builder


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m data_pipeline.build", description=__doc__.split("\n")[0])
  parser.add_argument("--jsonl", required=True, help="train split: one LLaVA-style sample per line")
  parser.add_argument("--media-root", required=True, help="directory the jsonl's video/image paths are relative to")
  parser.add_argument("--data-dir", required=True, help="TFDS data_dir to write (becomes data.dataset_dir)")
  parser.add_argument("--name", required=True, help="dataset name, snake_case (becomes data.dataset_name)")
  parser.add_argument("--validation-jsonl", default=None, help="optional validation split")
  parser.add_argument("--overwrite", action="store_true", help="rebuild even if the dataset exists")
  parser.add_argument("--quiet", action="store_true", help="no progress bar, no per-record warnings")
  args = parser.parse_args(argv)

  logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="%(levelname)s %(message)s")
  import tensorflow_datasets as tfds
  tfds.display_progress_bar(False)  # our own bar counts samples against the jsonl's length
  try:
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints its own progress lines; stdout is the JSON
      report = tfds_builder.build_dataset(
          jsonl=args.jsonl, media_root=args.media_root, data_dir=args.data_dir, name=args.name,
          validation_jsonl=args.validation_jsonl, overwrite=args.overwrite, progress=not args.quiet)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = {"name": args.name, "data_dir": args.data_dir, "version": tfds_builder.DATASET_VERSION, "splits": report}
  print(json.dumps(out, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())

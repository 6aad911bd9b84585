"""The converter's `*_map.py` files hold tables only: name tables, ignore lists, shape tables and the tensor
transforms they use. Layout detection, config derivation, vocabulary resizing and the streaming engine live
in files named for their job (`layouts.py`, `derive_config.py`, `vocab.py`, `stream.py`, `parts.py`)."""

import ast
import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# table / ignore / shape builders (`decoder_table`, `decoder_ignore`, `expected_vision_shapes`), the lookup of
# `LAYOUT_PARTS`, the config section the builders read (`_decoder_section`), tensor transforms (`_heads_in`)
TABLE_FUNCTION = re.compile(r"_?\w+_(?:table|ignore|shapes)|layout_parts|_\w+_section|_heads_\w+")


def _not_tables(source: str) -> list[str]:
  """Top-level classes, and functions whose names are not table builders or transforms."""
  bad = []
  for node in ast.parse(source).body:
    if isinstance(node, ast.ClassDef):
      bad.append(f"class {node.name}")
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not TABLE_FUNCTION.fullmatch(node.name):
      bad.append(f"def {node.name}")
  return bad


def test_map_files_hold_tables_only():
  files = sorted(glob.glob(os.path.join(REPO, "qv_jax", "convert", "*_map.py")))
  assert {os.path.basename(f) for f in files} >= {"siglip_map.py", "decoder_map.py", "compressor_map.py",
                                                   "quicksviewer_map.py"}
  bad = {os.path.basename(f): _not_tables(open(f).read()) for f in files}
  assert not any(bad.values()), {f: b for f, b in bad.items() if b}


def test_the_check_flags_engine_code_in_a_map_file():
  """What the old quicksviewer_map.py held next to its tables."""
  source = ("import dataclasses\nLAYOUTS = ('siglip',)\n"
            "def layout_table(layout, cfg):\n  return [], []\n"
            "def detect_layout(names):\n  return 'siglip'\n"
            "def converted_parts(layouts):\n  return ()\n"
            "def derive_config(sources):\n  return None\n"
            "def resize_vocab_rows(table, n):\n  return table\n"
            "@dataclasses.dataclass\nclass ConversionReport:\n  layout: str\n"
            "def convert_tensors(reader, layout, cfg, sink):\n  pass\n"
            "def _heads_in(h, d):\n  return lambda x: x\n")
  assert _not_tables(source) == ["def detect_layout", "def converted_parts", "def derive_config", "def resize_vocab_rows",
                                 "class ConversionReport", "def convert_tensors"]

"""The model sizes a config can name."""

SIZES = ("tiny", "small", "qwen2_7b", "llama3_8b")


def check_size(size: str) -> str:
  import difflib
  from qv_jax.config.errors import require
  near = difflib.get_close_matches(str(size), SIZES, n=1)
  hint = f"did you mean {near[0]!r}? " if near else ""
  require(size in SIZES, "size", f"unknown size {size!r}; {hint}expected one of {SIZES}")
  return size

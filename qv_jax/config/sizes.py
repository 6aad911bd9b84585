"""The model sizes a config can name."""

SIZES = ("tiny", "small", "qwen2_7b", "llama3_8b")


def check_size(size: str) -> str:
  from qv_jax.config.errors import require
  require(size in SIZES, "size", f"unknown size {size!r}; expected one of {SIZES}")
  return size

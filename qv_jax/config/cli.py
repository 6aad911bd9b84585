"""Command-line parsing that fails in one line: `app.run(main, flags_parser=parse_flags_or_exit)`.

A bad `--config=…:size=…,stage=…`, a `--config.section.field` that does not exist (the nearest field is
suggested) or a value absl cannot convert prints `error: …` and exits with status 2, instead of the
traceback ml_collections embeds in its flag errors.
"""

from __future__ import annotations

import difflib
import sys

from absl import flags

from qv_jax.config.errors import ConfigError

USAGE_EXIT = 2


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  raise SystemExit(USAGE_EXIT)


def _original_config_error(e: BaseException) -> ConfigError | None:
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, ConfigError) and e.field:
      return e
    e = e.__cause__ or e.__context__
  return None


def _field_paths(config, prefix: str = "") -> list[str]:
  out = []
  for k, v in config.items():
    out.append(prefix + k)
    if hasattr(v, "items") and not isinstance(v, dict):
      out.extend(_field_paths(v, f"{prefix}{k}."))
  return out


def unknown_override(argv: list[str], config, flag_name: str = "config") -> str | None:
  """The first `--<flag_name>.a.b=…` of argv that names no field of `config`, with the nearest field."""
  known = _field_paths(config)
  for arg in argv[1:]:
    if not arg.startswith(f"--{flag_name}."):
      continue
    path = arg[len(flag_name) + 3:].split("=", 1)[0]
    if path not in known:
      near = difflib.get_close_matches(path, known, n=1, cutoff=0.6)
      hint = f"; did you mean --{flag_name}.{near[0]}?" if near else ""
      return f"--{flag_name}.{path}: no such config field{hint}"
  return None


def _load_config_arg(argv: list[str], flag_name: str):
  """The config `--<flag_name>=path.py[:arg]` names, loaded again (None when it cannot be)."""
  import importlib.util
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith(f"--{flag_name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{flag_name}" and i + 1 < len(argv):
      value = argv[i + 1]
  if not value:
    return None
  path, _, config_arg = value.partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_qv_cli_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(config_arg) if config_arg else module.get_config()
  except Exception:  # noqa: BLE001  (only used to word an error that is already being reported)
    return None


def parse_flags_or_exit(argv: list[str], config_flag: str = "config") -> list[str]:
  """absl flags parser for `app.run`: returns the remaining argv or exits 2 with one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    original = _original_config_error(e)
    if original is not None:
      fail(str(original))
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    last = str(e).strip().splitlines()[-1].strip() if str(e).strip() else ""
    fail(first if "Traceback" not in str(e) else f"{first.rstrip(':')}: {last}")
  except (KeyError, AttributeError) as e:
    config = _load_config_arg(argv, config_flag)
    message = unknown_override(argv, config) if config is not None else None
    fail(message or f"{type(e).__name__}: {str(e).splitlines()[0]}")
  except ConfigError as e:
    fail(str(_original_config_error(e) or e))
  return []

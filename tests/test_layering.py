"""The library points down: `qv_jax` never imports the data pipeline, the experiment configs or the
launchers, and only its application layer `qv_jax.infer` reads media through `data_pipeline`; no module
shadows a standard-library one. See docs/contributing.md."""

import ast
import json
import os
import subprocess
import sys

import jax
import pytest

from qv_jax.config import ConfigError, get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP_LAYER = ("data_pipeline", "configs", "launch")
# qv_jax.infer reads videos and prompts, and qv_jax.infer.fixtures writes test workdirs, through data_pipeline
ALLOWED = {"qv_jax/infer": ("data_pipeline", "qv_jax.infer")}


def _imported(path: str) -> set[str]:
  """Module names imported anywhere in `path`, each with its parents ("a.b.c" -> a, a.b, a.b.c)."""
  tree = ast.parse(open(path).read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)}


def test_no_library_module_imports_the_application_layer():
  """Also the lazy imports inside functions, which an import-time check cannot see."""
  bad = []
  for root, _, files in os.walk(os.path.join(REPO, "qv_jax")):
    rel = os.path.relpath(root, REPO)
    allowed = next((v for k, v in ALLOWED.items() if rel == k or rel.startswith(k + os.sep)), ())
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        bad += [f"{os.path.join(rel, f)} imports {m}" for m in _imported(path)
                if m in APP_LAYER + ("qv_jax.infer",) and m not in allowed]
  assert not bad, bad


def test_importing_the_library_loads_no_application_module():
  code = ("import json, sys\n"
          "import qv_jax, qv_jax.model, qv_jax.train, qv_jax.convert, qv_jax.plan, qv_jax.config\n"
          "import qv_jax.train.loop, qv_jax.convert.cli, qv_jax.plan.train_plan, qv_jax.model.quicksviewer\n"
          "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in %r)))" % (APP_LAYER,))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
  assert json.loads(out.strip().splitlines()[-1]) == []


def test_no_module_shadows_the_standard_library():
  """A script run from one of these folders (or a test module, tests/ is on sys.path) puts its folder first
  on sys.path, where a `inspect.py` would replace the standard library's for everything it imports."""
  names = set(sys.stdlib_module_names)
  folders = ("", "data_pipeline", "launch", "configs", "benchmarks", "tests")
  clashes = [os.path.join(d, f) for d in folders for f in os.listdir(os.path.join(REPO, d))
             if f.endswith(".py") and f[:-3] in names]
  assert not clashes, clashes


@pytest.mark.parametrize("arg", ["size=qwen2_7b,stage=2", "size=llama3_8b,stage=3", "size=small,stage=1", ""])
def test_experiment_file_gives_the_library_preset(arg):
  """`--config configs/quicksviewer.py:<arg>` parsed as the launchers parse it."""
  from absl import flags
  from ml_collections import config_flags
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=False)
  path = os.path.join(REPO, "configs", "quicksviewer.py")
  values(["prog", f"--config={path}" + (f":{arg}" if arg else "")])
  assert holder.value.to_dict() == get_config(arg or None).to_dict()


def test_train_without_data_for_a_dataset_on_disk_names_the_field(tmp_path):
  from qv_jax.train.loop import train

  c = get_config("size=tiny,stage=1")
  c.data.dataset_name = "scenes"
  c.data.dataset_dir = str(tmp_path)
  with pytest.raises(ConfigError, match=r"data.dataset_name.*data_pipeline.loader.make_data"):
    train(c, workdir=str(tmp_path / "run"), devices=[jax.devices()[0]])

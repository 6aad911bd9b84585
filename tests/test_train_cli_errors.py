"""`python -m launch.train` with a bad flag, config or input prints one `error:` line naming what is wrong
(a typo gets the nearest name) and exits with status 2 before anything compiles."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/quicksviewer.py:size=tiny,stage=1"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  from data_pipeline.tokenizer import build_tiny_tokenizer
  root = tmp_path_factory.mktemp("cli")
  (root / "empty").mkdir()
  (root / "a_file").write_text("not a directory")
  tokenizer = build_tiny_tokenizer(["red circle, then blue square."], str(root / "tokenizer.json"))
  return root, tokenizer


CASES = {
    "unknown size": ([f"--config=configs/quicksviewer.py:size=smal,stage=1"],
                     "unknown size 'smal'; did you mean 'small'?"),
    "unknown stage": ([f"--config=configs/quicksviewer.py:size=tiny,stage=4"], "unknown stage 4"),
    "config argument typo": ([f"--config=configs/quicksviewer.py:size=tiny,stag=1"], "did you mean 'stage'?"),
    "field typo": ([f"--config={CONFIG}", "--config.train.lerning_rate=1e-3"],
                   "--config.train.lerning_rate: no such config field; did you mean --config.train.learning_rate?"),
    "section typo": ([f"--config={CONFIG}", "--config.trian.seed=1"], "did you mean --config.train.seed?"),
    "mesh.data=0": ([f"--config={CONFIG}", "--config.mesh.data=0"], "`mesh.data`: must be -1 or >= 1, got 0"),
    "workdir is a file": ([f"--config={CONFIG}", "--workdir={root}/a_file"], "a_file exists and is not a directory"),
    "empty dataset dir": ([f"--config={CONFIG}", "--config.data.dataset_name=scenes",
                           "--config.data.dataset_dir={root}/empty", "--config.data.tokenizer_path={tokenizer}"],
                          "empty"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_line_and_status_2(case, inputs, tmp_path):
  root, tokenizer = inputs
  args, expected = CASES[case]
  args = [a.format(root=root, tokenizer=tokenizer) for a in args]
  if not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={tmp_path / 'run'}")
  if "--config.data.dataset_name=scenes" not in args:
    args.append("--config.data.dataset_name=synthetic")
  cmd = [sys.executable, "-m", "launch.train", "--cpu_devices=1", *args]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=REPO)
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert out.returncode == 2, out.stderr[-2000:]
  assert len(errors) == 1 and expected in errors[0], out.stderr[-2000:]
  assert "Traceback" not in out.stderr and "compil" not in out.stderr.lower(), out.stderr[-2000:]

"""Resuming a work directory with a config that changes what is computed is refused (naming each
difference) unless `train.allow_config_change` names it; execution knobs may always change."""

import json
import logging
import os

import jax
import pytest

from qv_jax.config import ConfigError
from qv_jax.train import checkpoint as ckpt
from qv_jax.train.config_change import HARMLESS, config_dict
from qv_jax.train.loop import train
from test_train_errors import NoData
from test_train_util import tiny_config


def _previous_run(workdir, **overrides):
  """A work directory as a run with `overrides` leaves it: config.json and a (here empty) step 2."""
  os.makedirs(workdir / "checkpoints" / "2")
  (workdir / "config.json").write_text(tiny_config(1, **overrides).to_json_best_effort(indent=2))


def _train(workdir, config):
  return train(config, workdir=str(workdir), data=NoData(), devices=[jax.devices()[0]])


def test_changed_learning_rate_and_batch_are_refused(tmp_path):
  _previous_run(tmp_path)
  c = tiny_config(1, learning_rate=3e-4, batch_size=4)
  with pytest.raises(ConfigError) as e:
    _train(tmp_path, c)
  msg = str(e.value)
  assert "train.learning_rate: 0.0001 -> 0.0003" in msg and "data.batch_size: 2 -> 4" in msg
  assert "--allow-config-change=data.batch_size,train.learning_rate" in msg and "\n" not in msg
  assert json.loads((tmp_path / "config.json").read_text())["train"]["learning_rate"] == 1e-4   # untouched


def test_allowed_and_harmless_changes_pass_the_check(tmp_path, caplog):
  _previous_run(tmp_path)
  c = tiny_config(1, learning_rate=3e-4, log_every=7, checkpoint_every=3, allow_config_change=("train",))
  c.mesh.data = 1
  with caplog.at_level(logging.WARNING), pytest.raises(ckpt.CheckpointError, match="no intact checkpoint"):
    _train(tmp_path, c)                 # past the config check: the (empty) step 2 is what stops it
  warned = " ".join(r.getMessage() for r in caplog.records)
  assert "train.learning_rate: 0.0001 -> 0.0003" in warned and "log_every" not in warned
  assert json.loads((tmp_path / "config.json").read_text())["train"]["learning_rate"] == 3e-4
  assert json.loads((tmp_path / "config.before-step-2.json").read_text())["train"]["learning_rate"] == 1e-4


def test_a_fresh_workdir_is_not_compared(tmp_path):
  (tmp_path / "config.json").write_text(tiny_config(1).to_json_best_effort())   # config but no checkpoint
  with pytest.raises(AssertionError, match="read data"):
    _train(tmp_path, tiny_config(1, learning_rate=5e-4, total_steps=1))


def test_allow_names_are_checked(tmp_path):
  with pytest.raises(ConfigError, match=r"'train.learnig_rate' is not a config field.*'train.learning_rate'"):
    _train(tmp_path, tiny_config(1, allow_config_change=("train.learnig_rate",)))


def test_harmless_fields_exist():
  assert HARMLESS <= set(config_dict(tiny_config(1)))

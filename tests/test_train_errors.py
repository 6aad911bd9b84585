"""Bad inputs stop the trainer with a clear error before anything compiles; a NaN loss stops the run with
a message naming the step and the samples."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs.quicksviewer import get_config
from data_pipeline.loader import make_data
from qv_jax.config import ConfigError, validate
from qv_jax.model.quicksviewer import Quicksviewer
from qv_jax.train import checkpoint as ckpt
from qv_jax.train.loop import NonFiniteLossError, train
from qv_jax.train.synthetic_batches import SyntheticBatches
from test_train_util import tiny_config


class NoData:
  """Fails the test if the trainer asks for a batch: the error had to come before."""

  def __next__(self):
    raise AssertionError("the trainer read data before rejecting the input")

  def __iter__(self):
    return self

  def get_state(self):
    return {}


def test_mesh_that_does_not_match_the_devices(tmp_path):
  c = tiny_config(1)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 3, 1, 1
  with pytest.raises(ConfigError, match=r"mesh.*needs 3 devices, but 8 are present"):
    train(c, workdir=str(tmp_path), data=NoData())


def test_batch_that_does_not_split_over_the_mesh(tmp_path):
  c = tiny_config(1, batch_size=4)
  c.mesh.data, c.mesh.fsdp = 8, 1
  with pytest.raises(ConfigError, match=r"data.batch_size.*8 batch shards"):
    train(c, workdir=str(tmp_path), data=NoData())
  c = tiny_config(1, batch_size=8, grad_accum=3)
  with pytest.raises(ConfigError, match=r"train.grad_accum"):
    train(c, workdir=str(tmp_path), data=NoData(), devices=[jax.devices()[0]])


def test_unknown_stage(tmp_path):
  with pytest.raises(ConfigError, match=r"train.stage.*unknown stage 4"):
    get_config("size=tiny,stage=4")
  c = tiny_config(1)
  c.train.stage = 7
  with pytest.raises(ConfigError, match=r"train.stage.*unknown stage 7"):
    train(c, workdir=str(tmp_path), data=NoData())


def _save_tiny_params(workdir):
  config = validate(tiny_config(1))
  model = Quicksviewer(config.model, max_seq_len=config.data.max_seq_len, rngs=nnx.Rngs(params=0))
  checkpointer = ckpt.Checkpointer(str(workdir), async_save=False)
  checkpointer.save(4, params=nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                    opt_state={"count": jax.numpy.zeros((), jax.numpy.int32)},
                    meta={"step": jax.numpy.asarray(4, jax.numpy.int32),
                          "rng": jax.random.PRNGKey(0)}, data_state={})
  checkpointer.close()


def test_checkpoint_of_another_model_size(tmp_path):
  _save_tiny_params(tmp_path / "tiny_run")
  small = get_config("size=small,stage=2")
  small.data.dataset_name = "synthetic"
  small.train.init_from = str(tmp_path / "tiny_run")
  small.train.progress_bar = False
  with pytest.raises(ckpt.CheckpointError) as e:
    train(small, workdir=str(tmp_path / "small_run"), data=NoData(), devices=[jax.devices()[0]])
  msg = str(e.value)
  assert "tiny_run" in msg and "'small'" in msg
  assert "in compressor, decoder, vision_tower" in msg and "checkpoint (64,) vs model (128,)" in msg
  # The same when resuming a work directory written by another size.
  with pytest.raises(ckpt.CheckpointError, match="does not match the model"):
    small.train.init_from = ""
    train(small, workdir=str(tmp_path / "tiny_run"), data=NoData(), devices=[jax.devices()[0]])


def test_init_from_that_does_not_exist(tmp_path):
  c = tiny_config(2, init_from=str(tmp_path / "nowhere"))
  with pytest.raises(ckpt.CheckpointError, match="nowhere does not exist"):
    train(c, workdir=str(tmp_path / "run"), data=NoData(), devices=[jax.devices()[0]])


def test_data_directory_with_no_records(tmp_path):
  from data_pipeline.loader import NoRecordsError
  from data_pipeline.tokenizer import build_tiny_tokenizer
  c = tiny_config(1)
  c.data.dataset_name = "scenes"
  c.data.dataset_dir = str(tmp_path / "empty")
  os.makedirs(c.data.dataset_dir)
  c.data.tokenizer_path = build_tiny_tokenizer(["red circle, then blue square."],
                                               str(tmp_path / "tokenizer.json"))
  with pytest.raises(NoRecordsError, match="empty"):
    make_data(c)
  c.data.dataset_dir = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match="data.dataset_dir.*missing"):
    make_data(c)


class PoisonedBatches(SyntheticBatches):
  """Float frames; at the `poison_step`-th batch, NaN in the frames of row 1."""

  def __init__(self, config, poison_step):
    super().__init__(config, seed=5)
    self.poison_step = poison_step

  def __next__(self):
    batch = super().__next__()
    if self.next_index == self.poison_step:
      batch["frames"][1] = np.nan
    return batch


def test_nan_loss_stops_the_run_naming_step_and_samples(tmp_path):
  c = tiny_config(1, total_steps=6)
  c.data.normalize_on_host = True
  data = PoisonedBatches(c, poison_step=3)
  bad_sample = 3 * c.data.batch_size - 1                     # global index of row 1 of the third batch
  with pytest.raises(NonFiniteLossError) as e:
    train(c, workdir=str(tmp_path), data=data, devices=[jax.devices()[0]])
  msg = str(e.value)
  assert "at step 3" in msg and f"[{bad_sample}]" in msg, msg
  # Nothing was saved after the bad step.
  assert ckpt.saved_step_dirs(str(tmp_path)) == []

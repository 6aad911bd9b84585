"""Shared helpers of the trainer tests (no tests here): tiny configs on synthetic batches and a
persistent compilation cache shared by the trainer test files, so repeated runs skip compiling."""

import os
import tempfile

import jax

from configs.quicksviewer import get_config

CACHE_DIR = os.path.join(tempfile.gettempdir(), "qv_jax_test_compile_cache")


def tiny_config(stage: int = 1, *, batch_size: int = 2, total_steps: int = 6, **train_overrides):
  c = get_config(f"size=tiny,stage={stage}")
  c.data.dataset_name = "synthetic"
  c.data.max_text_len = 128
  c.data.max_seq_len = 128
  c.data.batch_size = batch_size
  c.train.total_steps = total_steps
  c.train.log_every = 1
  c.train.checkpoint_every = 1000
  c.train.progress_bar = False
  c.train.tensorboard = False
  c.train.async_checkpointing = False
  c.train.compilation_cache_dir = CACHE_DIR
  for k, v in train_overrides.items():
    c.train[k] = v
  return c


def single_device_mesh_config(config):
  """Mesh sizes for 1 device (the tests' process has 8)."""
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  return config


def first_device():
  return [jax.devices()[0]]

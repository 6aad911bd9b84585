"""The cubing auxiliary term on a mixed image/video batch: by default the reference's effective weight
aux_weight · Σ_video-samples mean‖z‖ / (all samples); `train.aux_normalization="video_samples"` divides
by the video samples instead."""

import jax
import numpy as np
import pytest
from flax import nnx

from qv_jax.batch import MODALITY_VIDEO
from qv_jax.config import validate
from qv_jax.train.loss import cubing_aux_per_sample
from qv_jax.train.synthetic_batches import SyntheticBatches
from test_train_step import run_steps
from test_train_util import tiny_config

AUX_WEIGHT = 0.5


def _config(normalization=None):
  c = tiny_config(1, batch_size=4, total_steps=10, warmup_ratio=0.0, aux_weight=AUX_WEIGHT)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
  if normalization:
    c.train.aux_normalization = normalization
  return c


def _reference_sum_and_counts(config):
  """Σ over video samples of each one's mean‖z‖ for the first batch, from the model's own forward pass
  (the state run_steps starts from, the step's key and noise weight), and (samples, video samples)."""
  from qv_jax.train.schedules import noise_weight
  from qv_jax.train.state import create_train_state
  from qv_jax.sharding import axis_rules, make_mesh
  config = validate(config)
  mesh = make_mesh(config.mesh, [jax.devices()[0]])
  batch = next(SyntheticBatches(config, seed=3, image_fraction=0.25))
  with jax.set_mesh(mesh), axis_rules(config.sharding_rules):
    state, spec = create_train_state(config, mesh)
    @jax.jit
    def aux_sum(params, frozen, b, step, rng):
      out = nnx.merge(spec.graphdef, params, frozen)(
          b, key=jax.random.fold_in(rng, step), noise_weight=noise_weight(step, config.train))
      is_video = b["modality"] == MODALITY_VIDEO
      return cubing_aux_per_sample(out.cubes.logits, out.cubes.logit_mask, is_video).sum()

    total = aux_sum(state.params, state.frozen, batch, state.step, state.rng)
  is_video = batch["modality"] == MODALITY_VIDEO
  return float(total), len(is_video), int(is_video.sum())


@pytest.mark.slow
def test_aux_term_over_all_samples_by_default_and_over_videos_by_flag():
  total, n, videos = _reference_sum_and_counts(_config())
  assert 0 < videos < n and total > 0                      # a mixed batch
  _, (m_all,), _ = run_steps(_config(), [jax.devices()[0]], 1)
  _, (m_vid,), _ = run_steps(_config("video_samples"), [jax.devices()[0]], 1)
  np.testing.assert_allclose(m_all["aux"], total / n, rtol=1e-4)
  np.testing.assert_allclose(m_vid["aux"], total / videos, rtol=1e-4)
  for m in (m_all, m_vid):
    np.testing.assert_allclose(m["loss"], m["ce"] + AUX_WEIGHT * m["aux"], rtol=1e-5)
  np.testing.assert_allclose(m_all["ce"], m_vid["ce"], rtol=1e-6)

"""Packed rows in the model: every sample of a packed row gets the merged tokens, labels, positions, logits,
loss and gradients it gets alone (fp32), and no sample sees another."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipeline.packing import PackedCollator
from data_pipeline.seq_buckets import bound_settings, merged_length_bound
from qv_jax.batch import IGNORE_INDEX
from qv_jax.config import validate
from qv_jax.model.quicksviewer import Quicksviewer
from qv_jax.train.loss import chunked_cross_entropy
from qv_jax.train.synthetic_batches import SyntheticBatches
from test_train_util import tiny_config

ETA = 0.5
SLOTS = 3


def _config():
  c = tiny_config(1, batch_size=1)
  c.data.max_seq_len = 256
  c.data.pack_samples = SLOTS
  return c


def _solo_config(n):
  c = _config()
  c.data.batch_size = n
  c.data.pack_samples = 1
  return c


def _samples(config, ids):
  synth = SyntheticBatches(config, seed=5, image_fraction=0.5)
  out = []
  for sid in ids:
    x = synth.processed(sid)
    x["merged_bound"] = merged_length_bound(x["input_ids"], x["token_frame"], x["modality"], len(x["frames"]),
                                            **bound_settings(config.model))
    out.append(x)
  return synth, out


def _packed(config, rows):
  collator = PackedCollator(image_size=config.data.image_size, max_text_len=config.data.max_text_len,
                            frame_buckets=config.data.frame_buckets, seq_buckets=(192, 256), slots=SLOTS,
                            pad_id=0, normalize_on_host=False)
  return collator(rows)


def _loss(model, batch, key):
  out = model(batch, key=key, noise_weight=ETA)
  ce, count = chunked_cross_entropy(out.hidden, out.inputs.labels, model.decoder.logits_from_hidden, 32)
  return ce.sum(), (count.sum(), out)


@pytest.fixture(scope="module")
def setup():
  config = validate(_config())
  model = Quicksviewer(config.model, max_seq_len=config.data.max_seq_len, rngs=nnx.Rngs(0))
  synth, samples = _samples(config, range(5))
  rows = [samples[:3], samples[3:]]
  graphdef, params = nnx.split(model)
  key = jax.random.key(7)

  @jax.jit
  def run(params, batch):
    def f(p):
      ce, aux = _loss(nnx.merge(graphdef, p), batch, key)
      return ce, aux
    (ce, (count, out)), grads = jax.value_and_grad(f, has_aux=True)(params)
    logits = nnx.merge(graphdef, params).decoder.logits_from_hidden(out.hidden)
    return ce, count, grads, logits, out.inputs

  # Unpacked rows are independent (SPEC §5: one sample per row): row i of this batch is sample i alone.
  solo = run(params, SyntheticBatches(_solo_config(len(samples)), seed=5, image_fraction=0.5).batch_for(
      [x["sample_id"] for x in samples]))
  ce, count, grads, logits, inputs = solo
  alone = [(ce, count, grads, logits[i:i + 1], jax.tree.map(lambda a: a[i:i + 1], inputs))
           for i in range(len(samples))]
  packed = run(params, _packed(config, rows))
  return config, samples, rows, alone, packed, run, params


def _spans(packed_inputs, rows):
  """(row, offset, sample) for every packed sample."""
  seg = np.asarray(packed_inputs.segment_ids)
  for r, row in enumerate(rows):
    for j, x in enumerate(row):
      where = np.nonzero(seg[r] == j)[0]
      yield r, int(where[0]), len(where), x


def test_merged_sequence_of_each_packed_sample_equals_it_alone(setup):
  _, samples, rows, alone, packed, _, _ = setup
  inputs = packed[4]
  for (r, start, n, x), a in zip(_spans(inputs, rows), alone):
    solo = a[4]
    n_solo = int(np.asarray(solo.mask[0]).sum())
    assert n == n_solo and n <= x["merged_bound"]
    sl = slice(start, start + n)
    np.testing.assert_array_equal(np.asarray(inputs.positions[r, sl]), np.arange(n))
    np.testing.assert_array_equal(np.asarray(inputs.labels[r, sl]), np.asarray(solo.labels[0, :n]))
    # Visual tokens come from a vision batch of another shape: equal up to fp32 rounding.
    np.testing.assert_allclose(np.asarray(inputs.embeds[r, sl]), np.asarray(solo.embeds[0, :n]), rtol=1e-5,
                               atol=1e-6)
    assert np.asarray(inputs.mask[r, sl]).all()
  # Every real token belongs to one sample; nothing else is marked real.
  assert int(np.asarray(inputs.mask).sum()) == sum(int(np.asarray(a[4].mask).sum()) for a in alone)


def test_logits_loss_and_gradients_equal_each_sample_alone(setup):
  _, _, rows, alone, packed, _, _ = setup
  logits = np.asarray(packed[3])
  for (r, start, n, _), a in zip(_spans(packed[4], rows), alone):
    ref = np.asarray(a[3][0, :n])
    np.testing.assert_allclose(logits[r, start:start + n], ref, rtol=1e-5, atol=1e-5)
    # 1e-6 relative (norm-wise) per sample; measured: max |Δ| ≤ 9e-7 of the largest |logit|.
    assert np.linalg.norm(logits[r, start:start + n] - ref) <= 1e-6 * np.linalg.norm(ref)
  ce_alone, count_alone, grads_alone = alone[0][:3]        # sums over the unpacked rows
  assert float(packed[1]) == float(count_alone) > 0
  np.testing.assert_allclose(float(packed[0]), float(ce_alone), rtol=1e-6)
  leaves = [(jax.tree_util.keystr(p), np.asarray(g), np.asarray(h)) for (p, g), h in
            zip(jax.tree_util.tree_flatten_with_path(packed[2])[0], jax.tree.leaves(grads_alone))]
  total = np.sqrt(sum(float(np.square(h).sum()) for _, _, h in leaves))
  diff = np.sqrt(sum(float(np.square(g - h).sum()) for _, g, h in leaves))
  # Measured 9.1e-7 relative on the CI CPU; the bound leaves room for another CPU's matmul blocking (the
  # vision tower sees a batch of another shape, so its fp32 sums round differently).
  assert diff <= 1.5e-6 * total, (diff, total)
  for name, g, h in leaves:      # leaves whose true gradient is 0 (e.g. key biases) hold only rounding noise
    norm = float(np.linalg.norm(h))
    if norm > 1e-3 * total:
      assert float(np.linalg.norm(g - h)) <= 1e-5 * norm, name


def test_changing_one_sample_leaves_the_others_logits_unchanged(setup):
  config, samples, rows, _, packed, run, params = setup
  changed = dict(rows[0][1])
  changed["input_ids"] = changed["input_ids"].copy()
  text = np.nonzero((changed["input_ids"] >= 0) & (changed["labels"] == IGNORE_INDEX))[0]
  changed["input_ids"][text[1:4]] = 40
  changed["frames"] = 255 - changed["frames"]
  other = run(params, _packed(config, [[rows[0][0], changed, rows[0][2]], rows[1]]))
  spans = list(_spans(packed[4], rows))
  for r, start, n, x in spans:
    a, b = np.asarray(packed[3][r, start:start + n]), np.asarray(other[3][r, start:start + n])
    if x is rows[0][1]:
      assert not np.allclose(a, b)
    else:
      np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_train_step_on_packed_rows_gives_the_unpacked_loss_and_metrics():
  """Global token mean, per-sample aux averaged over the videos, per-sample CE, with 2 micro-batches."""
  from qv_jax.sharding import axis_rules, make_mesh
  from qv_jax.train.loop import to_global
  from qv_jax.train.state import create_train_state
  from qv_jax.train.step import make_train_step

  config = _config()
  _, samples = _samples(config, range(4))
  solo_config = _solo_config(4)
  packed_config = _config()
  packed_config.data.batch_size = 2
  packed_batch = _packed(config, [samples[:2], samples[2:]])
  solo_batch = SyntheticBatches(solo_config, seed=5, image_fraction=0.5).batch_for(
      [x["sample_id"] for x in samples])
  solo_config, packed_config = validate(solo_config), validate(packed_config)
  mesh = make_mesh(solo_config.mesh, [jax.devices()[0]])
  results = []
  with jax.set_mesh(mesh), axis_rules(solo_config.sharding_rules):
    state, spec = create_train_state(solo_config, mesh)
    for cfg, batch in ((solo_config, solo_batch), (packed_config, packed_batch)):
      cfg = cfg.replace(train=dict(grad_accum=2))
      _, metrics = jax.jit(make_train_step(spec.graphdef, cfg, spec.tx))(state, to_global(batch, mesh))
      results.append(jax.device_get(metrics))
  solo, packed = results
  for k in ("loss", "ce", "aux", "supervised_tokens", "merged_tokens"):
    np.testing.assert_allclose(packed[k], solo[k], rtol=1e-5, err_msg=k)
  assert float(solo["aux"]) > 0
  order = np.argsort(packed["sample_id"])[-4:]                # drop the empty slots (sample_id -1)
  np.testing.assert_array_equal(packed["sample_id"][order], solo["sample_id"])
  np.testing.assert_allclose(packed["sample_ce"][order], solo["sample_ce"], rtol=1e-5)
  slots = 2 * packed_batch["segment_ids"].shape[1]
  np.testing.assert_allclose(packed["padding_fraction"], 1 - packed["merged_tokens"] / slots, rtol=1e-6)
  assert 0 < float(packed["padding_fraction"]) < float(solo["padding_fraction"])


def test_chunked_attention_with_segments_equals_plain_and_never_crosses_segments():
  from qv_jax.model.attention import attend
  rng = np.random.default_rng(0)
  b, length, h, kv, hd = 2, 40, 4, 2, 8
  q, k, v = (jnp.asarray(rng.normal(size=(b, length, n, hd)), jnp.float32) for n in (h, kv, kv))
  segments = jnp.asarray(np.repeat([[0, 1, 2, -1], [0, 0, 1, 1]], [12, 9, 14, 5], axis=1)[:, :length])
  valid = segments >= 0
  slots = jnp.arange(length, dtype=jnp.int32)
  plain = attend(q, k, v, slots, valid, segment_ids=segments)
  chunked = attend(q, k, v, slots, valid, impl="chunked", chunk=16, segment_ids=segments)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(plain), rtol=1e-6, atol=1e-6)
  # Row 0's second segment alone gives the same outputs.
  alone = attend(q[:1, 12:21], k[:1, 12:21], v[:1, 12:21], jnp.arange(9, dtype=jnp.int32),
                 jnp.ones((1, 9), bool))
  np.testing.assert_allclose(np.asarray(plain[:1, 12:21]), np.asarray(alone), rtol=1e-6, atol=1e-6)

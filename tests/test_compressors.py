"""The compressor registry and its kinds: contract, static shapes, SCORE gating (top-K, split advantage,
100 % budget), XComp-style segment layout and question span, token compaction in the merged sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qv_jax.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from qv_jax.config import validate
from qv_jax.config.errors import ConfigError
from qv_jax.config.model import validate_model
from qv_jax.model.compressor import Compressor
from qv_jax.model.compressors.question_select import question_tokens, segment_layout
from qv_jax.model.compressors.registry import KINDS
from qv_jax.model.compressors.score_gating import budget_tokens, surprise, topk_mask
from qv_jax.model.quicksviewer import Quicksviewer
from qv_jax.train.score_rl import bernoulli_log_prob, pseudo_video, split_advantage
from qv_jax.train.synthetic_batches import SyntheticBatches
from test_train_util import tiny_config


def _config(kind, **compressor):
  c = tiny_config(1, batch_size=2)
  c.model.compressor.kind = kind
  for k, v in compressor.items():
    c.model.compressor[k] = v
  return c


def _model_and_batch(kind, seed=1, **compressor):
  c = validate(_config(kind, **compressor))
  model = Quicksviewer(c.model, max_seq_len=c.data.max_seq_len, rngs=nnx.Rngs(params=0))
  batch = {k: jnp.asarray(v) for k, v in next(SyntheticBatches(c, seed=seed)).items()}
  return model, batch


_prepare = nnx.jit(lambda m, batch, key: m.prepare_inputs(batch, key=key, noise_weight=1.0))


@nnx.jit
def _gate(m, batch):
  features = m.frame_features(batch["frames"])
  inputs = m.compressor_inputs(batch, features, key=None, noise_weight=0.0)
  return (features,) + m.compressor.gate(features, inputs.num_frames)


def _paths(model):
  return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      nnx.to_pure_dict(nnx.state(model.compressor, nnx.Param)))[0]}


def test_registry_builds_each_kind_with_the_cubing_param_tree():
  trees = {}
  for kind in KINDS:
    c = validate(_config(kind))
    model = nnx.eval_shape(lambda: Quicksviewer(c.model, max_seq_len=c.data.max_seq_len, rngs=nnx.Rngs(params=0)))
    assert type(model.compressor).__name__ == KINDS[kind].split(":")[1]
    trees[kind] = _paths(model)
  assert trees["uniform"] == trees["cubing"] == trees["question_select"]
  extra = trees["score_gating"] - trees["cubing"]
  assert extra and all(p.startswith("['policy']") for p in extra)
  assert trees["cubing"] < trees["score_gating"]


def test_unknown_kind_and_bad_fields_name_the_field():
  c = _config("pyramid")
  with pytest.raises(ConfigError, match="model.compressor.kind"):
    validate_model(c.model)
  c = _config("score_gating", keep_ratio=0.0)
  with pytest.raises(ConfigError, match="model.compressor.keep_ratio"):
    validate_model(c.model)
  c = _config("question_select", select_tokens="all")
  with pytest.raises(ConfigError, match="model.compressor.select_tokens"):
    validate_model(c.model)


@pytest.mark.slow
def test_cubing_default_is_the_plain_compressor_call():
  c = tiny_config(1, batch_size=2)
  del c.model.compressor["kind"]                        # a config written before the registry
  c = validate(c)
  model = Quicksviewer(c.model, max_seq_len=c.data.max_seq_len, rngs=nnx.Rngs(params=0))
  assert type(model.compressor) is Compressor
  batch = {k: jnp.asarray(v) for k, v in next(SyntheticBatches(c, seed=1)).items()}
  key = jax.random.key(4)

  @nnx.jit
  def both(m, batch, key):
    features = m.frame_features(batch["frames"])
    inputs = m.compressor_inputs(batch, features, key=key, noise_weight=0.7)
    direct = m.compressor.compress(features, inputs.num_frames, key, 0.7, batch["sample_id"])
    return m.compressor.encode(inputs), direct

  via_registry, direct = both(model, batch, key)
  for a, b in zip(jax.tree.leaves(via_registry), jax.tree.leaves(direct)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert via_registry.token_mask is None


def test_uniform_places_cubes_evenly():
  model, batch = _model_and_batch("uniform")
  _, cubes = _prepare(model, batch, jax.random.key(0))
  n = np.asarray(batch["num_frames"])
  for b in range(2):
    starts = np.flatnonzero(np.asarray(cubes.boundary[b]) > 0.5)
    k1 = len(starts)
    np.testing.assert_array_equal(starts, np.floor(np.arange(k1) * n[b] / k1).astype(int))


def test_topk_meets_the_budget_exactly():
  logits = jax.random.normal(jax.random.key(0), (3, 6, 4))
  valid = jnp.arange(6)[None, :, None] < jnp.array([6, 3, 1])[:, None, None]
  valid = jnp.broadcast_to(valid, logits.shape)
  keep = np.asarray(topk_mask(logits, valid, 5))
  np.testing.assert_array_equal(keep.reshape(3, -1).sum(1), [5, 5, 4])
  assert not (keep & ~np.asarray(valid)).any()
  flat, v = np.asarray(logits).reshape(3, -1), np.asarray(valid).reshape(3, -1)
  lowest_kept = np.where(keep.reshape(3, -1), flat, np.inf).min(1)
  highest_dropped = np.where(~keep.reshape(3, -1) & v, flat, -np.inf).max(1)
  assert (lowest_kept[:2] > highest_dropped[:2]).all()
  assert budget_tokens(16, 64, 0.1) == 102


def test_surprise_is_the_inter_frame_residual():
  x = jnp.arange(12, dtype=jnp.float32).reshape(1, 3, 2, 2) ** 2
  r = np.asarray(surprise(x))
  np.testing.assert_array_equal(r[0, 0], np.asarray(x[0, 0]))
  np.testing.assert_array_equal(r[0, 2], np.asarray(x[0, 2] - x[0, 1]))


def test_split_advantage_on_a_hand_worked_group():
  # one sample, 4 rollouts: Δ > 0 for rollouts 0, 1, 3 (safe), Δ ≤ 0 for rollout 2 (penalty)
  delta = jnp.array([[0.2], [0.1], [-0.3], [0.05]])
  sparsity = jnp.array([[0.5], [0.8], [0.9], [0.2]])
  adv = np.asarray(split_advantage(delta, sparsity))[:, 0]
  safe = np.array([0.5, 0.8, 0.2])
  mean, std = safe.mean(), safe.std()                   # 0.5, sqrt(0.06)
  np.testing.assert_allclose(adv[[0, 1, 3]], (safe - mean) / (std + 1e-6), rtol=1e-5)
  np.testing.assert_allclose(adv[[0, 1, 3]], [0.0, 0.3 / 0.0600 ** 0.5, -0.3 / 0.0600 ** 0.5], rtol=1e-4)
  np.testing.assert_allclose(adv[2], -0.9)
  # a lone safe rollout gets 0; all violating: minus their sparsity
  adv = np.asarray(split_advantage(jnp.array([[1.0], [-1.0]]), jnp.array([[0.7], [0.4]])))[:, 0]
  np.testing.assert_allclose(adv, [0.0, -0.4], atol=1e-6)


def test_bernoulli_log_prob_and_pseudo_video():
  logits = jnp.array([[[0.0, 2.0], [1.0, -1.0]]])
  keep = jnp.array([[[True, False], [True, True]]])
  valid = jnp.array([[[True, True], [False, False]]])
  expected = (np.log(0.5) + np.log(1 - 1 / (1 + np.exp(-2.0)))) / 2
  np.testing.assert_allclose(np.asarray(bernoulli_log_prob(logits, keep, valid)), [expected], rtol=1e-6)
  frames = jnp.arange(7)[None, :, None]
  np.testing.assert_array_equal(np.asarray(pseudo_video(frames, 3))[0, :, 0], [0, 0, 0, 3, 3, 3, 6])


@pytest.mark.slow
def test_one_compile_across_many_masks_and_gating_at_full_budget_equals_no_gating():
  model, batch = _model_and_batch("score_gating", keep_ratio=1.0)
  features, tokens, logits, valid = _gate(model, batch)

  traces = []

  @nnx.jit
  def hidden(m, keep):
    traces.append(1)
    out = m.compressor.output(tokens, logits, valid, keep)
    merged = m.assemble_inputs(batch, features, out)
    h, _ = m.decoder(inputs_embeds=merged.embeds, positions=merged.positions, mask=merged.mask,
                     return_hidden=True)
    return h, merged.mask.sum(1)

  topk = model.compressor.output(tokens, logits, valid, None).token_mask
  np.testing.assert_array_equal(np.asarray(topk), np.asarray(valid))       # 100 % budget keeps all
  h_all, n_all = hidden(model, valid)
  h_topk, _ = hidden(model, topk)
  np.testing.assert_array_equal(np.asarray(h_all), np.asarray(h_topk))
  lengths = [np.asarray(n_all)]
  for seed in range(3):
    keep = jax.random.bernoulli(jax.random.key(seed), 0.5, valid.shape) & valid
    lengths.append(np.asarray(hidden(model, keep)[1]))
  assert len(traces) == 1                                                  # one compile for 5 masks
  assert len({tuple(x) for x in lengths}) == 4                             # masks changed the lengths
  text = np.asarray(batch["token_valid"]).sum(1) - np.asarray(batch["num_frames"]) - 1
  q = model.compressor.settings.num_queries
  np.testing.assert_array_equal(lengths[0], text + np.asarray(batch["num_frames"]) * q)


def test_compaction_drops_masked_tokens_and_empty_frames():
  model, batch = _model_and_batch("score_gating", keep_ratio=1.0)
  features, tokens, logits, valid = _gate(model, batch)
  keep = np.zeros(valid.shape, bool)
  keep[0, 1, [0, 2]] = True                              # sample 0: tokens 0 and 2 of frame 1 only
  out = model.compressor.output(tokens, logits, valid, jnp.asarray(keep))
  merged = nnx.jit(lambda m, o: m.assemble_inputs(batch, features, o))(model, out)
  ids, frame = np.asarray(batch["input_ids"][0]), np.asarray(batch["token_frame"][0])
  n_text = int(np.asarray(batch["token_valid"][0]).sum())
  kept_text = [i for i in range(n_text) if ids[i] != IMAGE_TOKEN_INDEX and frame[i] in (-1, 1)]
  assert int(merged.length[0]) == len(kept_text) + 2
  emb = np.asarray(merged.embeds[0])
  text_embeds = np.asarray(model.decoder.embed(jnp.maximum(batch["input_ids"], 0)))[0]
  slot = 0
  for i in kept_text:
    np.testing.assert_array_equal(emb[slot], text_embeds[i])
    slot += 1
    if frame[i] == 1 and (i + 1 < n_text and ids[i + 1] == IMAGE_TOKEN_INDEX):
      np.testing.assert_allclose(emb[slot:slot + 2], np.asarray(tokens[0, 1, [0, 2]]), rtol=1e-6)
      slot += 2
  assert not np.asarray(merged.mask[0, slot:]).any()
  np.testing.assert_array_equal(np.asarray(merged.positions[0, :slot]), np.arange(slot))


def test_segment_layout_on_a_hand_worked_example():
  # F = 5 frames (4 valid), segments of 2, a question of 2 slots (1 valid): 3 segments [f f | q q]
  index, mask, positions = segment_layout(jnp.array([[True, True, True, True, False]]),
                                          jnp.array([[True, False]]), 2)
  np.testing.assert_array_equal(np.asarray(index[0]), [[0, 1, -1, -1], [2, 3, -1, -1], [-1, -1, -1, -1]])
  np.testing.assert_array_equal(np.asarray(mask[0]), [[1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 1, 0]])
  np.testing.assert_array_equal(np.asarray(positions[0]), [[0, 1, 2, 0], [0, 1, 2, 0], [0, 0, 0, 0]])


def test_question_tokens_take_the_prompt_after_the_video():
  p = IMAGE_TOKEN_INDEX
  ids = jnp.array([[1, p, 5, p, 7, 8, 9, 20, 21, 0]])
  frame = jnp.array([[-1, -1, 0, 0, -1, -1, -1, -1, -1, -1]])
  labels = jnp.array([[IGNORE_INDEX] * 7 + [20, 21, IGNORE_INDEX]])
  valid = jnp.array([[True] * 9 + [False]])
  batch = dict(input_ids=ids, token_frame=frame, labels=labels, token_valid=valid)
  q, qv = question_tokens(batch, 2)
  np.testing.assert_array_equal(np.asarray(q[0]), [8, 9])
  q, qv = question_tokens(batch, 5)
  np.testing.assert_array_equal(np.asarray(q[0])[np.asarray(qv[0])], [7, 8, 9])
  np.testing.assert_array_equal(np.asarray(qv[0]), [1, 1, 1, 0, 0])


@pytest.mark.slow
@pytest.mark.parametrize("tokens", ["pooled", "cubes"])
def test_question_select_keeps_top_m_frames(tokens):
  model, batch = _model_and_batch("question_select", select_frames=3, segment_frames=4, select_tokens=tokens)
  merged, out = _prepare(model, batch, None)
  scores = np.asarray(out.diagnostics["frame_scores"])
  kept = np.asarray(out.diagnostics["kept_frames"])
  n = np.asarray(batch["num_frames"])
  for b in range(2):
    assert kept[b].sum() == min(3, n[b]) and not kept[b, n[b]:].any()
    assert scores[b][kept[b]].min() >= scores[b, :n[b]][~kept[b, :n[b]]].max()
  if tokens == "pooled":
    assert out.cube_tokens.shape[1:3] == (3, 1)
    np.testing.assert_array_equal(np.asarray(out.boundary) > 0.5, kept)
  else:
    cube_of_kept = [set(np.asarray(out.cube_ids[b])[kept[b]]) for b in range(2)]
    for b in range(2):
      assert set(np.flatnonzero(np.asarray(out.cube_mask[b]))) == cube_of_kept[b]
  assert np.isfinite(np.asarray(merged.embeds)).all()

"""KV-cache generation: greedy parity with transformers' `generate`, EOS handling, padded and embedded
prompts, repetition penalty and the sampling filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from qv_jax.model.generate import filter_logits, generate, sample_logits
from test_decoder_hf_util import hf_config, hf_model, save_and_convert

V, PAD, NEW = 97, 0, 10


@pytest.fixture(scope="module", params=["qwen2", "llama3"])
def pair(request, tmp_path_factory):
  kw = dict(kv_heads=1) if request.param == "qwen2" else dict(kv_heads=2, scaling=True, tie=True)
  model = hf_model(hf_config(request.param, **kw), seed=7)
  decoder, _ = save_and_convert(model, tmp_path_factory.mktemp(request.param))
  return model, decoder


def _left_padded_prompts(seed=0):
  ids = np.random.RandomState(seed).randint(1, V, (3, 7)).astype(np.int32)
  mask = np.ones((3, 7), bool)
  mask[1, :2] = False
  mask[2, :4] = False
  return np.where(mask, ids, PAD), mask


def _hf_generate(model, ids, mask, eos, **kw):
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=NEW,
                         do_sample=False, pad_token_id=PAD, eos_token_id=eos, **kw)
  new = out[:, ids.shape[1]:].numpy()
  return np.pad(new, ((0, 0), (0, NEW - new.shape[1])), constant_values=PAD)   # HF stops when all are done


def _ours(decoder, ids, mask, eos, **kw):
  return np.asarray(generate(decoder, input_ids=jnp.asarray(ids), mask=jnp.asarray(mask), max_new_tokens=NEW,
                             eos_id=eos, pad_id=PAD, **kw))


def test_greedy_matches_transformers_token_for_token(pair):
  model, decoder = pair
  ids, mask = _left_padded_prompts()
  free = _ours(decoder, ids, mask, None)
  np.testing.assert_array_equal(free, _hf_generate(model, ids, mask, None))
  assert len(set(free[:, 0])) > 1 or len(set(free[0])) > 1      # not a degenerate constant model
  # An EOS that sequence 0 emits at step 3 (and not before): it stops there and pads after.
  eos = int(free[0, 3])
  first = [np.flatnonzero(row == eos) for row in free]
  assert first[0][0] == 3
  got = _ours(decoder, ids, mask, [eos, V - 1])
  np.testing.assert_array_equal(got, _hf_generate(model, ids, mask, [eos, V - 1]))
  np.testing.assert_array_equal(got[0, :4], free[0, :4])
  assert (got[0, 4:] == PAD).all()
  for row, hits, free_row in zip(got, first, free):
    stop = hits[0] + 1 if len(hits) else NEW
    np.testing.assert_array_equal(row[:stop], free_row[:stop])


def test_repetition_penalty_matches_transformers(pair):
  model, decoder = pair
  ids, mask = _left_padded_prompts(seed=1)
  got = _ours(decoder, ids, mask, None, repetition_penalty=1.8)
  np.testing.assert_array_equal(got, _hf_generate(model, ids, mask, None, repetition_penalty=1.8))
  assert (got != _ours(decoder, ids, mask, None)).any()


def test_embedded_prompt_equals_id_prompt(pair):
  _, decoder = pair
  ids, mask = _left_padded_prompts(seed=2)
  embeds = decoder.embed(jnp.asarray(ids))
  by_embeds = generate(decoder, inputs_embeds=embeds, mask=jnp.asarray(mask), max_new_tokens=NEW, eos_id=None,
                       pad_id=PAD)
  np.testing.assert_array_equal(np.asarray(by_embeds), _ours(decoder, ids, mask, None))


def test_padding_anywhere_in_the_prompt_changes_nothing(pair):
  _, decoder = pair
  rng = np.random.RandomState(3)
  prompts = rng.randint(1, V, (2, 4)).astype(np.int32)
  singles = _ours(decoder, prompts, np.ones((2, 4), bool), None)
  layout = np.array([[1, 0, 1, 1, 0, 1, 0, 0], [0, 1, 1, 0, 1, 0, 0, 1]], bool)   # middle and right padding
  ids = np.full(layout.shape, PAD, np.int32)
  for b, p in enumerate(prompts):
    ids[b, layout[b]] = p
  np.testing.assert_array_equal(_ours(decoder, ids, layout, None), singles)


def test_all_sequences_finished_stops_and_pads(pair):
  _, decoder = pair
  ids, mask = _left_padded_prompts(seed=4)
  firsts = _ours(decoder, ids, mask, None)[:, 0]
  got = _ours(decoder, ids, mask, [int(t) for t in firsts])
  np.testing.assert_array_equal(got[:, 0], firsts)
  assert (got[:, 1:] == PAD).all()


def test_sampling_is_keyed_and_top_k_one_is_greedy(pair):
  _, decoder = pair
  ids, mask = _left_padded_prompts(seed=5)
  greedy = _ours(decoder, ids, mask, None)
  key = jax.random.key(11)
  np.testing.assert_array_equal(_ours(decoder, ids, mask, None, temperature=0.7, top_k=1, key=key), greedy)
  a = _ours(decoder, ids, mask, None, temperature=2.0, key=key)
  np.testing.assert_array_equal(a, _ours(decoder, ids, mask, None, temperature=2.0, key=key))
  b = _ours(decoder, ids, mask, None, temperature=2.0, key=jax.random.key(12))
  assert (a != b).any() and (a != greedy).any()
  assert ((0 <= a) & (a < V)).all()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 3, 1.0), (0.7, 0, 0.6), (1.3, 5, 0.8),
                                                     (1.0, 0, 0.05)])
def test_filters_match_transformers_warpers(temperature, top_k, top_p):
  logits = np.random.RandomState(0).standard_normal((4, 50)).astype(np.float32) * 3
  scores = torch.tensor(logits)
  for warper in ([TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else []) +
                 ([TopPLogitsWarper(top_p)] if top_p < 1 else [])):
    scores = warper(None, scores)
  ref = scores.numpy()
  got = np.asarray(filter_logits(jnp.asarray(logits), temperature=temperature, top_k=top_k, top_p=top_p))
  np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
  np.testing.assert_allclose(got[~np.isinf(got)], ref[~np.isinf(ref)], rtol=1e-6)
  assert (~np.isinf(got)).sum(-1).min() >= 1 and np.isinf(got).any()


def test_samples_follow_the_filtered_distribution():
  logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]]))
  n = 20000
  keys = jax.random.split(jax.random.key(0), n)

  def freq(**kw):
    samples = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, **kw)[0])(keys))
    return np.bincount(samples, minlength=4) / n

  np.testing.assert_allclose(freq(), [0.4, 0.3, 0.2, 0.1], atol=0.015)
  cold = np.array([0.4, 0.3, 0.2, 0.1]) ** 2
  np.testing.assert_allclose(freq(temperature=0.5), cold / cold.sum(), atol=0.015)
  np.testing.assert_allclose(freq(top_p=0.5), [0.4 / 0.7, 0.3 / 0.7, 0, 0], atol=0.015)
  np.testing.assert_allclose(freq(top_k=3), [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0], atol=0.015)


def test_bad_arguments_are_refused(pair):
  _, decoder = pair
  ids = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="key"):
    generate(decoder, input_ids=ids, max_new_tokens=2, eos_id=None, pad_id=PAD, temperature=1.0)
  with pytest.raises(ValueError, match="exactly one"):
    generate(decoder, input_ids=ids, inputs_embeds=decoder.embed(ids), max_new_tokens=2, eos_id=None,
             pad_id=PAD)
  with pytest.raises(ValueError, match="mask"):
    generate(decoder, input_ids=ids, mask=jnp.ones((1, 3), bool), max_new_tokens=2, eos_id=None, pad_id=PAD)
  with pytest.raises(ValueError, match="top_p"):
    generate(decoder, input_ids=ids, max_new_tokens=2, eos_id=None, pad_id=PAD, top_p=0.0)

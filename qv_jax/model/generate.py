"""Autoregressive generation with the decoder's static-shape KV cache.

One jitted program: prefill the prompt (ids, or the multimodal prompt as embeddings) into a cache of
P + max_new_tokens - 1 slots, then a `lax.while_loop` that feeds one token per step at the next slot
(dynamic_update_slice) until every sequence has emitted an EOS or `max_new_tokens` are out. Greedy, or
temperature / top-k / top-p sampling with an explicit key (step s uses fold_in(key, s)), plus HF's
repetition penalty. Prompts may be padded anywhere (mask False): each sequence continues from its own last
valid token and position, so padding changes nothing.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def filter_logits(logits: jax.Array, *, temperature: float | jax.Array = 1.0, top_k: int = 0,
                  top_p: float | jax.Array = 1.0, use_top_p: bool | None = None) -> jax.Array:
  """HF's warpers in HF's order on logits [B, V] (fp32): divide by temperature, keep the top_k largest
  (0: all), keep the smallest set of largest-probability tokens whose mass reaches top_p (at least one).
  Removed tokens get -inf. `use_top_p` (static) defaults to top_p < 1 when top_p is a Python float."""
  logits = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if use_top_p if use_top_p is not None else float(top_p) < 1.0:
    ordered = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < jnp.asarray(top_p, jnp.float32)).at[..., 0].set(True)
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float | jax.Array = 1.0, top_k: int = 0,
                  top_p: float | jax.Array = 1.0, use_top_p: bool | None = None) -> jax.Array:
  """Samples ids [B] int32 from logits [B, V] after `filter_logits`."""
  logits = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, use_top_p=use_top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _penalize(logits, seen, penalty):
  """HF RepetitionPenaltyLogitsProcessor on tokens already in the sequence."""
  return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


@flax.struct.dataclass
class DecodeState:
  """The loop carry between `prefill` and `decode` (all device arrays)."""
  step: jax.Array           # int32: tokens emitted so far (out[:, :step] is written)
  out: jax.Array            # [B, max_new_tokens] int32 (pad after a sequence finished)
  cache: Any                # KVCache of P + max_new_tokens - 1 slots
  token: jax.Array          # [B] int32 last emitted token
  finished: jax.Array       # [B] bool
  seen: Any                 # [B, V] bool tokens seen (repetition penalty) or None
  next_position: jax.Array  # [B] int32 RoPE position of the first generated token


@flax.struct.dataclass
class Sampling:
  """Traced sampling settings (their values never recompile)."""
  eos: jax.Array            # [E] int32
  pad_id: jax.Array
  temperature: jax.Array
  top_p: jax.Array
  repetition_penalty: jax.Array
  key: jax.Array


def _select(decoder, logits, step, seen, s: Sampling, greedy, top_k, use_top_p, penalize):
  if penalize:
    logits = _penalize(logits, seen, s.repetition_penalty)
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return sample_logits(logits, jax.random.fold_in(s.key, step), temperature=s.temperature, top_k=top_k,
                       top_p=s.top_p, use_top_p=use_top_p)


def _mark(seen, tok):
  return None if seen is None else seen.at[jnp.arange(tok.shape[0]), tok].set(True)


def prefill_step(decoder, layer_params, input_ids, inputs_embeds, mask, positions, s: Sampling, *,
                 max_new_tokens, greedy, top_k, use_top_p, penalize, cache_dtype) -> DecodeState:
  """The prompt into a fresh cache of P + max_new_tokens - 1 slots and the first token: the Generator's
  prefill (and, after the model's `prepare_inputs`, the planner's `--step prefill`)."""
  batch, prompt_len = mask.shape
  if positions is None:
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
  slots = jnp.arange(prompt_len, dtype=jnp.int32)
  last_slot = jnp.max(jnp.where(mask, slots, 0), axis=1)
  next_position = jnp.max(jnp.where(mask, positions, -1), axis=1) + 1

  seen = None
  if penalize:
    seen = jnp.zeros((batch, decoder.vocab_size), bool)
    if input_ids is not None:
      rows = jnp.broadcast_to(jnp.arange(batch)[:, None], input_ids.shape)
      real = mask & (input_ids >= 0) & (input_ids < decoder.vocab_size)
      seen = seen.at[rows, jnp.where(real, input_ids, decoder.vocab_size)].set(True, mode="drop")

  cache = decoder.init_cache(batch, prompt_len + max_new_tokens - 1, cache_dtype)
  hidden, cache = decoder(input_ids=input_ids, inputs_embeds=inputs_embeds, positions=positions, mask=mask,
                          cache=cache, return_hidden=True, layer_params=layer_params)
  last = jnp.take_along_axis(hidden, last_slot[:, None, None], axis=1)
  logits = decoder.logits_from_hidden(last)[:, 0]
  tok = _select(decoder, logits, 0, seen, s, greedy, top_k, use_top_p, penalize)
  out = jnp.full((batch, max_new_tokens), s.pad_id, jnp.int32).at[:, 0].set(tok)
  return DecodeState(step=jnp.int32(1), out=out, cache=cache, token=tok, finished=jnp.isin(tok, s.eos),
                     seen=_mark(seen, tok), next_position=next_position)


def decode_step(decoder, layer_params, st: DecodeState, s: Sampling, *, greedy, top_k, use_top_p,
                penalize) -> DecodeState:
  """One token per sequence against the cache: the body of the Generator's decode loop (and the planner's
  `--step decode`). A finished sequence emits `pad_id`."""
  batch = st.token.shape[0]
  logits, cache = decoder(input_ids=st.token[:, None], positions=(st.next_position + st.step - 1)[:, None],
                          mask=jnp.ones((batch, 1), bool), cache=st.cache, layer_params=layer_params)
  new = jnp.where(st.finished, s.pad_id,
                  _select(decoder, logits[:, 0], st.step, st.seen, s, greedy, top_k, use_top_p, penalize))
  out = jax.lax.dynamic_update_slice(st.out, new[:, None], (0, st.step))
  return st.replace(step=st.step + 1, out=out, cache=cache, token=new,
                    finished=st.finished | jnp.isin(new, s.eos), seen=_mark(st.seen, new))


def _decode_impl(decoder, layer_params, state: DecodeState, until, s: Sampling, *, greedy, top_k, use_top_p,
                 penalize) -> DecodeState:
  max_new_tokens = state.out.shape[1]
  until = jnp.minimum(until, max_new_tokens)

  def cond(st):
    return (st.step < until) & ~jnp.all(st.finished)

  def body(st):
    return decode_step(decoder, layer_params, st, s, greedy=greedy, top_k=top_k, use_top_p=use_top_p,
                       penalize=penalize)

  return jax.lax.while_loop(cond, body, state)


_STATIC = ("graphdef", "greedy", "top_k", "use_top_p", "penalize")


@partial(jax.jit, static_argnames=_STATIC + ("max_new_tokens", "cache_dtype"))
def _prefill(state, layer_params, input_ids, inputs_embeds, mask, positions, sampling, *, graphdef, max_new_tokens,
             greedy, top_k, use_top_p, penalize, cache_dtype):
  return prefill_step(nnx.merge(graphdef, state), layer_params, input_ids, inputs_embeds, mask, positions, sampling,
                      max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k, use_top_p=use_top_p,
                      penalize=penalize, cache_dtype=cache_dtype)


@partial(jax.jit, static_argnames=_STATIC, donate_argnames=("decode_state",))
def _decode(state, layer_params, decode_state, until, sampling, *, graphdef, greedy, top_k, use_top_p, penalize):
  return _decode_impl(nnx.merge(graphdef, state), layer_params, decode_state, until, sampling, greedy=greedy,
                      top_k=top_k, use_top_p=use_top_p, penalize=penalize)


@partial(jax.jit, static_argnames=_STATIC + ("max_new_tokens", "cache_dtype"))
def _generate(state, input_ids, inputs_embeds, mask, positions, sampling, *, graphdef, max_new_tokens, greedy,
              top_k, use_top_p, penalize, cache_dtype):
  decoder = nnx.merge(graphdef, state)
  flags = dict(greedy=greedy, top_k=top_k, use_top_p=use_top_p, penalize=penalize)
  st = prefill_step(decoder, None, input_ids, inputs_embeds, mask, positions, sampling,
                    max_new_tokens=max_new_tokens, cache_dtype=cache_dtype, **flags)
  return _decode_impl(decoder, None, st, jnp.int32(max_new_tokens), sampling, **flags).out


class Generator:
  """Prefill and decode as two jitted calls, for timing them apart and for streaming: `start(...)` prefills
  and returns the `DecodeState` holding the first token; `advance(st, until)` decodes up to `until` tokens
  in total (or until every sequence finished). Both compile once per prompt shape / settings; `until`
  is traced. Arguments as `generate`'s; `layer_params`: the per-layer params of `split_layers(decoder)`
  (the decoder passed is then the split one), run unrolled."""

  def __init__(self, decoder, *, max_new_tokens: int, eos_id, pad_id: int, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
               key: jax.Array | None = None, cache_dtype: Any = None, layer_params=None):
    self.graphdef, self.state = nnx.split(decoder)
    self.layer_params = layer_params
    self.max_new_tokens = int(max_new_tokens)
    self.sampling, self.flags = sampling_settings(max_new_tokens, eos_id, pad_id, temperature, top_p, top_k,
                                                  repetition_penalty, key)
    self.cache_dtype = None if cache_dtype is None else jnp.dtype(cache_dtype).name

  def start(self, *, input_ids=None, inputs_embeds=None, mask=None, positions=None) -> DecodeState:
    input_ids, inputs_embeds, mask, positions = _prompt(input_ids, inputs_embeds, mask, positions)
    return _prefill(self.state, self.layer_params, input_ids, inputs_embeds, mask, positions, self.sampling,
                    graphdef=self.graphdef, max_new_tokens=self.max_new_tokens, cache_dtype=self.cache_dtype,
                    **self.flags)

  def advance(self, decode_state: DecodeState, until: int | None = None) -> DecodeState:
    until = self.max_new_tokens if until is None else int(until)
    return _decode(self.state, self.layer_params, decode_state, jnp.int32(until), self.sampling, graphdef=self.graphdef,
                   **self.flags)


def sampling_settings(max_new_tokens, eos_id, pad_id, temperature, top_p, top_k, repetition_penalty, key):
  """-> (Sampling, the static flags of `prefill_step` / `decode_step`), checked."""
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or repetition_penalty <= 0:
    raise ValueError(f"generate: bad sampling settings temperature={temperature} (>= 0), top_p={top_p} "
                     f"(in (0, 1]), top_k={top_k} (>= 0), repetition_penalty={repetition_penalty} (> 0)")
  greedy = temperature == 0.0
  if not greedy and key is None:
    raise ValueError("generate: sampling (temperature > 0) needs an explicit `key`")
  eos_ids = [] if eos_id is None else ([int(eos_id)] if isinstance(eos_id, (int, np.integer)) else
                                       [int(e) for e in eos_id])
  sampling = Sampling(eos=jnp.asarray(eos_ids or [-1], jnp.int32), pad_id=jnp.int32(pad_id),
                      temperature=jnp.float32(temperature if not greedy else 1.0), top_p=jnp.float32(top_p),
                      repetition_penalty=jnp.float32(repetition_penalty),
                      key=key if key is not None else jax.random.key(0))
  flags = dict(greedy=greedy, top_k=int(top_k), use_top_p=top_p < 1.0, penalize=repetition_penalty != 1.0)
  return sampling, flags


def _prompt(input_ids, inputs_embeds, mask, positions):
  if (input_ids is None) == (inputs_embeds is None):
    raise ValueError("generate: pass exactly one of input_ids and inputs_embeds")
  prompt = input_ids if input_ids is not None else inputs_embeds
  shape = tuple(prompt.shape[:2])
  mask = jnp.ones(shape, bool) if mask is None else jnp.asarray(mask, bool)
  if mask.shape != shape:
    raise ValueError(f"generate: mask {mask.shape} does not match the prompt's [B, P] = {shape}")
  positions = None if positions is None else jnp.asarray(positions, jnp.int32)
  return input_ids, inputs_embeds, mask, positions


def generate(decoder, *, input_ids: jax.Array | None = None, inputs_embeds: jax.Array | None = None,
             mask: jax.Array | None = None, positions: jax.Array | None = None, max_new_tokens: int,
             eos_id: int | Sequence[int] | None, pad_id: int, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, repetition_penalty: float = 1.0, key: jax.Array | None = None,
             cache_dtype: Any = None) -> jax.Array:
  """Generates tokens [B, max_new_tokens] int32 after the prompt.

  Prompt: input_ids [B, P] or inputs_embeds [B, P, D], with mask [B, P] (False: padding slot; default all
  True) and positions [B, P] (default: 0, 1, ... over each sequence's valid slots). temperature 0 is
  greedy; otherwise `key` is required. A sequence stops after emitting any of `eos_id` (one id or
  several, e.g. Llama 3's <|eot_id|> and <|end_of_text|>) and emits `pad_id` afterwards. Compile-time
  constants: the prompt shape, max_new_tokens, greedy or not, top_k, whether top_p < 1, whether a
  repetition penalty is used and the number of eos ids (their values, temperature, top_p, pad are not).
  """
  input_ids, inputs_embeds, mask, positions = _prompt(input_ids, inputs_embeds, mask, positions)
  sampling, flags = sampling_settings(max_new_tokens, eos_id, pad_id, temperature, top_p, top_k,
                                      repetition_penalty, key)
  graphdef, state = nnx.split(decoder)
  return _generate(state, input_ids, inputs_embeds, mask, positions, sampling, graphdef=graphdef,
                   max_new_tokens=int(max_new_tokens),
                   cache_dtype=None if cache_dtype is None else jnp.dtype(cache_dtype).name, **flags)

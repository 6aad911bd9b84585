"""Token-level masks in the merged sequence: a plan over the full expansion, then the dropped visual tokens
removed, so kept tokens sit contiguously at positions 0..n-1 (as if the dropped ones never existed) and
the decoder length S is spent on kept tokens only."""

from __future__ import annotations

import jax.numpy as jnp

from qv_jax.model.assembly import SequencePlan


def compact_plan(plan: SequencePlan, token_mask, *, cube_base: int, max_seq_len: int) -> SequencePlan:
  """plan over the full expansion [B, S_full]; token_mask [B, K, Q] (cube slots start at bank index
  `cube_base` = L + T) -> the plan over [B, max_seq_len] without the dropped cube tokens."""
  b = token_mask.shape[0]
  flat = token_mask.reshape(b, -1)
  rel = plan.source - cube_base
  in_cubes = (rel >= 0) & (rel < flat.shape[1]) & ~plan.is_text
  kept = jnp.take_along_axis(flat, jnp.clip(rel, 0, flat.shape[1] - 1), axis=1)
  valid = plan.mask & (~in_cubes | kept)
  order = jnp.argsort(~valid, axis=1, stable=True)
  pad = max(0, max_seq_len - order.shape[1])
  order = jnp.pad(order, ((0, 0), (0, pad)))[:, :max_seq_len]
  count = valid.sum(1).astype(jnp.int32)
  slots = jnp.arange(max_seq_len, dtype=jnp.int32)
  mask = slots[None, :] < count[:, None]
  take = lambda x: jnp.where(mask, jnp.take_along_axis(x, order, axis=1), 0)
  return SequencePlan(source=take(plan.source).astype(jnp.int32), is_text=take(plan.is_text).astype(bool),
                      text_index=take(plan.text_index).astype(jnp.int32), mask=mask,
                      positions=jnp.where(mask, slots[None, :], 0), length=count, kind=plan.kind,
                      segment_ids=jnp.where(mask, take(plan.segment_ids), -1).astype(jnp.int32))

"""Causal ring attention over the `context` axis, with the zig-zag layout that balances causal work.

A sequence of L slots is cut into 2C chunks of n = L / (2C); chip i holds chunks i and 2C-1-i (its
"zig-zag" block of L / C slots). Each chip keeps its query block and passes K/V blocks (with their key
validity and segment ids) around the ring with `lax.ppermute`, combining them by online softmax (fp32
max, sum and weighted value sum). At ring step s chip i holds the K/V of chip j = i - s (mod C):

  s = 0    its own block: chunk i sees itself (causal), chunk 2C-1-i sees chunk i whole and itself (causal);
  j < i    both query chunks see key chunk j whole, key chunk 2C-1-j not at all;
  j > i    only query chunk 2C-1-i sees anything: both of j's key chunks, whole.

So every off-diagonal step is two [n x n] score blocks on every chip (half of the full block, no causal
mask needed), the diagonal three: the work is the same on all chips, about half of the all-gather's
L/C x L scores. Score tensors are [B, H, n, n] fp32. Masks otherwise follow `qv_jax.model.attention`:
a key is seen only if valid (and of the query's segment for packed rows); a query that sees no key at
all (padding) gets the uniform average of all L values, as the single-device softmax over fully masked
scores gives. `allgather_attention` (below) is the same attention by K/V all-gathered once.

The C-1 ring steps are a `lax.scan`. The backward is JAX's autodiff of the shard_map (ppermute transposes
to the reverse ring), each step under `jax.checkpoint`: the backward keeps per step only that step's
inputs (the running fp32 output and statistics and the K/V block) and recomputes its scores, so one
step's scores are live at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from qv_jax.parallel.context import AXIS, context_size
from qv_jax.sharding import KV_AXES, QUERY_AXES, SLOT_AXES, logical_to_pspec

_MASKED = float(np.finfo(np.float32).min)


def uses_ring(mode: str, cache, length: int) -> bool:
  """Whether attention over `length` slots runs as a ring: no KV cache, a context axis of size C > 1 and
  `mode` "ring", or "auto" with `length` a multiple of 2C (else the all-gather)."""
  c = context_size()
  if cache is not None or c <= 1:
    return False
  return mode == "ring" or (mode == "auto" and length % (2 * c) == 0)


def zigzag_order(length: int, context: int) -> np.ndarray:
  """The natural slots in zig-zag order [L]: chip i's L / C slots are chunks i and 2C-1-i."""
  n = length // (2 * context)
  chunks = [c for i in range(context) for c in (i, 2 * context - 1 - i)]
  return np.concatenate([np.arange(c * n, (c + 1) * n) for c in chunks])


def check_length(length: int, context: int) -> None:
  """One line unless `length` splits into 2 × context equal chunks."""
  if length % (2 * context):
    raise ValueError(f"model.decoder.context_attention='ring': sequence length {length} is not divisible by "
                     f"2 x context = {2 * context} (zig-zag chunks); pad data.max_seq_len to a multiple")


def _owner(chunk: int, c: int) -> tuple[int, int]:
  """(chip, half) holding natural chunk `chunk` in the zig-zag layout."""
  return (chunk, 0) if chunk < c else (2 * c - 1 - chunk, 1)


def _spec(axes, shape):
  mesh = jax.sharding.get_abstract_mesh()
  spec = list(logical_to_pspec(axes, None, mesh, shape))
  spec += [None] * (len(shape) - len(spec))
  spec[1] = AXIS
  return P(*spec)


def _relayout(x, axes, to_zigzag: bool):
  c = context_size()
  if c <= 1:
    return x
  check_length(x.shape[1], c)
  if to_zigzag:    # chip i sends natural chunk 2i+h to its zig-zag owner
    perms = [[(i, _owner(2 * i + h, c)[0]) for i in range(c)] for h in (0, 1)]
  else:            # chip j sends its even chunk to half 0, its odd chunk to half 1 of chip chunk // 2
    chunks = [(j, 2 * c - 1 - j) for j in range(c)]
    perms = [[(j, [k for k in chunks[j] if k % 2 == h][0] // 2) for j in range(c)] for h in (0, 1)]

  def local(x):
    n = x.shape[1] // 2
    halves = (x[:, :n], x[:, n:])
    me = jax.lax.axis_index(AXIS)
    if to_zigzag:
      even, odd = (jax.lax.ppermute(h, AXIS, p) for h, p in zip(halves, perms))
      first_even = (me % 2) == 0                     # chip j's first chunk j is even iff j is
      return jnp.where(first_even, jnp.concatenate([even, odd], 1), jnp.concatenate([odd, even], 1))
    first_even = (me % 2) == 0
    even = jnp.where(first_even, halves[0], halves[1])
    odd = jnp.where(first_even, halves[1], halves[0])
    return jnp.concatenate([jax.lax.ppermute(even, AXIS, perms[0]), jax.lax.ppermute(odd, AXIS, perms[1])], 1)

  spec = _spec(axes, x.shape)
  return jax.shard_map(local, in_specs=spec, out_specs=spec)(x)


def to_zigzag(x: jax.Array, axes) -> jax.Array:
  """x [B, L, ...] split over context along L (natural order) -> the zig-zag layout, same sharding.
  axes: x's logical names (for its other dimensions' sharding). A no-op without a context axis."""
  return _relayout(x, axes, True)


def from_zigzag(x: jax.Array, axes) -> jax.Array:
  """The inverse of `to_zigzag`."""
  return _relayout(x, axes, False)


def _update(state, q, k, v, visible, scale):
  """One online-softmax step. state (acc [B, c, KV, G, hd] fp32, m, l [B, KV, G, c] fp32);
  q [B, c, KV, G, hd]; k, v [B, s, KV, hd]; visible broadcastable to [B, KV, G, c, s]."""
  acc, m, l = state
  scores = jnp.einsum("bckgd,bskd->bkgcs", q, k, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(visible, scores, _MASKED)
  m_new = jnp.maximum(m, scores.max(-1))
  corr = jnp.exp(m - m_new)
  p = jnp.exp(scores - m_new[..., None])
  l = l * corr + p.sum(-1)
  pv = jnp.einsum("bkgcs,bskd->bckgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  acc = acc * jnp.moveaxis(corr, -1, 1)[..., None] + pv
  return acc, m_new, l


def _mask(k_valid, q_segment, k_segment, causal=None):
  """[B, 1, 1, c, s] from k_valid [B, s], segments [B, c] / [B, s] (or None), causal [c, s]."""
  visible = k_valid[:, None, :]
  if q_segment is not None:
    visible = visible & (q_segment[:, :, None] == k_segment[:, None, :])
  if causal is not None:
    visible = visible & causal[None]
  return visible[:, None, None]


def _select(pred, a, b):
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def _local_ring(q, k, v, k_valid, segments, *, c, length):
  """One chip's zig-zag block: q [B, 2n, H, hd] (chunks me, 2C-1-me); k, v [B, 2n, KV, hd]; k_valid,
  segments [B, 2n]. Every ring step is two [n x n] score blocks on every chip, whichever side of the
  diagonal its K/V come from (inputs chosen by `where`, no branches)."""
  b, lq, h, hd = q.shape
  kvh = k.shape[2]
  g = h // kvh
  n = lq // 2
  scale = 1.0 / float(np.sqrt(hd))
  me = jax.lax.axis_index(AXIS)
  qg = q.reshape(b, lq, kvh, g, hd)
  q1, q2 = qg[:, :n], qg[:, n:]
  has_seg = segments is not None
  seg = segments if has_seg else k_valid.astype(jnp.int32) * 0     # (device-varying, like the blocks)
  seg1, seg2 = (seg[:, :n], seg[:, n:]) if has_seg else (None, None)

  def empty():
    return (jnp.zeros((b, n, kvh, g, hd), jnp.float32), jnp.full((b, kvh, g, n), _MASKED, jnp.float32),
            jnp.zeros((b, kvh, g, n), jnp.float32))

  def halves(block):
    return tuple(x[:, :n] for x in block), tuple(x[:, n:] for x in block)

  def attend(state, q, q_seg, kv, causal=None):
    k, v, valid, kseg = kv
    return _update(state, q, k, v, _mask(valid, q_seg, kseg if has_seg else None, causal), scale)

  @jax.checkpoint
  def diagonal(block):
    first, second = halves(block)
    tri = jnp.arange(n)[None, :] <= jnp.arange(n)[:, None]
    s1 = attend(empty(), q1, seg1, first, tri)
    s2 = attend(attend(empty(), q2, seg2, first), q2, seg2, second, tri)
    return s1, s2

  ring = [(i, (i + 1) % c) for i in range(c)]

  @jax.checkpoint
  def step(carry, s):
    # src < me: both query chunks see key chunk src; src > me: query chunk 2C-1-me sees both key chunks
    (s1, s2), block = carry
    block = jax.lax.ppermute(block, AXIS, ring)
    earlier = (me - s) % c < me
    first, second = halves(block)
    s2 = attend(s2, q2, seg2, first)
    rows = _select(earlier, s1, s2)
    rows = attend(rows, jnp.where(earlier, q1, q2), None if seg1 is None else jnp.where(earlier, seg1, seg2),
                  _select(earlier, first, second))
    return ((_select(earlier, rows, s1), _select(earlier, s2, rows)), block), None

  block = (k, v, k_valid, seg)
  states = diagonal(block)
  if c > 1:
    (states, _), _ = jax.lax.scan(step, (states, block), jnp.arange(1, c, dtype=jnp.int32))
  acc, m, l = (jnp.concatenate(parts, axis) for parts, axis in zip(zip(*states), (1, -1, -1)))
  dead = jnp.moveaxis(m == _MASKED, -1, 1)[..., None]                                # [B, lq, KV, G, 1]
  mean = jax.lax.psum(v.astype(jnp.float32).sum(1), AXIS) / length                  # [B, KV, hd]
  out = jnp.where(dead, mean[:, None, :, None, :], acc / jnp.moveaxis(l, -1, 1)[..., None])
  return out.reshape(b, lq, h, hd).astype(q.dtype)


def _head_specs(q, k):
  """Heads split the same way for q and k/v (so local GQA groups line up), else not at all."""
  qs, ks = _spec(QUERY_AXES, q.shape), _spec(KV_AXES, k.shape)
  if qs[2] != ks[2]:
    qs, ks = P(qs[0], AXIS, None, None), P(ks[0], AXIS, None, None)
  return qs, ks


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_valid: jax.Array,
                   segment_ids: jax.Array | None = None, *, zigzag: bool = False) -> jax.Array:
  """Causal grouped-query self-attention of L slots split over `context` (no KV cache), by a ring.

  q [B, L, H, hd]; k, v [B, L, KV, hd]; k_valid [B, L] bool; segment_ids [B, L] int (packed rows) or
  None -> [B, L, H, hd] in q's dtype. zigzag: the inputs are already in the zig-zag layout (the output
  is too); otherwise they are permuted into it and the output back (two ppermutes each way).
  L must be a multiple of 2 × the context size."""
  c = context_size()
  length = q.shape[1]
  check_length(length, c)
  if not zigzag:
    out = ring_attention(*(to_zigzag(x, a) for x, a in (
        (q, QUERY_AXES), (k, KV_AXES), (v, KV_AXES), (k_valid, SLOT_AXES))),
        None if segment_ids is None else to_zigzag(segment_ids, SLOT_AXES), zigzag=True)
    return from_zigzag(out, QUERY_AXES)
  qs, ks = _head_specs(q, k)
  ts = _spec(SLOT_AXES, k_valid.shape)
  args = (q, k, v, k_valid.astype(bool)) + (() if segment_ids is None else (segment_ids.astype(jnp.int32),))

  def local(q, k, v, valid, *seg):
    return _local_ring(q, k, v, valid, seg[0] if seg else None, c=c, length=length)

  return jax.shard_map(local, in_specs=(qs, ks, ks, ts) + ((ts,) if segment_ids is not None else ()),
                       out_specs=qs)(*args)


def allgather_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_valid: jax.Array,
                        segment_ids: jax.Array | None = None, *, impl: str = "plain",
                        chunk: int = 512) -> jax.Array:
  """The same attention as `ring_attention` (natural layout), by all-gathering K/V (and key validity,
  segments) over `context` once: each chip runs `qv_jax.model.attention.attend` for its own L / C
  queries against all L keys (`chunk` lowered to a divisor of L / C of at least half of it, so no query
  chunk is padding). The backward reduce-scatters dK/dV. L must be a multiple of the context size."""
  from qv_jax.model.attention import attend
  c = context_size()
  length = q.shape[1]
  qs, ks = _head_specs(q, k)
  ts = _spec(SLOT_AXES, k_valid.shape)
  args = (q, k, v, k_valid.astype(bool)) + (() if segment_ids is None else (segment_ids.astype(jnp.int32),))

  if length % c:
    raise ValueError(f"decoder attention: sequence length {length} is not divisible by the context axis "
                     f"size {c}; pad data.max_seq_len to a multiple")
  local_len = length // c
  divisor = max(d for d in range(1, min(chunk, local_len) + 1) if local_len % d == 0)
  chunk = divisor if 2 * divisor >= min(chunk, local_len) else chunk

  def local(q, k, v, valid, *seg):
    gather = lambda x: jax.lax.all_gather(x, AXIS, axis=1, tiled=True)
    slots = jax.lax.axis_index(AXIS) * q.shape[1] + jnp.arange(q.shape[1], dtype=jnp.int32)
    return attend(q, gather(k), gather(v), slots, gather(valid), impl=impl, chunk=chunk,
                  segment_ids=seg[0] if seg else None, k_segment_ids=gather(seg[0]) if seg else None)

  return jax.shard_map(local, in_specs=(qs, ks, ks, ts) + ((ts,) if segment_ids is not None else ()),
                       out_specs=qs)(*args)

"""Sequence assembly reproduces the reference merge (SPEC §5.2-§5.4), written here as a slow Python walk."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from qv_jax.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX, MODALITY_IMAGE, MODALITY_VIDEO
from qv_jax.model import assembly

PH = IMAGE_TOKEN_INDEX
VS, TS, TE, VE = 900, 901, 902, 903   # <video_start> <thumbnail_start> <thumbnail_end> <video_end>
IMS, IME, PS, PE = 904, 905, 906, 907
T_LEN, Q_LEN = 3, 4                    # thumbnail tokens, tokens per cube / crop


def video_sample(num_frames, rng):
  """Pre-merge ids, labels, token_frame for a video prompt with variable-length timestamps and an answer."""
  ids, labels, tframe = [], [], []

  def add(tokens, frame=-1, supervised=False):
    for t in tokens:
      ids.append(t)
      labels.append(t if supervised and t != PH else IGNORE_INDEX)
      tframe.append(frame)

  add([1, 2, 3])                                  # <|im_start|>user\n
  add([VS, TS, PH, TE])
  for f in range(num_frames):
    add(list(rng.integers(10, 20, size=rng.integers(1, 4))), frame=f)   # {ts_f}
    add([PH], frame=f)
  add([VE, 4, 5, 6, 7])                           # <video_end>\nquestion<|im_end|>\n
  add([8, 9])                                     # <|im_start|>assistant\n
  add(list(rng.integers(30, 60, size=5)) + [6, 7], supervised=True)   # answer<|im_end|>\n
  return ids, labels, tframe


def image_sample(crops_per_image, rng):
  ids, labels = [1, 2, 3], [IGNORE_INDEX] * 3
  for n in crops_per_image:
    chunk = [IMS] + [PS, PH, PE] * n + [IME, 4]
    ids += chunk
    labels += [IGNORE_INDEX] * len(chunk)
  ans = list(rng.integers(30, 60, size=4)) + [6, 7]
  ids += [8, 9] + ans
  labels += [IGNORE_INDEX] * 2 + ans
  return ids, labels, [-1] * len(ids)


def reference_merge(ids, labels, modality, cube_bounds):
  """SPEC §5.2 `update_placeholders_by_cube` + §5.4 expansion, as a plain walk. cube_bounds: the video's
  [s, e) frame ranges. Returns a list of (what, label): what is ('text', id), ('thumb', i), ('cube', c, i)
  or ('image', n, i)."""
  out = []
  if modality == MODALITY_IMAGE:
    n = 0
    for t, lab in zip(ids, labels):
      if t == PH:
        out += [(("image", n, i), IGNORE_INDEX) for i in range(Q_LEN)]
        n += 1
      else:
        out.append((("text", t), lab))
    return out
  # Shifted bounds in image-counter space: the thumbnail is image 0, frame f is image f + 1.
  bounds = [(0, 1)] + [(s + 1, e + 1) for s, e in cube_bounds]
  first_of_cube = {s: c for c, (s, e) in enumerate(bounds)}
  g = 0
  pending = []          # text seen since the previous placeholder
  for t, lab in zip(ids, labels):
    if t != PH:
      pending.append((("text", t), lab))
      continue
    if g in first_of_cube:
      out += pending
      c = first_of_cube[g]
      if c == 0:
        out += [(("thumb", i), IGNORE_INDEX) for i in range(T_LEN)]
      else:
        out += [(("cube", c - 1, i), IGNORE_INDEX) for i in range(Q_LEN)]
    pending = []        # a non-first placeholder of a cube drops itself and the text before it
    g += 1
  return out + pending


def decode(embeds, labels, mask, vocab_offset):
  """Reads back what each slot of `assemble`'s output holds, from the coded embeddings."""
  out = []
  for e, lab, m in zip(np.asarray(embeds), np.asarray(labels), np.asarray(mask)):
    if not m:
      break
    code = int(round(e[0]))
    if code == 1:
      out.append((("text", int(round(e[1])) - vocab_offset), int(lab)))
    elif code == 2:
      out.append((("thumb", int(round(e[2]))), int(lab)))
    elif code == 3:
      out.append((("cube", int(round(e[1])), int(round(e[2]))), int(lab)))
    else:
      out.append((("image", int(round(e[1])), int(round(e[2]))), int(lab)))
  return out


def run_assembly(samples, frames_bucket, max_text_len, max_seq_len, image_slots=4):
  """samples: list of (ids, labels, tframe, modality, starts) -> (Assembled, plan). Coded banks: text
  (1, id + 1000, j), thumbnail (2, 0, i), cube (3, c, i), image (4, n, i)."""
  b = len(samples)
  kmax = frames_bucket
  ids = np.full((b, max_text_len), 0, np.int32)
  labels = np.full((b, max_text_len), IGNORE_INDEX, np.int32)
  tframe = np.full((b, max_text_len), -1, np.int32)
  valid = np.zeros((b, max_text_len), bool)
  boundary = np.zeros((b, frames_bucket), np.float32)
  cube_ids = np.zeros((b, frames_bucket), np.int32)
  modality = np.zeros((b,), np.int32)
  for i, (sid, slab, stf, mod, starts) in enumerate(samples):
    n = len(sid)
    ids[i, :n], labels[i, :n], tframe[i, :n], valid[i, :n] = sid, slab, stf, True
    modality[i] = mod
    for s in starts:
      boundary[i, s] = 1.0
    cube_ids[i] = np.cumsum(boundary[i]) - 1
  text = np.stack([np.stack([np.ones(max_text_len), ids[i] + 1000.0, np.arange(max_text_len)], -1)
                   for i in range(b)]).astype(np.float32)
  thumb = np.stack([np.full(T_LEN, 2.0), np.zeros(T_LEN), np.arange(T_LEN)], -1)
  thumb = np.broadcast_to(thumb, (b, T_LEN, 3)).astype(np.float32)
  cc, qq = np.meshgrid(np.arange(kmax), np.arange(Q_LEN), indexing="ij")
  cubes = np.broadcast_to(np.stack([np.full_like(cc, 3), cc, qq], -1), (b, kmax, Q_LEN, 3)).astype(np.float32)
  nn_, qq = np.meshgrid(np.arange(image_slots), np.arange(Q_LEN), indexing="ij")
  images = np.broadcast_to(np.stack([np.full_like(nn_, 4), nn_, qq], -1),
                           (b, image_slots, Q_LEN, 3)).astype(np.float32)

  @jax.jit
  def go(ids, tframe, valid, modality, boundary, cube_ids, text, thumb, cubes, images, labels):
    plan = assembly.plan_sequence(ids, tframe, valid, modality, boundary, cube_ids, thumb_len=T_LEN,
                                  cube_len=Q_LEN, num_cube_slots=kmax, image_len=Q_LEN,
                                  num_image_slots=image_slots, max_seq_len=max_seq_len)
    return assembly.assemble(plan, text, thumb, cubes, images, labels), plan

  return go(ids, tframe, valid, modality, boundary, cube_ids, text, thumb, cubes, images, labels)


def bounds_from_starts(starts, n):
  edges = list(starts) + [n]
  return [(edges[i], edges[i + 1]) for i in range(len(starts))]


def test_hand_built_video_matches_reference_walk():
  rng = np.random.default_rng(0)
  ids, labels, tframe = video_sample(7, rng)
  starts = [0, 3, 4]
  out, plan = run_assembly([(ids, labels, tframe, MODALITY_VIDEO, starts)], 8, 96, 96)
  want = reference_merge(ids, labels, MODALITY_VIDEO, bounds_from_starts(starts, 7))
  got = decode(out.embeds[0], out.labels[0], out.mask[0], 1000)
  assert got == want
  n = len(want)
  assert int(out.length[0]) == n and int(out.mask[0].sum()) == n
  np.testing.assert_array_equal(np.asarray(out.positions[0, :n]), np.arange(n))
  assert not np.asarray(out.mask[0, n:]).any()
  assert (np.asarray(out.labels[0, n:]) == IGNORE_INDEX).all()
  # The merged sequence: <video_start><thumbnail_start>[T]<thumbnail_end>{ts0}[C0]{ts3}[C1]{ts4}[C2]<video_end>.
  kinds = [w[0][0] for w in want]
  assert kinds.count("thumb") == T_LEN and kinds.count("cube") == 3 * Q_LEN


def test_image_sample_expands_each_crop_in_order():
  rng = np.random.default_rng(1)
  ids, labels, tframe = image_sample([2, 1], rng)
  out, _ = run_assembly([(ids, labels, tframe, MODALITY_IMAGE, [0])], 8, 64, 64)
  want = reference_merge(ids, labels, MODALITY_IMAGE, None)
  assert decode(out.embeds[0], out.labels[0], out.mask[0], 1000) == want
  assert [w[0][1] for w in want if w[0][0] == "image"][::Q_LEN] == [0, 1, 2]


def test_truncation_is_counted_and_static():
  rng = np.random.default_rng(2)
  ids, labels, tframe = video_sample(6, rng)
  out, _ = run_assembly([(ids, labels, tframe, MODALITY_VIDEO, [0, 2])], 8, 96, 24)
  full = reference_merge(ids, labels, MODALITY_VIDEO, bounds_from_starts([0, 2], 6))
  assert out.embeds.shape == (1, 24, 3)
  assert int(out.truncated[0]) == len(full) - 24
  assert decode(out.embeds[0], out.labels[0], out.mask[0], 1000) == full[:24]


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_random_partitions_match_reference_walk(data):
  rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
  bucket = 10
  samples, wants = [], []
  for _ in range(3):
    if data.draw(st.booleans()) or not samples:
      n = data.draw(st.integers(2, bucket))
      inner = data.draw(st.lists(st.integers(1, n - 1), unique=True, max_size=n - 1)) if n > 1 else []
      starts = [0] + sorted(inner)
      ids, labels, tframe = video_sample(n, rng)
      samples.append((ids, labels, tframe, MODALITY_VIDEO, starts))
      wants.append(reference_merge(ids, labels, MODALITY_VIDEO, bounds_from_starts(starts, n)))
    else:
      crops = data.draw(st.lists(st.integers(1, 2), min_size=1, max_size=2))
      ids, labels, tframe = image_sample(crops, rng)
      samples.append((ids, labels, tframe, MODALITY_IMAGE, [0]))
      wants.append(reference_merge(ids, labels, MODALITY_IMAGE, None))
  out, _ = run_assembly(samples, bucket, 128, 160)
  for i, want in enumerate(wants):
    assert decode(out.embeds[i], out.labels[i], out.mask[i], 1000) == want
    np.testing.assert_array_equal(np.asarray(out.positions[i, :len(want)]), np.arange(len(want)))


def test_gradient_flows_to_text_and_visual_sources():
  rng = np.random.default_rng(3)
  ids, labels, tframe = video_sample(5, rng)
  b, length, d = 1, 64, 2
  ids_a = np.zeros((b, length), np.int32)
  ids_a[0, :len(ids)] = ids
  tf = np.full((b, length), -1, np.int32)
  tf[0, :len(ids)] = tframe
  valid = np.zeros((b, length), bool)
  valid[0, :len(ids)] = True
  boundary = jnp.asarray([[1.0, 0, 1.0, 0, 0, 0]])
  cube_ids = jnp.asarray([[0, 0, 1, 1, 1, 1]])
  plan = assembly.plan_sequence(jnp.asarray(ids_a), jnp.asarray(tf), jnp.asarray(valid),
                                jnp.asarray([MODALITY_VIDEO]), boundary, cube_ids, thumb_len=T_LEN,
                                cube_len=Q_LEN, num_cube_slots=3, image_len=Q_LEN, num_image_slots=2,
                                max_seq_len=64)

  def total(text, thumb, cubes):
    return assembly.assemble(plan, text, thumb, cubes, None, jnp.asarray(ids_a)).embeds.sum()

  g_text, g_thumb, g_cubes = jax.grad(total, argnums=(0, 1, 2))(
      jnp.ones((b, length, d)), jnp.ones((b, T_LEN, d)), jnp.ones((b, 3, Q_LEN, d)))
  assert float(g_thumb.sum()) == T_LEN * d
  np.testing.assert_array_equal(np.asarray(g_cubes[0, :, 0, 0]), [1.0, 1.0, 0.0])   # the unused slot: 0
  # Dropped timestamp tokens of frames 1, 3, 4 and their placeholders get no gradient.
  kept = np.asarray(g_text[0, :, 0]) > 0
  dropped = (tf[0] >= 0) & ~np.isin(tf[0], [0, 2])
  assert not kept[dropped].any() and kept[(tf[0] == -1) & valid[0] & (ids_a[0] != PH)].all()


def test_merged_length_bound_covers_the_longest_plan():
  rng = np.random.default_rng(4)
  ids, labels, tframe = video_sample(8, rng)
  starts = list(range(8))
  out, _ = run_assembly([(ids, labels, tframe, MODALITY_VIDEO, starts)], 8, 64, 256)
  bound = assembly.merged_length_bound(64, T_LEN, Q_LEN, 8, Q_LEN, 4)
  assert len(ids) < int(out.length[0]) <= bound   # every frame a cube: the expansion grows the sequence

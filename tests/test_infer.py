"""Inference API on a tiny random model: greedy decoding equals a full recompute, buckets compile once,
batches equal single answers, the cube list is the compressor's partition at η = 0, clear errors."""

import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from infer_fixtures import make_video, make_workdir, one_device_mesh  # noqa: E402

from qv_jax.infer import (Answer, CheckpointLoadError, Conversation, Frames, QuestionError, VideoError,  # noqa: E402
                          answer, answer_batch, load, postprocess)
from qv_jax.infer import inputs, runner  # noqa: E402
from qv_jax.model import gumbel  # noqa: E402

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
QUESTION = "What colour is the first shape?"


class Compiles:
  def __init__(self):
    self.count = 0

  def _listen(self, event, duration, **kw):
    self.count += event == COMPILE_EVENT

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("infer")
  workdir = make_workdir(str(root / "work"))
  v1, _ = make_video(str(root / "a.mp4"), seconds=14, seed=1)
  v2, _ = make_video(str(root / "b.mp4"), seconds=12, seed=2)
  model = load(workdir, mesh=one_device_mesh())
  return dict(root=root, workdir=workdir, v1=v1, v2=v2, model=model)


def _reference_greedy(model, video, question, steps):
  """Step-by-step greedy decoding recomputing every logit from the whole sequence (no cache), with the
  decoder's stacked (scanned) layers while `answer` runs them unrolled (`unstack_layers`)."""
  frames, ts = inputs.read_frames(video, image_size=model.config.data.image_size)
  sample = inputs.make_sample(frames, ts, inputs.conversation(question), tokenizer=model.tokenizer,
                              template=model.template)
  prepared = runner.prepare(model, runner.collate(model, [sample]))
  n = int(prepared.length[0])
  decoder = runner.decoder_of(load(model.path, mesh=model.mesh, unstack_layers=False))
  seq = prepared.embeds[:, :n]
  out = []
  for _ in range(steps):
    length = seq.shape[1]
    logits, _ = decoder(inputs_embeds=seq, positions=jnp.arange(length)[None], mask=jnp.ones((1, length), bool))
    tok = int(jnp.argmax(logits[0, -1]))
    out.append(tok)
    if tok == model.eos_id:
      break
    seq = jnp.concatenate([seq, decoder.embed(jnp.asarray([[tok]])).astype(seq.dtype)], axis=1)
  return out


def test_greedy_answer_equals_full_recompute_and_second_question_compiles_nothing(setup):
  model, v1 = setup["model"], setup["v1"]
  got = answer(model, v1, QUESTION, max_new_tokens=6)
  assert isinstance(got, Answer) and got.error is None and model.layer_params is not None
  want = _reference_greedy(model, v1, QUESTION, 6)
  assert got.token_ids == want
  assert len(set(want)) > 1                     # not a degenerate constant model
  assert got.num_frames == len(got.timestamps) == 14
  assert got.prompt.startswith("<|im_start|>user\n<video_start><thumbnail_start><image><thumbnail_end>0.5<image>")
  assert got.prompt.endswith(f"<video_end>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
  with Compiles() as compiles:
    again = answer(model, v1, "Which shape comes last?", max_new_tokens=6)
  assert compiles.count == 0
  assert again.cubes == got.cubes               # the partition does not depend on the question
  assert got.prefill_s > 0 and got.decode_s > 0


def test_cubes_are_the_compressor_partition_at_eta_0(setup):
  from qv_jax.infer.timeline import compute_timeline
  model, v1 = setup["model"], setup["v1"]
  timeline, frames = compute_timeline(model, v1)
  module = model.module
  n = len(frames)
  padded = np.zeros((1, 16) + frames.shape[1:], np.uint8)
  padded[0, :n] = frames
  features = module.frame_features(jnp.asarray(padded))
  cubes = module.compressor(features, jnp.asarray([n], jnp.int32), key=None, noise_weight=0.0)
  starts = [int(i) for i in np.nonzero(np.asarray(cubes.boundary[0, :n]) > 0.5)[0]]
  assert [c["start_frame"] for c in timeline["cubes"]] == starts
  assert [c["end_frame"] for c in timeline["cubes"]] == starts[1:] + [n]
  assert timeline["k"] == gumbel.num_cubes(n, 5) - 1 == len(starts) - 1
  probs = np.asarray(gumbel.boundary_probs(cubes.logits, None, 0.0, 0.5))[0, :n - 1]
  np.testing.assert_allclose(timeline["boundary_probs"], probs, rtol=1e-5, atol=1e-6)
  chosen = sorted(np.argsort(-probs, kind="stable")[:len(starts) - 1] + 1)
  assert starts[1:] == [int(c) for c in chosen]
  got = answer(model, v1, QUESTION, max_new_tokens=1)
  assert [(c.start_frame, c.end_frame) for c in got.cubes] == list(zip(starts, starts[1:] + [n]))
  assert [c.start_sec for c in got.cubes] == [timeline["timestamps"][s] for s in starts]


@pytest.mark.slow
def test_batch_equals_one_by_one_and_reports_bad_videos(setup):
  model, v1, v2 = setup["model"], setup["v1"], setup["v2"]
  items = [(v1, QUESTION), (str(setup["root"] / "missing.mp4"), QUESTION), (v2, "Which shape comes last?"),
           (v1, "  ")]
  out = answer_batch(model, items, max_new_tokens=5, errors="return", batch_size=2)
  assert [a.error is None for a in out] == [True, False, True, False]
  assert "missing.mp4: no such video file" in out[1].error and out[1].text == ""
  assert "empty" in out[3].error
  for (video, q), a in zip(items, out):
    if a.error is None:
      single = answer(model, video, q, max_new_tokens=5)
      assert a.token_ids == single.token_ids
      assert [(c.start_frame, c.end_frame) for c in a.cubes] == [(c.start_frame, c.end_frame) for c in single.cubes]
      np.testing.assert_allclose([c.boundary_prob for c in a.cubes], [c.boundary_prob for c in single.cubes],
                                 rtol=1e-5)
  with Compiles() as compiles:
    answer_batch(model, [(v2, QUESTION), (v1, "Which shape comes last?")], max_new_tokens=5, batch_size=2)
  assert compiles.count == 0
  with pytest.raises(VideoError, match="missing.mp4"):
    answer_batch(model, items[:2], max_new_tokens=5, batch_size=2)


def test_frames_input_conversation_and_postprocess(setup):
  model, v1 = setup["model"], setup["v1"]
  frames, ts = inputs.read_frames(v1, image_size=model.config.data.image_size)
  by_file = answer(model, v1, QUESTION, max_new_tokens=6)
  by_frames = answer(model, Frames(frames, ts, name="frames"), QUESTION, max_new_tokens=6)
  assert by_frames.token_ids == by_file.token_ids
  chat = Conversation(model, v1)
  first = chat.ask(QUESTION, max_new_tokens=6)
  second = chat.ask("And the last?", max_new_tokens=6)
  assert first.token_ids == by_file.token_ids
  assert f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n{first.text}<|im_end|>\n<|im_start|>user\nAnd the last?" \
      in second.prompt
  eos, pad = model.eos_id, model.pad_id
  a, b = model.tokenizer.encode("red blue").ids[:2]
  ids, text = postprocess(model, [a, 0, b, eos, pad, pad])
  assert ids == [a, 0, b, eos]
  assert text == model.tokenizer.decode([a, b], skip_special_tokens=False).strip()


def test_clear_errors(setup, tmp_path):
  model, v1 = setup["model"], setup["v1"]
  with pytest.raises(VideoError, match="nope.mp4: no such video file"):
    answer(model, str(tmp_path / "nope.mp4"), QUESTION)
  garbage = tmp_path / "garbage.mp4"
  garbage.write_bytes(os.urandom(2048))
  with pytest.raises(VideoError, match="garbage.mp4: unreadable video"):
    answer(model, str(garbage), QUESTION)
  with pytest.raises(QuestionError, match="empty"):
    answer(model, v1, " \n")
  with pytest.raises(CheckpointLoadError, match="no such directory"):
    load(str(tmp_path / "none"))
  other = tmp_path / "other"
  shutil.copytree(setup["workdir"], other)
  config = json.loads((other / "config.json").read_text())
  config["model"]["decoder"]["num_layers"] = 3
  (other / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointLoadError, match="does not match the model.*decoder/layers"):
    load(str(other), mesh=one_device_mesh())


def test_cli_ask_and_timeline(setup, tmp_path, capsys):
  from PIL import Image
  from qv_jax.infer import cli_ask, cli_timeline
  v1, workdir = setup["v1"], setup["workdir"]
  assert cli_ask.main([v1, QUESTION, "--checkpoint", workdir, "--max-new-tokens", "6", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  want = answer(setup["model"], v1, QUESTION, max_new_tokens=6)
  assert out["text"] == want.text and out["token_ids"] == want.token_ids
  assert out["prompt"] == want.prompt and len(out["cubes"]) == len(want.cubes)
  assert cli_ask.main([v1, QUESTION, "--checkpoint", workdir, "--max-new-tokens", "6", "--stream"]) == 0
  assert capsys.readouterr().out == want.text + "\n"
  assert cli_ask.main([str(tmp_path / "x.mp4"), QUESTION, "--checkpoint", workdir]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("qv-ask: error: ") and "x.mp4: no such video file" in err and "\n" not in err

  out_dir = tmp_path / "tl"
  assert cli_timeline.main([v1, "--checkpoint", workdir, "--out", str(out_dir), "--uniform"]) == 0
  timeline = json.loads((out_dir / "timeline.json").read_text())
  assert [c["start_frame"] for c in timeline["cubes"]] == [c.start_frame for c in want.cubes]
  image = np.asarray(Image.open(out_dir / "timeline.png").convert("L"), np.float32)
  assert image.shape[0] > 300 and image.shape[1] > 600 and image.std() > 20
  assert cli_timeline.main([v1, "--checkpoint", str(tmp_path / "none"), "--out", str(out_dir)]) == 2
  assert "no such directory" in capsys.readouterr().err


@pytest.mark.slow
def test_sharded_params_give_the_same_answer(setup):
  from qv_jax.sharding import make_mesh
  model, v1 = setup["model"], setup["v1"]
  mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
  sharded = load(setup["workdir"], mesh=mesh)
  kernel = sharded.layer_params[0]["mlp"]["gate_proj"]["kernel"]
  kernel = kernel.get_value() if hasattr(kernel, "get_value") else kernel
  assert len(kernel.sharding.device_set) == 4 and not kernel.sharding.is_fully_replicated
  want = answer(model, v1, QUESTION, max_new_tokens=6)
  got = answer(sharded, v1, QUESTION, max_new_tokens=6)
  assert got.token_ids == want.token_ids
  assert [(c.start_frame, c.end_frame) for c in got.cubes] == [(c.start_frame, c.end_frame) for c in want.cubes]

"""The evaluation harness with a stand-in model: predictions and metrics per benchmark, kill + resume, process
sharding and merge, the qv-eval command's one-line errors."""

import dataclasses
import json
import os

import pytest

from eval_fake import FakeModel
from eval_fixtures import write_mlvu, write_mvbench, write_videomme
from qv_jax.infer.eval import cli, harness, metrics, store
from qv_jax.infer.eval.readers import mlvu, mvbench, videomme

WRITERS = {"videomme": write_videomme, "mvbench": write_mvbench, "mlvu": write_mlvu}
READERS = {"videomme": videomme.read, "mvbench": mvbench.read, "mlvu": mlvu.read}


def lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
  return {name: writer(tmp_path_factory.mktemp(name)) for name, writer in WRITERS.items()}


@pytest.mark.parametrize("bench", ["videomme", "mvbench", "mlvu"])
def test_run_writes_predictions_and_metrics(roots, tmp_path, bench):
  read = READERS[bench](roots[bench])
  fake = FakeModel()
  values = harness.evaluate(bench, read, fake, str(tmp_path), batch_size=3, progress=False)
  records = lines(tmp_path / "predictions.jsonl")
  assert [r["key"] for r in records] == [it.key for it in read.items]
  assert set(fake.answered.values()) == {1}
  assert values == json.loads((tmp_path / "metrics.json").read_text())
  assert values["missing_video"] == {"videomme": 1, "mvbench": 1, "mlvu": 1}[bench]
  assert values["skipped_samples"] == {"videomme": 1, "mvbench": 1, "mlvu": 0}[bench]
  assert values["unreadable_video"] == (1 if bench == "mlvu" else 0)
  for r in records:
    if r["error"]:
      assert r["error_kind"] in ("missing_video", "unreadable_video") and r["pred_standard"] == r["pred_reference"] == ""
    else:
      assert r["pred_standard"] == r["pred_reference"] == (r["answer"] if r["num_frames"] % 2 == 0 else
                                                           r["output"][len("The answer is (")])
  correct = sum(r["pred_standard"] == r["answer"] for r in records if r["variant"] == "standard")
  if bench == "videomme":
    assert values["standard"]["correct"] == correct and values["standard"]["total"] == 5
    assert values["reference"]["Tot"] == 5
  elif bench == "mvbench":
    by_key = {r["key"]: r for r in records}
    # start/end honoured in the standard run, ignored in the reference variant
    assert by_key["action_sequence/0"]["num_frames"] == 4 and by_key["action_sequence/0#reference"]["num_frames"] == 8
    assert by_key["episodic_reasoning/0"]["num_frames"] == 6
    assert values["standard"]["tasks"] == 4 and values["reference_input_runs"] == 3
  else:
    assert values["standard"]["total"] == 10 and values["reference"]["answered"] == 8
    assert values["standard"]["M-Avg"] == pytest.approx(metrics.mlvu(records, list(mlvu.TASKS))["standard"]["M-Avg"])


def test_kill_and_resume_equals_one_run(roots, tmp_path, capsys):
  read = mvbench.read(roots["mvbench"])
  whole = tmp_path / "whole"
  harness.evaluate("mvbench", read, FakeModel(), str(whole), batch_size=2, progress=False)

  run = tmp_path / "killed"
  first = FakeModel(fail_on_call=3)
  with pytest.raises(KeyboardInterrupt):
    harness.evaluate("mvbench", read, first, str(run), batch_size=2, progress=False)
  assert sum(first.answered.values()) == 4 and len(lines(run / "predictions.jsonl")) == 4
  with open(run / "predictions.jsonl", "a") as f:
    f.write('{"key": "action_antonym/0", "out')      # a line torn by the kill
  second = FakeModel()
  capsys.readouterr()
  harness.evaluate("mvbench", read, second, str(run), batch_size=2, progress=False)
  assert "resuming: 4 of 8 questions already answered, answering 4" in capsys.readouterr().err
  assert not set(first.answered) & set(second.answered)
  assert set(first.answered) | set(second.answered) == {it.key for it in read.items}
  assert (run / "predictions.jsonl").read_bytes() == (whole / "predictions.jsonl").read_bytes()
  assert (run / "metrics.json").read_text() == (whole / "metrics.json").read_text()

  third = FakeModel()
  harness.evaluate("mvbench", read, third, str(run), batch_size=2, progress=False)
  assert third.calls == 0


def test_two_shards_merge_like_one(roots, tmp_path):
  read = mlvu.read(roots["mlvu"])
  single = harness.evaluate("mlvu", read, FakeModel(), str(tmp_path / "one"), progress=False)
  out = str(tmp_path / "two")
  fakes = [FakeModel(), FakeModel()]
  other = harness.answer_items(read.items, fakes[1], out, process_index=1, process_count=2, progress=False)
  assert os.path.exists(os.path.join(out, "predictions.part1of2.jsonl"))
  pair = harness.evaluate("mlvu", read, fakes[0], out, process_index=0, process_count=2,
                          gather=lambda mine: mine + other, progress=False)
  assert pair == single
  assert set(fakes[0].answered).isdisjoint(fakes[1].answered)
  assert len(fakes[0].answered) + len(fakes[1].answered) == len(read.items)
  assert sorted(os.listdir(out)) == ["metrics.json", "predictions.jsonl"]
  assert lines(os.path.join(out, "predictions.jsonl")) == lines(tmp_path / "one" / "predictions.jsonl")


def test_resume_reads_part_files_of_another_process_count(roots, tmp_path):
  read = mlvu.read(roots["mlvu"])
  harness.answer_items(read.items, FakeModel(), str(tmp_path), process_index=0, process_count=2, progress=False)
  rest = FakeModel()
  harness.evaluate("mlvu", read, rest, str(tmp_path), progress=False)
  assert set(rest.answered) == {it.key for it in read.items[1::2]}


def test_torn_tail_is_cut_before_appending(tmp_path):
  path = tmp_path / store.MERGED
  path.write_text('{"key": "a"}\n{"key": "b"')
  app = store.Appender(str(path))
  app.write([{"key": "c"}])
  app.close()
  assert [r["key"] for r in lines(path)] == ["a", "c"]


def test_cli_with_stand_in_model(roots, tmp_path, capsys):
  code = cli.main(["--benchmark", "mlvu", "--data", roots["mlvu"], "--checkpoint", "unused", "--out",
                   str(tmp_path), "--no-progress", "--limit", "3"], answer_fn=FakeModel())
  assert code == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["items"] == 3 and summary["standard"]["tasks"] == 2
  assert json.loads((tmp_path / "metrics.json").read_text())["limit"] == 3


@pytest.mark.parametrize("bench,expected", [
  ("videomme", "no Video-MME index"), ("mvbench", "no MVBench index folder json/"),
  ("mlvu", "no MLVU index folder json/")])
def test_cli_benchmark_dir_without_index_one_line(tmp_path, capsys, bench, expected):
  code = cli.main(["--benchmark", bench, "--data", str(tmp_path), "--checkpoint", "x", "--out",
                   str(tmp_path / "o")], answer_fn=FakeModel())
  err = capsys.readouterr().err
  assert code == 2 and expected in err and err.count("\n") == 1


def test_retry_errors_answers_a_video_added_since(roots, tmp_path):
  import shutil
  root = shutil.copytree(roots["mlvu"], tmp_path / "mlvu")
  read = mlvu.read(str(root))
  out = str(tmp_path / "out")
  first = harness.evaluate("mlvu", read, FakeModel(), out, progress=False)
  assert first["missing_video"] == 1
  shutil.copy(root / "video" / "4_count" / "count_1.mp4", root / "video" / "4_count" / "gone.mp4")
  again = FakeModel()
  assert harness.evaluate("mlvu", read, again, out, progress=False)["missing_video"] == 1 and again.calls == 0
  retry = FakeModel()
  values = harness.evaluate("mlvu", read, retry, out, progress=False, retry_errors=True)
  assert list(retry.answered) == ["4_count/1", "4_count/2"]          # the missing and the corrupt one
  assert values["missing_video"] == 0 and values["unreadable_video"] == 1
  assert [r["key"] for r in lines(os.path.join(out, "predictions.jsonl"))] == [it.key for it in read.items]


def test_model_answerer_isolates_a_failing_question(roots, monkeypatch):
  import types
  import qv_jax.infer
  from qv_jax.infer import Answer, Frames
  read = mlvu.read(roots["mlvu"])
  items = [read.items[0], read.items[1], read.items[5], read.items[7]]   # two fine, the missing one, a "boom"
  items[3] = dataclasses.replace(items[3], question="boom")
  calls = []

  def fake_answer_batch(model, pairs, **kw):
    calls.append((len(pairs), kw["batch_size"], kw["num_frames"], kw["errors"]))
    assert all(isinstance(v, Frames) and v.frames.shape[1:] == (32, 32, 3) for v, _ in pairs)
    if any(q == "boom" for _, q in pairs):
      raise RuntimeError("XLA ran out of\nmemory")
    return [Answer(text="(B)", token_ids=[], cubes=[], timestamps=[], prompt="", num_frames=3, prefill_s=0,
                   decode_s=0, error="video decodes to 1 frame" if q.startswith("Question: Who") else None)
            for _, q in pairs]

  monkeypatch.setattr(qv_jax.infer, "answer_batch", fake_answer_batch)
  model = types.SimpleNamespace(config=types.SimpleNamespace(data=types.SimpleNamespace(image_size=32)))
  fn = harness.ModelAnswerer(model, num_frames=16, batch_size=4)
  out = fn(items)
  assert [o.kind for o in out] == [None, "unreadable_video", "missing_video", "failed"]
  assert out[0].text == "(B)" and out[0].num_frames == 3
  assert out[3].error == f"{items[3].key}: RuntimeError: XLA ran out of memory"
  assert calls == [(3, 4, 16, "return"), (1, 4, 16, "return"), (1, 4, 16, "return"), (1, 4, 16, "return")]


def test_resume_with_other_settings_is_refused(roots, tmp_path, capsys):
  base = ["--benchmark", "mlvu", "--data", roots["mlvu"], "--checkpoint", "ck", "--out", str(tmp_path),
          "--no-progress", "--limit", "2"]
  assert cli.main(base + ["--num-frames", "8"], answer_fn=FakeModel()) == 0
  assert json.loads((tmp_path / "run.json").read_text())["num_frames"] == 8
  again = FakeModel()
  assert cli.main(base + ["--num-frames", "16"], answer_fn=again) == 2
  err = capsys.readouterr().err
  assert "run.json: this folder holds a run with other settings (num_frames=8 there, 16 now)" in err
  assert err.count("\n") == 1 and again.calls == 0
  assert cli.main(base + ["--num-frames", "8", "--limit", "3"], answer_fn=again) == 0 and again.calls == 1


class _Prefetching(FakeModel):
  """Batch 0's answer waits until batch 1's videos are being prepared: only a harness that prepares one batch
  ahead, in another thread, gets past it."""

  def __init__(self):
    super().__init__()
    import threading
    self.second_prepared = threading.Event()
    self.prepared = []

  def prepare(self, items):
    self.prepared.append([it.key for it in items])
    if len(self.prepared) == 2:
      self.second_prepared.set()
    return [it.key for it in items]

  def __call__(self, items, prepared):
    assert prepared == [it.key for it in items]
    if self.calls == 0:
      assert self.second_prepared.wait(timeout=60), "batch 1 was not prepared while batch 0 was answered"
    return super().__call__(items)


def test_videos_are_prepared_one_batch_ahead(roots, tmp_path):
  read = mlvu.read(roots["mlvu"])
  fake = _Prefetching()
  values = harness.evaluate("mlvu", read, fake, str(tmp_path), batch_size=4, progress=False)
  assert fake.prepared == [[it.key for it in read.items[i:i + 4]] for i in range(0, len(read.items), 4)]
  assert values == harness.evaluate("mlvu", read, FakeModel(), str(tmp_path / "plain"), batch_size=4, progress=False)

"""Damaged checkpoints are found before they are used: a flipped byte, a deleted or truncated file, a
missing or garbled item, each reported in one line naming the checkpoint and what is wrong; the run
resumes from the newest intact step (the damaged one kept as `<step>.damaged`), or stops when none is."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qv_jax.train import checkpoint as ckpt
from qv_jax.train import checkpoint_integrity as integrity


def _tree(seed: float):
  params = {"enc": {"w": jnp.full((8, 4), seed), "b": jnp.arange(4.0) + seed}, "head": jnp.full((16,), seed)}
  opt = {"count": jnp.asarray(int(seed), jnp.int32), "mu": {"w": jnp.full((8, 4), -seed)}}
  meta = {"step": jnp.asarray(int(seed), jnp.int32), "rng": jax.random.PRNGKey(int(seed))}
  return params, opt, meta


def _abstract():
  p, o, m = _tree(0.0)
  shape = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
  return dict(params=shape(p), opt_state=shape(o), meta=shape(m))


def _write(workdir, steps=(2, 4), async_save=False):
  c = ckpt.Checkpointer(str(workdir), keep=5, async_save=async_save)
  for s in steps:
    p, o, m = _tree(float(s))
    c.save(s, params=p, opt_state=o, meta=m, data_state={"next": s})
  c.close()
  return os.path.join(str(workdir), "checkpoints")


def _restore(workdir):
  c = ckpt.Checkpointer(str(workdir), keep=5, async_save=False)
  try:
    return c.restore_latest(**_abstract())
  finally:
    c.close()


def _largest(item_dir):
  """The largest file of an item's merged OCDBT store (`<item>/d/`), which the restore reads."""
  d = os.path.join(item_dir, "d")
  return max((os.path.join(d, n) for n in os.listdir(d)), key=os.path.getsize)


def _flip_byte(path, offset=-9):
  with open(path, "r+b") as f:
    f.seek(offset, os.SEEK_END)
    b = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([b[0] ^ 0x40]))


def test_intact_checkpoints_get_checksums_and_restore(tmp_path):
  root = _write(tmp_path, async_save=True)
  for s in (2, 4):
    recorded = integrity.read_checksums(os.path.join(root, str(s)))
    assert any(k.startswith("params/") for k in recorded) and "data/process_0-of-1.json" in recorded
  step, (params, opt, meta, data) = _restore(tmp_path)
  assert step == 4 and data == {"next": 4} and float(params["head"][0]) == 4.0


@pytest.mark.parametrize("item", ["params", "opt_state"])
def test_flipped_byte_falls_back_to_the_previous_step(tmp_path, caplog, item):
  root = _write(tmp_path)
  _flip_byte(_largest(os.path.join(root, "4", item)))
  with caplog.at_level(logging.WARNING):
    step, (params, opt, _, data) = _restore(tmp_path)
  assert step == 2 and data == {"next": 2}
  assert float(params["head"][0]) == 2.0 and float(opt["mu"]["w"][0, 0]) == -2.0
  msg = " ".join(r.getMessage() for r in caplog.records)
  assert "checkpoints/4 is damaged" in msg and f"{item}/" in msg and "checksum mismatch" in msg
  assert sorted(os.listdir(root)) == ["2", "4.damaged"]


DAMAGE = {
    "deleted data file": (lambda d: os.remove(_largest(os.path.join(d, "params"))), r"params/.* is missing"),
    "truncated data file": (lambda d: os.truncate(_largest(os.path.join(d, "params")), 10), r"\(truncated\)"),
    "deleted params": (lambda d: __import__("shutil").rmtree(os.path.join(d, "params")), r"params/ is missing"),
    "emptied step": (lambda d: [__import__("shutil").rmtree(os.path.join(d, n)) if os.path.isdir(os.path.join(d, n))
                                else os.remove(os.path.join(d, n)) for n in os.listdir(d)],
                     r"step directory is empty"),
    "garbage _METADATA": (lambda d: open(os.path.join(d, "params", "_METADATA"), "wb").write(b"\x00garbage{"),
                          r"params/_METADATA is not valid JSON"),
    "deleted _METADATA": (lambda d: os.remove(os.path.join(d, "params", "_METADATA")),
                          r"params/_METADATA \(the array names, shapes and dtypes\) is missing"),
    "garbage data state": (lambda d: open(os.path.join(d, "data", "process_0-of-1.json"), "w").write("{oops"),
                           r"data/process_0-of-1.json \(the data-iterator state\) is not the JSON"),
    "deleted data state": (lambda d: os.remove(os.path.join(d, "data", "process_0-of-1.json")),
                           r"data/process_0-of-1.json \(this process's data-iterator state\) is missing"),
}


@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "no_checksums"])
@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_each_damage_is_named_and_skipped(tmp_path, caplog, case, checksums):
  damage, pattern = DAMAGE[case]
  root = _write(tmp_path)
  if not checksums:                      # a checkpoint from before checksums, or killed while hashing
    for s in (2, 4):
      os.remove(os.path.join(root, str(s), f"{integrity.CHECKSUM_PREFIX}0-of-1.json"))
  damage(os.path.join(root, "4"))
  with caplog.at_level(logging.WARNING):
    step, restored = _restore(tmp_path)
  assert step == 2 and restored[3] == {"next": 2}
  warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert warnings and "checkpoints/4" in warnings[0] and "\n" not in warnings[0], warnings
  if checksums or case not in ("truncated data file", "deleted data file"):
    import re
    assert re.search(pattern, warnings[0]), warnings[0]
  assert os.path.isdir(os.path.join(root, "4.damaged"))


def test_no_intact_checkpoint_is_a_clear_error_and_renames_nothing(tmp_path):
  root = _write(tmp_path)
  _flip_byte(_largest(os.path.join(root, "4", "params")))
  os.remove(os.path.join(root, "2", "params", "_METADATA"))
  with pytest.raises(ckpt.CheckpointError) as e:
    _restore(tmp_path)
  msg = str(e.value)
  assert "no intact checkpoint" in msg and "step 4:" in msg and "step 2:" in msg and "\n" not in msg
  assert sorted(os.listdir(root)) == ["2", "4"]


def test_other_process_count_is_not_damage(tmp_path):
  root = _write(tmp_path)
  for s in (2, 4):
    d = os.path.join(root, str(s), "data")
    os.rename(os.path.join(d, "process_0-of-1.json"), os.path.join(d, "process_0-of-2.json"))
  with pytest.raises(ckpt.CheckpointError, match="different number of processes"):
    _restore(tmp_path)
  assert sorted(os.listdir(root)) == ["2", "4"]


def test_shape_report_names_the_parts(tmp_path):
  saved = {"enc": {"w": jax.ShapeDtypeStruct((8, 4), np.float32)}}
  want = {"enc": {"w": jax.ShapeDtypeStruct((8, 5), np.float32)}, "head": jax.ShapeDtypeStruct((2, 3), np.float32)}
  with pytest.raises(ckpt.CheckpointError) as e:
    ckpt.check_params_match("ck", saved, want)
  assert "in enc, head:" in str(e.value) and "missing head (2, 3)" in str(e.value)


def test_checksums_split_over_processes(tmp_path):
  root = _write(tmp_path, steps=(2,))
  step_dir = os.path.join(root, "2")
  whole = integrity.read_checksums(step_dir)
  os.remove(os.path.join(step_dir, f"{integrity.CHECKSUM_PREFIX}0-of-1.json"))
  integrity.write_checksums(step_dir, (1, 3))
  assert integrity.read_checksums(step_dir) is None          # parts 0 and 2 missing: unverified
  integrity.write_checksums(step_dir, (0, 3))
  integrity.write_checksums(step_dir, (2, 3))
  assert integrity.read_checksums(step_dir) == whole
  _flip_byte(_largest(os.path.join(step_dir, "opt_state")))
  found = [p for i in range(3) for p in integrity.content_problems(step_dir, whole, (i, 3))]
  assert len(found) == 1 and found[0].startswith("opt_state/d/") and "checksum mismatch" in found[0]
  with open(os.path.join(step_dir, f"{integrity.CHECKSUM_PREFIX}1-of-3.json"), "w") as f:
    f.write("[1, 2")
  with pytest.raises(ValueError, match="qv_checksums-1-of-3.json is unreadable"):
    integrity.read_checksums(step_dir)


def test_init_from_a_damaged_step_is_refused(tmp_path):
  root = _write(tmp_path, steps=(2,))
  abstract = _abstract()["params"]
  assert float(ckpt.load_params(str(tmp_path), abstract)["head"][0]) == 2.0
  _flip_byte(_largest(os.path.join(root, "2", "params")))
  with pytest.raises(ckpt.CheckpointError, match=r"init_from: checkpoint .*/2 is damaged: params/d/.*checksum"):
    ckpt.load_params(str(tmp_path), abstract)

"""The planner's parts without a TPU compile: the HLO collective parser on hand-built programs, the roofline
on hand-worked numbers, mesh candidates and ranking, the abstract optimizer shardings, bad input."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from qv_jax.config import validate
from qv_jax.config.errors import ConfigError
from qv_jax.plan import hlo
from qv_jax.plan.candidates import mesh_candidates
from qv_jax.plan.chips import CHIPS
from qv_jax.plan.report import rank, row
from qv_jax.plan.roofline import roofline
from qv_jax.plan.target import check_mesh_shape, load_target, parse_topology


def _compiled_text(fn, mesh, spec, shape):
  arg = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))
  return jax.jit(fn).lower(arg).compile().as_text()


def test_psum_and_all_gather_in_a_7_step_scan():
  mesh = jax.make_mesh((2, 4), ("a", "b"))

  def local(x):                                   # x: the f32[4, 4] shard of each device
    def body(c, _):
      g = jax.lax.all_gather(c, "b", tiled=True)  # [16, 4]
      return c + g[:4] * 0 + 1, None
    y, _ = jax.lax.scan(body, x, None, length=7)
    return jax.lax.psum(y, "a")

  f = jax.shard_map(local, mesh=mesh, in_specs=P("a", "b"), out_specs=P(None, "b"))
  colls = hlo.collectives(_compiled_text(f, mesh, P("a", "b"), (8, 16)), (2, 4), ("a", "b"))
  by_kind = {c.kind: c for c in colls}
  assert sorted(by_kind) == ["all-gather", "all-reduce"]
  ag, ar = by_kind["all-gather"], by_kind["all-reduce"]
  shard = 4 * 4 * 4                               # bytes of one f32[4, 4] shard
  assert (ag.count, ag.group_size, ag.payload_bytes, ag.axes) == (7, 4, shard, ("b",))
  assert ag.wire_bytes == 3 * shard               # (n - 1) shards received per gather
  assert (ar.count, ar.group_size, ar.payload_bytes, ar.axes) == (1, 2, shard, ("a",))
  assert ar.wire_bytes == 2 * (1 / 2) * shard
  s = hlo.summarize(colls)
  assert s["wire_bytes_by_axis"] == {"b": 7 * 3 * shard, "a": shard}
  assert s["executions_by_kind"] == {"all-gather": 7, "all-reduce": 1}


def test_nested_loops_multiply_trip_counts():
  mesh = jax.make_mesh((8,), ("x",))

  def local(x):
    def inner(c, _):
      return c + jax.lax.psum(c, "x") * 0.5, None

    def outer(c, _):
      return jax.lax.scan(inner, c, None, length=3)[0], None
    return jax.lax.scan(outer, x, None, length=5)[0]

  f = jax.shard_map(local, mesh=mesh, in_specs=P("x"), out_specs=P("x"))
  colls = hlo.collectives(_compiled_text(f, mesh, P("x"), (8 * 32,)), (8,), ("x",))
  total = sum(c.count for c in colls if c.kind == "all-reduce")
  assert total == 15
  assert all(c.payload_bytes == 32 * 4 and c.group_size == 8 for c in colls)


def test_hand_written_hlo_iota_groups_async_and_tuples():
  text = """HloModule m
%body (p: (s32[], bf16[8,128])) -> (s32[], bf16[8,128]) {
  %p = (s32[], bf16[8,128]{1,0}) parameter(0)
  %x = bf16[8,128]{1,0} get-tuple-element(%p), index=1
  %ags = (bf16[8,128]{1,0}, bf16[32,128]{1,0}) all-gather-start(%x), replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}
  %agd = bf16[32,128]{1,0} all-gather-done(%ags)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], bf16[8,128]{1,0}) tuple(%i, %x)
}
%cond (q: (s32[], bf16[8,128])) -> pred[] {
  %q = (s32[], bf16[8,128]{1,0}) parameter(0)
  %c = s32[] constant(11)
  %j = s32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%j, %c), direction=LT
}
ENTRY %main (a: bf16[8,128], b: f32[16]) -> f32[16] {
  %a = bf16[8,128]{1,0} parameter(0)
  %b = f32[16]{0} parameter(1)
  %z = s32[] constant(0)
  %t0 = (s32[], bf16[8,128]{1,0}) tuple(%z, %a)
  %w = (s32[], bf16[8,128]{1,0}) while(%t0), condition=%cond, body=%body
  %cp = f32[16]{0} collective-permute(%b), source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  ROOT %rs = f32[2]{0} reduce-scatter(%cp), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
}
"""
  # the while has no known_trip_count here: the condition's constant gives it
  colls = {c.kind: c for c in hlo.collectives(text, (2, 4), ("d", "t"))}
  ag = colls["all-gather"]
  assert ag.count == 11 and ag.payload_bytes == 8 * 128 * 2 and ag.group_size == 4
  # [2,4]<=[4,2]T(1,0): groups {0,2,4,6} and {1,3,5,7}: members differ in both mesh axes of (2, 4)
  assert ag.groups == [[0, 2, 4, 6], [1, 3, 5, 7]] and ag.axes == ("d", "t")
  assert colls["collective-permute"].wire_bytes == 64
  assert colls["reduce-scatter"].wire_bytes == pytest.approx(7 / 8 * 64)
  assert colls["reduce-scatter"].axes == ("d", "t")


def test_hbm_traffic_weights_each_op_by_its_loop_trips():
  """Per op: operands in, result out; a fused operand that is only sliced moves its slice, an in-place
  dynamic-update-slice root its update; the loop body's bytes count 7 times in the weighted sum."""
  text = """HloModule m
%fused_slice (a: f32[64,32], i: s32[]) -> f32[1,32] {
  %a = f32[64,32]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = f32[1,32]{1,0} dynamic-slice(%a, %i, %z), dynamic_slice_sizes={1,32}
}
%fused_dus (buf: f32[64,32], u: f32[1,32], i: s32[]) -> f32[64,32] {
  %buf = f32[64,32]{1,0} parameter(0)
  %u = f32[1,32]{1,0} parameter(1)
  %i = s32[] parameter(2)
  %z = s32[] constant(0)
  %e = f32[1,32]{1,0} exponential(%u)
  ROOT %d = f32[64,32]{1,0} dynamic-update-slice(%buf, %e, %i, %z)
}
%body (p: (s32[], f32[64,32], f32[64,32])) -> (s32[], f32[64,32], f32[64,32]) {
  %p = (s32[], f32[64,32]{1,0}, f32[64,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[64,32]{1,0} get-tuple-element(%p), index=1
  %y = f32[64,32]{1,0} get-tuple-element(%p), index=2
  %row = f32[1,32]{1,0} fusion(%x, %i), kind=kLoop, calls=%fused_slice
  %y2 = f32[64,32]{1,0} fusion(%y, %row, %i), kind=kLoop, calls=%fused_dus
  %one = s32[] constant(1)
  %i2 = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[64,32]{1,0}, f32[64,32]{1,0}) tuple(%i2, %x, %y2)
}
%cond (q: (s32[], f32[64,32], f32[64,32])) -> pred[] {
  %q = (s32[], f32[64,32]{1,0}, f32[64,32]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %c = s32[] constant(7)
  ROOT %lt = pred[] compare(%j, %c), direction=LT
}
ENTRY %main (x: f32[64,32], y: f32[64,32]) -> f32[64,32] {
  %x = f32[64,32]{1,0} parameter(0)
  %y = f32[64,32]{1,0} parameter(1)
  %z = s32[] constant(0)
  %t0 = (s32[], f32[64,32]{1,0}, f32[64,32]{1,0}) tuple(%z, %x, %y)
  %w = (s32[], f32[64,32]{1,0}, f32[64,32]{1,0}) while(%t0), condition=%cond, body=%body
  %r = f32[64,32]{1,0} get-tuple-element(%w), index=2
  ROOT %n = f32[64,32]{1,0} negate(%r)
}
"""
  row, whole, scalar = 32 * 4, 64 * 32 * 4, 4
  body = row + scalar + row           # the slice fusion: reads one row of x and the index, writes the row
  body += row + scalar + row          # the update fusion: reads the row and the index, writes the row in place
  body += 3 * scalar                  # the counter's add
  entry = 2 * whole                   # negate
  weighted, once = hlo.hbm_traffic(text)
  assert once == body + entry
  assert weighted == 7 * body + entry


def test_empty_replica_groups_mean_all_devices():
  text = """HloModule m
ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  ROOT %r = f32[8]{0} all-reduce(%a), replica_groups={}, to_apply=%add
}
"""
  (c,) = hlo.collectives(text, (2, 4), ("d", "f"))
  assert c.group_size == 8 and c.axes == ("d", "f") and c.wire_bytes == 2 * 7 / 8 * 32


def test_shape_bytes():
  assert hlo.shape_bytes("f32[4,4]{1,0}") == 64
  assert hlo.shape_bytes("(bf16[2,3]{1,0}, s8[5]{0}, pred[])") == 12 + 5 + 1
  assert hlo.shape_bytes("f32[]") == 4


def test_roofline_hand_worked():
  # 1e15 FLOPs at 5e14 FLOP/s = 2 s; 1e12 HBM bytes at 1e12 B/s = 1 s; 3e11 ICI bytes over fsdp at 1e11 B/s
  # = 3 s (the bound); 1e9 DCN bytes at 1e9 B/s = 1 s. MFU = 0.9e15 / (3 s * 5e14) = 0.6.
  r = roofline(flops_per_chip=1e15, model_flops_per_chip=0.9e15, hbm_bytes_per_chip=1e12,
               ici_bytes_by_axis={"fsdp": 3e11, "data": 0.0}, dcn_bytes=1e9, tokens_per_step=6000.0,
               num_chips=4, peak_flops=5e14, hbm_bw=1e12, ici_bw_by_axis={"fsdp": 1e11, "data": 1e11},
               dcn_bw=1e9)
  assert (r.compute_s, r.hbm_s, r.ici_s, r.dcn_s) == (2.0, 1.0, {"fsdp": 3.0, "data": 0.0}, 1.0)
  assert r.step_s == 3.0 and r.bound == "ici:fsdp" and r.serial_s == 7.0
  assert r.mfu == pytest.approx(0.6)
  assert r.tokens_per_s_per_chip == pytest.approx(6000 / 4 / 3)


def test_mesh_candidates_split_the_batch():
  c = mesh_candidates(16, 8, heads=4)
  assert c and all(d * f * t == 16 and ctx == 1 and 8 % (d * f) == 0 and 4 % t == 0 for d, f, ctx, t in c)
  assert (1, 8, 1, 2) in c and (2, 8, 1, 1) not in c    # 16 batch shards do not divide 8
  assert all(d % 2 == 0 for d, _, _, _ in mesh_candidates(16, 16, num_slices=2))


def _fake(step_s, fits, mesh):
  return {"mesh": dict(zip(("data", "fsdp", "tensor"), mesh)), "memory_per_chip": {"fits": fits},
          "roofline": {"step_s": step_s}}


def test_ranking_never_picks_a_plan_that_does_not_fit():
  plans = [_fake(0.5, False, (1, 4, 1)), _fake(1.0, True, (2, 2, 1)), _fake(0.8, True, (1, 2, 2)),
           {"error": "compile failed", "mesh_arg": "4,1,1"}]
  ranked = rank(plans)
  assert [r["roofline"]["step_s"] for r in ranked] == [0.8, 1.0]
  assert all(r["memory_per_chip"]["fits"] for r in ranked)
  failed = row(dict(plans[-1], topology="v5e:2x2", remat=None, frame_chunk=8))
  assert failed.startswith("| v5e:2x2 | 4,1,1 | config's | 8 | failed: compile failed |") and "None" not in failed


def test_optimizer_shardings_equal_optax_tree_map_params():
  from configs.quicksviewer import get_config
  from qv_jax.sharding import make_mesh
  from qv_jax.train.state import train_state_spec
  c = get_config("size=tiny,stage=3")
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  c = validate(c)
  abstract, spec = train_state_spec(c, make_mesh(c.mesh))
  rep = spec.shardings.step
  ref = optax.tree_map_params(spec.tx, lambda _, s: s, jax.eval_shape(spec.tx.init, abstract.params),
                              jax.tree.map(lambda x: x.sharding, abstract.params),
                              transform_non_params=lambda _: rep)
  assert jax.tree.structure(ref) == jax.tree.structure(spec.shardings.opt_state)
  assert jax.tree.leaves(ref) == jax.tree.leaves(spec.shardings.opt_state)
  assert any(s.spec != P() for s in jax.tree.leaves(ref))


def test_check_config_takes_the_targets_loading_groups():
  from configs.quicksviewer import get_config
  from qv_jax.sharding import make_mesh
  from qv_jax.train.loop import check_config
  c = get_config("size=tiny,stage=3")
  c.data.batch_size = 8
  mesh = make_mesh(c.mesh)
  check_config(c, mesh, groups=4)
  with pytest.raises(ConfigError, match="3 loading groups"):
    check_config(c, mesh, groups=3)


def test_topology_and_mesh_errors_name_the_flag():
  with pytest.raises(ConfigError, match="--topology.*unknown chip"):
    parse_topology("v9x:2x2")
  with pytest.raises(ConfigError, match="--topology.*expected"):
    parse_topology("v5e")
  assert parse_topology("v5p:4x4x8") == (CHIPS["v5p"], (4, 4, 8))


def test_cloud_accelerator_types_name_their_slices():
  """v5p types count TensorCores (2 per chip), v5e (v5litepod) and v6e types count chips."""
  from qv_jax.plan.target import accelerator_type, canonical_topology, display_name
  assert canonical_topology("v5p-256") == "v5p:4x4x8" and parse_topology("v5p-8") == (CHIPS["v5p"], (2, 2, 1))
  assert canonical_topology("v5litepod-16") == "v5e:4x4" and canonical_topology("v6e-8") == "v6e:2x4"
  assert canonical_topology("v5p:2x2x2") == "v5p:2x2x2"
  assert accelerator_type(CHIPS["v5p"], (4, 4, 8)) == "v5p-256" and accelerator_type(CHIPS["v5p"], (2, 2, 4)) == ""
  assert display_name("v5e:16x16") == "v5e:16x16 (v5litepod-256)" and display_name("v6e:1x1") == "v6e:1x1 (v6e-1)"
  for name in ("v5p-256", "v5p-1024", "v5litepod-4", "v6e-256"):
    chip, dims = parse_topology(name)
    assert accelerator_type(chip, dims) == name
  with pytest.raises(ConfigError, match="--topology.*'v5p-32': no default shape for 32 TensorCores"):
    parse_topology("v5p-32")
  with pytest.raises(ConfigError, match="--mesh.*6 chips.*has 4"):
    check_mesh_shape((2, 3, 1), 4)
  assert check_mesh_shape((1, -1, 2), 16) == (1, 8, 1, 2)           # data,fsdp,tensor: context 1
  assert check_mesh_shape((1, 2, -1, 2), 16) == (1, 2, 4, 2)        # data,fsdp,context,tensor


def test_without_libtpu_the_message_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)
  with pytest.raises(ConfigError, match=r"pip install -e '\.\[tpu\]'"):
    load_target("v5e:2x2")


@pytest.mark.parametrize("args,expected", [
    (["--topology", "v5e:2x2", "--mesh", "2,3,1"], "--mesh`: 2x3x1 = 6 chips, but the target has 4"),
    (["--topology", "v5e:2x2", "--mesh", "1,4,1", "--batch", "6"], "global batch 6 does not split"),
    (["--topology", "tpu9:2x2"], "--topology"),
    (["--topology", "v5p-32"], "no default shape for 32 TensorCores"),
    (["--topology", "v5litepod-4", "--mesh", "1,8,1"], "1x8x1 = 8 chips, but the target has 4"),
    (["--topology", "v5e:2x2", "--step", "prefill", "--pack", "2"], "--pack`: 2: packed rows take"),
])
def test_cli_bad_input_is_one_line_before_compiling(args, expected, tmp_path):
  out = subprocess.run([sys.executable, "-m", "launch.plan", "--config", "configs/quicksviewer.py:size=tiny,stage=3",
                        "--out", str(tmp_path)] + args, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  lines = [l for l in out.stderr.splitlines() if l.startswith("launch.plan:")]
  assert len(lines) == 1 and expected in lines[0], out.stderr[-2000:]
  assert "Traceback" not in out.stderr


def test_batch_splits_over_loading_groups_not_hosts():
  """Context and tensor chips on other hosts share rows: batch 64 on v5p:8x8x8's 128 hosts with a 1,64,4,2
  mesh is 64 loading groups (the study's strong row), and fsdp 2 x tensor 8 on v5e:4x4's 4 hosts is 2."""
  from launch import plan
  for argv in (["--topology", "v5p:8x8x8", "--mesh", "1,64,4,2", "--batch", "64"],
               ["--topology", "v5e:4x4", "--mesh", "1,2,8", "--batch", "2"]):
    args = plan.parse_args(["--config", "configs/quicksviewer.py:size=tiny,stage=3"] + argv)
    plan.check_loading_groups(plan.jobs_from(args, plan.load_config(args.config)))


def _packed_sample(sid: int, num_frames: int, length: int, bound: int, size: int) -> dict:
  return dict(frames=np.zeros((num_frames, size, size, 3), np.uint8), timestamps=np.zeros(num_frames, np.float32),
              input_ids=np.ones(length, np.int32), labels=np.ones(length, np.int32),
              token_frame=np.full(length, -1, np.int32), modality=1, sample_id=sid, merged_bound=bound)


def test_abstract_packed_batch_equals_the_collators_packed_batch():
  from configs.quicksviewer import get_config
  from data_pipeline.packing import PackedCollator
  from qv_jax.batch import BATCH_KEYS, PACKED_KEYS
  from qv_jax.plan.train_plan import apply_overrides
  from qv_jax.sharding import make_mesh
  from qv_jax.train.compile import abstract_batch
  c = get_config("size=tiny,stage=3")
  c = apply_overrides(c, batch=4, frames=8, mesh_shape=(2, 2, 2))
  mesh = make_mesh(c.mesh)
  assert tuple(abstract_batch(c, mesh)) == BATCH_KEYS
  c = apply_overrides(c, pack=3, seq_len=96)
  assert tuple(c.data.seq_buckets) == (96,) and c.data.pack_samples == 3
  collate = PackedCollator(image_size=c.data.image_size, max_text_len=c.data.max_text_len, frame_buckets=(8,),
                           seq_buckets=(48, 96), slots=3, pad_id=0, normalize_on_host=False)
  s = c.data.image_size
  rows = [[_packed_sample(3 * i + j, 5 + j, 20, 30, s) for j in range(3 - i % 2)] for i in range(4)]
  real = collate(rows)
  abstract = abstract_batch(c, mesh)
  assert tuple(abstract) == tuple(real) == PACKED_KEYS
  assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {k: (v.shape, v.dtype) for k, v in real.items()}
  assert abstract["frames"].shape == (4, 3, 8, s, s, 3) and abstract["segment_ids"].shape == (4, 96)
  for k, v in abstract.items():
    assert v.sharding.spec[0] == ("data", "fsdp"), k
  assert abstract_batch(c, mesh, seq_len=48)["segment_ids"].shape == (4, 48)


def test_jaxpr_flops_count_every_device_of_a_shard_map():
  from jax.sharding import Mesh
  from qv_jax.train.flops import matmul_flops
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
  x, w = jax.ShapeDtypeStruct((64, 16), jnp.float32), jax.ShapeDtypeStruct((16, 4), jnp.float32)
  sm = jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(P(("a", "b")), P()), out_specs=P(("a", "b")))
  assert matmul_flops(sm, x, w) == matmul_flops(lambda x, w: x @ w, x, w) == 2 * 64 * 16 * 4


def test_compile_failure_keeps_xla_detail():
  """A failed compile: one line in `error`, the rest of XLA's message (e.g. its largest allocations) kept."""
  from qv_jax.plan.train_plan import error_detail, plan_error
  e = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in HBM\n\n  Largest program allocations:\n"
                   "  1. Size: 2.1G\n")
  assert plan_error(e) == "RuntimeError: RESOURCE_EXHAUSTED: Ran out of memory in HBM"
  assert error_detail(e) == ["  Largest program allocations:", "  1. Size: 2.1G"]
  assert error_detail(RuntimeError("one line")) == []
  assert len(error_detail(RuntimeError("x\n" + "\n".join(["y"] * 100)), max_lines=5)) == 5


def test_study_rows_with_an_experiment_config():
  """Study rows may name an experiment config (configs/lowmem.py); each row has a file of its own."""
  from launch import plan, plan_study
  from qv_jax.config import validate
  rows = plan_study.rows()
  assert len({plan_study.row_path(r) for r in rows}) == len(rows)
  lowmem = [r for r in rows if r.get("config")]
  assert lowmem and all(plan_study.row_path(r).endswith("_lowmem.json") for r in lowmem)
  assert plan_study._matches(lowmem[0], "qwen2_7b:v5e:8x8:one-video")
  assert not plan_study._matches(lowmem[0], "qwen2_7b:v5e:8x8:weak")
  c = validate(plan.load_config(f"{plan_study.LOWMEM}:size=qwen2_7b,stage=3"))
  assert c.model.compressor.save_scores is False and c.train.ce_chunk == 512


def test_study_inference_table_says_which_runtime_serves_a_question():
  from launch.plan_study_doc import _inference_table
  fit = dict(mesh=dict(data=1, fsdp=4, context=1, tensor=1), memory_per_chip=dict(total_bytes=10 * 2 ** 30,
             hbm_bytes=16 * 2 ** 30, fits=True), roofline=dict(step_s=4.0, bound="hbm"))
  oom = dict(mesh=[1, 1, 1, 1], error="JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM")
  row = dict(size="qwen2_7b", batch=1, scaling="inference", step="prefill")
  lines = _inference_table([(dict(row, topology="v5e:2x2"), dict(plans=[fit])),
                            (dict(row, topology="v5e:1x1"), dict(plans=[oom])),
                            (dict(row, topology="v6e:2x4"), None),
                            (dict(row, topology="v5p:2x2x2", scaling="weak"), dict(plans=[fit]))])
  assert lines[2] == "| v5e-4 | 4 | 1,4,1 | 10.0 / 16 GiB | 4.00 s (hbm) | yes |"
  assert lines[3].startswith("| v5e-1 | 1 | | | | no: JaxRuntimeError: RESOURCE_EXHAUSTED")
  assert lines[4] == "| v6e-8 | 8 | | | | to run |" and len(lines) == 6

"""The converter for every compressor kind: a tiny reference-layout checkpoint converted for each kind maps
the same tensors to the same params, and a kind's own params (score_gating's policy) are written from
its initialisation and reported as "initialised, not in the checkpoint"."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs.quicksviewer import get_config
from qv_jax.config import validate
from qv_jax.convert.compressor_map import kind_only_shapes
from qv_jax.convert.readers import SafetensorsReader
from qv_jax.convert.stream import convert_tensors
from qv_jax.convert.writer import ParamWriter, flatten, load_converted, write_metadata
from qv_jax.model.compressors.registry import KINDS, build_compressor
from qv_jax.model.quicksviewer import Quicksviewer
from test_convert_quicksviewer import qv_config_json, quicksviewer_state_dict, save_sharded


def kind_config(kind):
  c = get_config("size=tiny")
  c.model.compressor.kind = kind
  return validate(c)


def run(reader, config):
  out = {}
  report = convert_tensors(reader, "quicksviewer", config.model, out.__setitem__, progress=False)
  return report, out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  sd, _, _ = quicksviewer_state_dict(seed=3)
  reader = SafetensorsReader(save_sharded(sd, tmp_path_factory.mktemp("qv_kinds"), qv_config_json()))
  report, params = run(reader, kind_config("cubing"))
  yield sd, reader, report, params
  reader.close()


def test_cubing_maps_the_reference_tensors(reference):
  sd, _, report, params = reference
  assert report.initialised == {}
  np.testing.assert_array_equal(params["compressor/resampler/query"], sd["model.vision_resampler.query"].numpy())
  np.testing.assert_array_equal(params["compressor/cubing/agg/kernel"],
                                sd["model.cubing.agg_frame_fn.0.weight"].numpy().T)


@pytest.mark.slow
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "cubing"])
def test_each_kind_maps_what_the_reference_has_and_initialises_the_rest(reference, kind, tmp_path):
  _, reader, cubing_report, cubing_params = reference
  config = kind_config(kind)
  report, params = run(reader, config)
  assert report.mapped == cubing_report.mapped
  own = {f"compressor/{p}": s for p, s in kind_only_shapes(config.model).items()}
  assert set(params) == set(cubing_params) | set(own)
  for path, value in cubing_params.items():
    np.testing.assert_array_equal(params[path], value, err_msg=path)
  assert report.initialised == own
  if kind == "score_gating":
    assert own and all(p.startswith("compressor/policy/") for p in own)
    assert "initialised, not in the checkpoint: compressor/policy/" in report.summary()
    fresh = flatten(nnx.to_pure_dict(nnx.state(build_compressor(config.model.compressor, rngs=nnx.Rngs(0)))))
    for path in own:
      np.testing.assert_allclose(params[path], np.asarray(fresh[path[len("compressor/"):]]), err_msg=path)
  else:
    assert own == {} and "initialised" not in report.summary()
  # the output holds every param of the kind's whole model: it loads strictly
  writer = ParamWriter(tmp_path / "out", flush_bytes=1 << 16)
  for path, value in params.items():
    writer.add(path, value)
  writer.finalize()
  write_metadata(tmp_path / "out", config, {"params": {p: [list(s), d] for p, (s, d) in writer.written.items()}})
  abstract = nnx.state(nnx.eval_shape(lambda: Quicksviewer(config.model, max_seq_len=config.data.max_seq_len, rngs=nnx.Rngs(0))))
  _, state = load_converted(tmp_path / "out", abstract, strict=True)
  loaded = flatten(nnx.to_pure_dict(state))
  np.testing.assert_array_equal(np.asarray(jax.device_get(loaded["compressor/resampler/query"])),
                                cubing_params["compressor/resampler/query"])

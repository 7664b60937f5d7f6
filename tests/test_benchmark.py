"""The benchmark's table logic (`subq_jax.benchmark`): targets and relative errors."""

import numpy as np
import pytest

from subq_jax import benchmark

M = 1024 * 1024


def _results(lengths, dense_upto):
  """Rows with made-up times: SSA linear in T, dense quadratic, FA2 1.6x cuDNN."""
  rows = []
  for t in lengths:
    for mode, k in (("fwd", 1.0), ("fwdbwd", 3.0)):
      rows.append(dict(row="ssa", seq_len=t, mode=mode, time_s=k * 0.3 * t / M))
      rows.append(dict(row="ssa_attention", seq_len=t, mode=mode, time_s=k * 0.28 * t / M))
      if t <= dense_upto:
        rows.append(dict(row="dense_cudnn", seq_len=t, mode=mode, time_s=k * 18.0 * (t / M) ** 2))
        rows.append(dict(row="fa2_torch", seq_len=t, mode=mode, time_s=k * 29.0 * (t / M) ** 2))
    rows.append(dict(row="ssa_selector", seq_len=t, mode="fwd", time_s=0.015 * t / M))
  benchmark.add_flops(rows)
  return dict(rows=rows, matmul_tflops=600.0)


def test_targets_at_1m_are_measured_not_extrapolated():
  text = benchmark.format_table(_results([128 * 1024, M, 2 * M], dense_upto=M))
  targets = text.split("targets")[1]
  assert "1M fwd ssa vs dense_cudnn: 60.0x" in targets
  assert "1M fwd ssa vs fa2_torch: 96.7x" in targets
  assert "1M fwdbwd ssa vs dense_cudnn: 60.0x" in targets
  assert "1M selector share of ssa fwd: 5.0%" in targets
  assert "ssa fwd 128K -> 1M: 8.00x" in targets
  assert "extrapolated" not in targets and "2M" not in targets


def test_targets_extrapolate_when_dense_stops_short():
  text = benchmark.format_table(_results([128 * 1024, 512 * 1024, M], dense_upto=512 * 1024))
  targets = text.split("targets")[1]
  assert "dense_cudnn extrapolated from 512K" in targets
  x = float(targets.split("1M fwd ssa vs dense_cudnn: ")[1].split("x")[0])
  assert x == pytest.approx(60.0, rel=0.01)  # causal pairs grow a little under 4x


def test_fwdbwd_only_table_names_the_coarse_cost_and_plots(tmp_path):
  rows = []
  for t, ssa_ms, coarse_ms in ((8192, 6.0, 7.5), (32768, 40.0, 64.0)):
    rows.append(dict(row="ssa", seq_len=t, mode="fwdbwd", time_s=ssa_ms / 1e3))
    rows.append(dict(row="ssa_coarse", seq_len=t, mode="fwdbwd", time_s=coarse_ms / 1e3))
  benchmark.add_flops(rows)
  results = dict(rows=rows, matmul_tflops=600.0, meta=dict(device="test"))
  text = benchmark.format_table(results)
  assert "no ssa fwd row was measured" in text
  assert "ssa_coarse / ssa, fwdbwd (the coarse branch's cost): 8K 1.25x, 32K 1.60x" in text
  benchmark.plot(results, str(tmp_path / "b.png"))
  assert (tmp_path / "b.png").stat().st_size > 0


def test_table_names_the_far_split_cost_per_mode():
  rows = []
  for t, mode, ssa_ms, far_ms in ((8192, "fwd", 2.0, 2.5), (8192, "fwdbwd", 6.0, 9.0)):
    rows.append(dict(row="ssa", seq_len=t, mode=mode, time_s=ssa_ms / 1e3))
    rows.append(dict(row="ssa_far", seq_len=t, mode=mode, time_s=far_ms / 1e3))
  text = benchmark.format_table(dict(rows=rows, matmul_tflops=600.0))
  assert "ssa_far / ssa, fwd (far and near blocks in two calls): 8K 1.25x" in text
  assert "ssa_far / ssa, fwdbwd (far and near blocks in two calls): 8K 1.50x" in text


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rel_err_matches_numpy(dtype):
  import jax.numpy as jnp

  rng = np.random.default_rng(0)
  ref = rng.standard_normal((3, 50, 7)).astype(np.float32)
  x = ref + 0.01 * rng.standard_normal(ref.shape).astype(np.float32)
  a, b = jnp.asarray(x, dtype), jnp.asarray(ref, dtype)
  want = np.linalg.norm(np.float32(a) - np.float32(b)) / np.linalg.norm(np.float32(b))
  assert benchmark._rel_err(a, b) == pytest.approx(want, rel=1e-5)

"""Communication accounting (`subq_jax.comm`) against what `seq_parallel` does."""

from __future__ import annotations

import pytest

from subq_jax import comm, flops, seq_parallel

HEADS = flops.HeadConfig()


@pytest.mark.parametrize("shards", [1, 2, 8])
def test_dense_ring_bytes(shards):
  t = 2**16
  c = comm.comm_cost(t, shards, HEADS, flops.benchmark_config("dense"))
  chunk = 2 * (t // shards) * HEADS.kv_heads * HEADS.head_dim * 2
  assert c.kv_chunk == chunk
  assert c.sent_forward == (shards - 1) * chunk
  assert c.sent_backward == ((2 * shards - 1) * chunk if shards > 1 else 0)
  assert (c.flops_per_byte is None) == (shards == 1)


def test_ssa_adds_summaries_and_halo():
  t, p = 2**20, 8
  ssa, dense = (comm.comm_cost(t, p, HEADS, flops.benchmark_config(k)) for k in ("ssa", "dense"))
  assert ssa.sent_backward == dense.sent_backward  # selection has no backward
  assert ssa.sent_forward > dense.sent_forward
  assert ssa.summaries_held < ssa.kv_chunk  # O(T/B) summaries, far below O(T/P) K/V
  zigzag = comm.comm_cost(t, p, HEADS, flops.benchmark_config("ssa"), layout="zigzag")
  assert zigzag.sent_forward < ssa.sent_forward  # striped ships every block's tail


@pytest.mark.parametrize("layout", ["striped", "zigzag", "contiguous"])
@pytest.mark.parametrize("shards", [2, 4])
def test_halo_count_matches_plan(layout, shards):
  n_local = 8
  _, sends, _ = seq_parallel._halo_plan(n_local * shards, shards, layout)
  assert sum(len(s) for s in sends) == comm.halo_blocks_sent(layout, shards, n_local)


def test_all_to_all_saves_nothing_at_benchmark_budget():
  config = flops.benchmark_config("ssa")
  assert comm.requested_fraction(2**20, 8, config) > 0.999

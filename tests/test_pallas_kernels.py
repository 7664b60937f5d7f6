"""Pallas GPU kernels (selector scoring, sparse attention forward and backward) against
their plain-JAX references.

`PallasKernelsTest` runs the kernels compiled and needs a GPU (skipped, visibly,
elsewhere); `PallasKernelsInterpretTest` runs the same tests in the Pallas interpreter
on any backend, which is how CI checks them. Shapes are tiny so the interpreter stays
cheap on 2 CPU cores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.selector import pallas_gpu as selector_pallas
from pallas_kernels.selector import reference as selector_reference
from pallas_kernels.sparse_attention import index
from pallas_kernels.sparse_attention import mosaic_gpu as attention_mosaic
from pallas_kernels.sparse_attention import pallas_gpu as attention_pallas
from pallas_kernels.sparse_attention import reference as attention_reference
from subq_jax import ssa
from subq_jax.config import SSAConfig

# Relative error ||x - ref|| / ||ref|| allowed, by dtype (bf16 operands, f32 accumulation).
RTOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
RTOL_GPU_F32 = 2e-3  # compiled: exp2 and reassociated sums, still IEEE matmuls


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def _random_block_ids(
  rng, b, hkv, num_tiles, slots, block_size, query_tile, num_blocks, structured=False
):
  """Each tile: usually its own block, distinct random other blocks (some after the tile,
  which must contribute nothing), -1 slots; shuffled (the kernel may not rely on order).
  Some tiles lack their own block (a shard's partial list) and some list nothing: their
  queries may see no key at all (out = 0, lse = -inf). `structured`: as SSA lists them,
  every tile lists the sink block 0, the block before its own and its own (the sink's
  CSR row is as long as the sequence has tiles), random blocks in the other slots."""
  ids = np.full((b, hkv, num_tiles, slots), -1, np.int32)
  for bi in range(b):
    for hi in range(hkv):
      for t in range(num_tiles):
        own = t * query_tile // block_size
        fixed = sorted({0, max(own - 1, 0), own}) if structured else []
        others = [j for j in range(num_blocks) if j != own and j not in fixed]
        room = slots - len(fixed) if structured else slots - 1
        n = rng.integers(0, min(room, len(others)) + 1)
        row = list(rng.choice(others, size=n, replace=False)) if n else []
        if structured:
          row += fixed
        elif rng.random() < 0.8:
          row.append(own)
        row = np.array(row + [-1] * (slots - len(row)), np.int32)
        ids[bi, hi, t] = rng.permutation(row)
  return jnp.asarray(ids)


def _compile(fn, *args):
  """jit + compile; on CPU with XLA's backend optimisations off (the interpreted kernels
  compile 3x faster and run in milliseconds either way)."""
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
  return jax.jit(fn).lower(*args).compile(options)


def _pad_seq(x, multiple, fill):
  pad = -x.shape[1] % multiple
  return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)), constant_values=fill) if pad else x


ATTENTION_CASES = [
  # (seq_len, q_heads, kv_heads, head_dim, block_size, query_tile, dtype, block_m, opts,
  #  structured): opts are BlockSizes fields: dkv_chunk > 0 splits each block's CSR row
  # into segments (f32 partial sums for the blocks with several), split_heads_over_4gib
  # runs the passes one KV head at a time (as for operands over 4 GiB), dkv_unroll chunks
  # of block_m rows per dk/dv loop step (0: a whole tile), fwd_fold_scale=False the
  # forward that scales the logits before the max.
  # structured: SSA-like lists (sink, local and own block in every tile's list).
  pytest.param(
    100, 2, 2, 64, 32, 16, jnp.float32, 64,
    dict(dkv_chunk=2, split_heads_over_4gib=True), False,
    id="gqa1-d64-f32-padded-chunk2-byhead",
  ),
  pytest.param(64, 4, 1, 128, 16, 16, jnp.bfloat16, 32, dict(dkv_unroll=0, fwd_fold_scale=False),
               False, id="gqa4-d128-bf16-unroll-tile-unfolded"),
  pytest.param(
    60, 8, 1, 64, 16, 8, jnp.bfloat16, 32, dict(dkv_chunk=1), False,
    id="gqa8-d64-bf16-padded-split-chunk1",
  ),
  # Sink-heavy: all 16 tiles list block 0 (rows of 16 entries cut into segments of 5, the
  # last one shorter), two 16-row chunks of a tile per tile; a block's diagonal tiles and
  # its later tiles in different segments. (Rows >= 16: Triton's smallest matmul.)
  pytest.param(
    128, 8, 2, 64, 16, 8, jnp.bfloat16, 16, dict(dkv_chunk=5, dkv_unroll=1), True,
    id="gqa4-d64-bf16-sink-chunk5",
  ),
]  # fmt: skip


class PallasKernelsTest:
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _backend(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip("compiled Pallas GPU kernels need a GPU; the interpret-mode class runs here")

  def _rtol(self, dtype):
    if dtype == jnp.float32 and not self.INTERPRET:
      return RTOL_GPU_F32
    return RTOL[dtype]

  @pytest.mark.parametrize(
    "t, hq, hkv, d, bs, qt, dtype, block_m, opts, structured", ATTENTION_CASES
  )
  def test_sparse_attention(
    self, t, hq, hkv, d, bs, qt, dtype, block_m, opts, structured, monkeypatch
  ):
    if opts.get("split_heads_over_4gib"):
      monkeypatch.setattr(attention_pallas, "_INT32_BYTES", 0)
    rng = np.random.default_rng([t, hq, hkv, d])
    b = 2 if hkv == 1 else 1
    q = jnp.asarray(rng.standard_normal((b, t, hq, d)), dtype)
    k = jnp.asarray(rng.standard_normal((b, t, hkv, d)), dtype)
    v = jnp.asarray(rng.standard_normal((b, t, hkv, d)), dtype)
    # Padded as ssa_attention pads: T up to a multiple of the block. Large values in the
    # padding would show if a real query ever saw a padded key.
    qp, kp, vp = (_pad_seq(x, bs, 30.0) for x in (q, k, v))
    tp = qp.shape[1]
    slots = 4
    ids = _random_block_ids(rng, b, hkv, tp // qt, slots, bs, qt, tp // bs, structured)
    sizes = attention_pallas.BlockSizes(
      block_m=block_m, block_m_dq=block_m, block_m_dkv=block_m, **opts
    )
    kw = dict(block_size=bs, query_tile=qt, scale=d**-0.5)
    w_out = jnp.asarray(rng.standard_normal((b, t, hq, d)), jnp.float32)
    w_lse = jnp.asarray(rng.standard_normal((b, hq, t)), jnp.float32)

    def run(attention):
      def loss(q, k, v):
        qp, kp, vp = (_pad_seq(x, bs, 30.0) for x in (q, k, v))
        out, lse = attention(qp, kp, vp)
        out, lse = out[:, :t], lse[..., :t]
        finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        value = jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(finite_lse * w_lse)
        return value, (out, lse)

      grad_fn = _compile(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), q, k, v)
      # Poison: a run on NaN inputs first leaves NaN in the buffers the allocator hands
      # the real run's outputs, so an element the kernels never write stays non-finite.
      nan = lambda x: jnp.full_like(x, jnp.nan)
      jax.block_until_ready(grad_fn(nan(q), nan(k), nan(v)))
      grads, (out, lse) = grad_fn(q, k, v)
      return out, lse, grads

    with jax.numpy_rank_promotion("raise"):  # the kernels' code; the reference allows it
      out, lse, grads = run(
        lambda q, k, v: attention_pallas.sparse_attention_pallas(
          q, k, v, ids, block_sizes=sizes, interpret=self.INTERPRET, **kw
        )
      )
    f32 = lambda x: x.astype(jnp.float32)
    ref_out, ref_lse, ref_grads = run(
      lambda q, k, v: attention_reference.sparse_attention(f32(q), f32(k), f32(v), ids, **kw)
    )
    assert out.dtype == dtype and out.shape == (b, t, hq, d)
    assert lse.dtype == jnp.float32 and lse.shape == (b, hq, t)
    for name, x in (("out", out), ("dq", grads[0]), ("dk", grads[1]), ("dv", grads[2])):
      assert bool(jnp.all(jnp.isfinite(x))), f"{name} has non-finite (unwritten?) elements"
    # lse is -inf exactly where the query sees no key, finite everywhere else.
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    assert bool(jnp.all(jnp.isfinite(lse) | jnp.isneginf(ref_lse)))
    rtol = self._rtol(dtype)
    assert _rel_err(out, ref_out) < rtol
    np.testing.assert_allclose(lse, ref_lse, atol=max(rtol, 1e-5) * 10)
    for name, x, ref in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
      assert x.dtype == dtype
      assert _rel_err(x, ref) < 2 * rtol, name

  @pytest.mark.parametrize(
    "t, hq, hkv, d, bs, spec, structured",
    [
      (100, 2, 2, 64, 64, "w2/s2", False),  # GQA 1: one consumer per program; padded T
      (256, 8, 2, 128, 64, "w2/s2", True),  # GQA 4: two programs of two heads per tile
      (200, 8, 1, 64, 128, "w4/s3/nosched", False),  # GQA 8, blocks of 128; padded T
      (256, 8, 1, 128, 64, "w2/s3", False),  # GQA 8, four programs per tile
    ],
  )
  def test_mosaic_forward(self, t, hq, hkv, d, bs, spec, structured, monkeypatch):
    """The Mosaic GPU forward (queries tiles of 64, bf16) against the f32 reference; the
    `fwd_kernel="mosaic"` switch of `sparse_attention_pallas` (Triton backward) too.
    The four-consumer case runs the grid order of sequences over 65,535 tile groups."""
    if spec.startswith("w4"):
      monkeypatch.setattr(attention_mosaic, "MAX_GRID_Z", 1)
    rng = np.random.default_rng([t, hq, hkv, d, bs])
    b, qt = (2 if hkv == 1 else 1), 64
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16) for h in (hq, hkv, hkv))
    qp, kp, vp = (_pad_seq(x, bs, 30.0) for x in (q, k, v))
    tp = qp.shape[1]
    ids = _random_block_ids(rng, b, hkv, tp // qt, 4, bs, qt, tp // bs, structured)
    compact = index.compact_block_lists(ids, block_size=bs, query_tile=qt)
    kw = dict(block_size=bs, query_tile=qt, scale=d**-0.5)
    sizes = attention_mosaic.BlockSizes.from_spec(spec)
    fwd = _compile(
      lambda q, k, v: attention_mosaic.forward(
        q, k, v, compact, bs, qt, d**-0.5, sizes, interpret=self.INTERPRET
      ),
      qp, kp, vp,
    )  # fmt: skip
    # Poison: a run on NaN inputs leaves NaN where the real run's outputs will be.
    jax.block_until_ready(fwd(*(jnp.full_like(x, jnp.nan) for x in (qp, kp, vp))))
    out, lse = fwd(qp, kp, vp)
    out, lse = out[:, :t], lse[..., :t]
    f32 = lambda x: x.astype(jnp.float32)
    ref_out, ref_lse = attention_reference.sparse_attention(f32(qp), f32(kp), f32(vp), ids, **kw)
    ref_out, ref_lse = ref_out[:, :t], ref_lse[..., :t]
    assert out.dtype == jnp.bfloat16 and lse.shape == (b, hq, t)
    assert bool(jnp.all(jnp.isfinite(out))), "out has non-finite (unwritten?) elements"
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    assert bool(jnp.all(jnp.isfinite(lse) | jnp.isneginf(ref_lse)))
    assert _rel_err(out, ref_out) < RTOL[jnp.bfloat16]
    np.testing.assert_allclose(lse, ref_lse, atol=RTOL[jnp.bfloat16] * 10)
    # Through the public entry point, with gradients from the Triton backward. Interpreted,
    # only with one consumer: with two, the kernel inside the gradient's graph hung in
    # the interpreter's barrier callbacks on 2 CPU cores (the same kernel alone passes).
    if spec != "w2/s2" or (self.INTERPRET and hq != hkv):
      return
    sizes = attention_pallas.BlockSizes(fwd_kernel="mosaic")
    attend = lambda q, k, v, sizes: attention_pallas.sparse_attention_pallas(
      q, k, v, ids, block_sizes=sizes, interpret=self.INTERPRET, **kw
    )
    loss = lambda q, k, v, sizes: jnp.sum(f32(attend(q, k, v, sizes)[0]) ** 2)
    grads = _compile(jax.grad(lambda *a: loss(*a, sizes), argnums=(0, 1, 2)), qp, kp, vp)(
      qp, kp, vp
    )
    want = jax.grad(lambda *a: loss(*a, None), argnums=(0, 1, 2))(qp, kp, vp)
    for name, x, ref in zip(("dq", "dk", "dv"), grads, want, strict=True):
      assert _rel_err(x, ref) < 2 * RTOL[jnp.bfloat16], name

  def test_transposed_index(self):
    rng = np.random.default_rng(7)
    b, hkv, num_tiles, slots, bs, qt = 1, 2, 8, 3, 8, 4
    ids = _random_block_ids(rng, b, hkv, num_tiles, slots, bs, qt, num_tiles * qt // bs)
    with jax.numpy_rank_promotion("raise"):
      compact = index.compact_block_lists(ids, block_size=bs, query_tile=qt)
    assert compact.shape[-1] == 4  # padded to a power of two
    num_blocks = num_tiles * qt // bs
    with jax.numpy_rank_promotion("raise"):
      tiles_sorted, meta = index.transpose_block_lists(
        compact, num_blocks=num_blocks, block_size=bs, query_tile=qt
      )
    ids, tiles_sorted, meta = np.asarray(ids), np.asarray(tiles_sorted), np.asarray(meta)
    for bi in range(b):
      for hi in range(hkv):
        for j in range(num_blocks):
          start, diag_end, end, _ = meta[bi, hi, j].tolist()
          want = [t for t in range(num_tiles) if j in ids[bi, hi, t] and j <= t * qt // bs]
          assert tiles_sorted[bi, hi, start:end].tolist() == want
          assert diag_end - start == sum(t * qt // bs == j for t in want)
    # Segments of at most 2 entries cover every CSR row exactly, in order; a block with
    # one segment writes directly, the others own distinct partial slots of one group.
    entries = tiles_sorted.shape[-1]
    seg, slot_group, group_block = (
      np.asarray(x)
      for x in index.segment_block_lists(jnp.asarray(meta), entries=entries, segment=2)
    )
    num_slots = slot_group.shape[-1]
    assert seg.shape[2] == num_blocks + entries // 2 and num_slots == entries
    for bi in range(b):
      for hi in range(hkv):
        for j in range(num_blocks):
          start, diag_end, end, _ = meta[bi, hi, j].tolist()
          mine = seg[bi, hi][seg[bi, hi, :, 3] == j]
          assert len(mine) == max(1, -(-(end - start) // 2))
          assert all(c_end - c_start <= 2 for c_start, _, c_end, _, _ in mine)
          covered = [e for c_start, _, c_end, _, _ in mine for e in range(c_start, c_end)]
          assert covered == list(range(start, end))
          masked = [e for c_start, c_diag, _, _, _ in mine for e in range(c_start, c_diag)]
          assert masked == list(range(start, diag_end))
          slots = mine[:, 4]
          if len(mine) == 1:
            assert slots.tolist() == [-1]
          else:
            assert np.all(slots >= 0) and len(set(slots.tolist())) == len(slots)
            groups = set(slot_group[bi, hi, slots].tolist())
            assert len(groups) == 1 and group_block[bi, hi, groups.pop()] == j
        unused = seg[bi, hi][seg[bi, hi, :, 3] == num_blocks]
        assert np.all(unused[:, :3] == 0) and np.all(unused[:, 4] == -1)
        used_slots = seg[bi, hi, :, 4][seg[bi, hi, :, 4] >= 0]
        free = np.setdiff1d(np.arange(num_slots), used_slots)
        assert np.all(slot_group[bi, hi, free] == num_slots)

  def test_pack_runs(self):
    """SSA's runs (sinks, chosen, local, own) packed without a sort equal the sorted
    compaction, including the first tiles (few or no valid sinks, chosen, local blocks)
    and padding tiles that chose nothing."""
    config = SSAConfig(
      kind="ssa", block_size=16, query_tile=8, sink_blocks=2, local_blocks=2, top_k=5
    )
    rng = np.random.default_rng(3)
    b, hkv, num_tiles = 1, 2, 24
    j0 = np.arange(num_tiles) * config.tile // config.block_size
    prefix = np.maximum(j0 - config.local_blocks, 0)
    selected = np.full((b, hkv, num_tiles, config.top_k), -1, np.int32)
    for hi in range(hkv):
      for i in range(num_tiles - 2):  # the last two tiles: padding, nothing chosen
        pool = np.arange(config.sink_blocks, prefix[i])
        n = rng.integers(0, min(config.top_k, len(pool)) + 1) if len(pool) else 0
        selected[0, hi, i, :n] = np.sort(rng.choice(pool, size=n, replace=False))
    selected = jnp.asarray(selected)
    runs, lists = ssa._slot_runs(selected, config), ssa._slot_list(selected, config)
    with jax.numpy_rank_promotion("raise"):  # pack_runs is kernel-side code
      packed = index.pack_runs(runs)
      want = index.compact_block_lists(lists, block_size=config.block_size, query_tile=config.tile)
    assert packed.shape == want.shape == (b, hkv, num_tiles, 16)
    np.testing.assert_array_equal(np.asarray(packed), np.asarray(want))

  def test_select_whole_top_levels(self):
    """The Pallas selector path (candidate pieces, the top tree levels scored whole in
    one pass) chooses what the xla path chooses: three levels of 4, 16 and 64 nodes,
    the top two scored together."""
    config = SSAConfig(
      kind="ssa", block_size=16, query_tile=16, top_k=3, fanout=4, beam=2, sink_blocks=1
    )
    rng = np.random.default_rng(11)
    t, hq, hkv, d = 1024, 4, 2, 32
    rq = jnp.asarray(rng.standard_normal((1, t, hq, d)), jnp.float32)
    rk = jnp.asarray(rng.standard_normal((1, t, hkv, d)), jnp.float32)
    assert config.num_levels(t // config.block_size) == 3
    select = lambda impl: ssa._select(rq, rk, config, t, impl)
    sel, want = select("pallas"), select("xla")
    assert int((want >= 0).sum()) > 0
    np.testing.assert_array_equal(np.asarray(sel), np.asarray(want))

  @pytest.mark.parametrize(
    "r, d, c, dtype",
    [(12, 40, 10, jnp.float32), (64, 128, 20, jnp.bfloat16), (256, 32, 33, jnp.float32)],
  )
  def test_score_candidates(self, r, d, c, dtype):
    rng = np.random.default_rng([r, d, c])
    b, h, num_tiles, nodes = 1, 2, 3, 40
    rows = jnp.asarray(rng.standard_normal((b, h, num_tiles, r, d)), dtype)
    table = jnp.asarray(rng.standard_normal((b, h, nodes, d)), dtype)
    candidates = jnp.asarray(rng.integers(-1, nodes, (b, h, num_tiles, c)), jnp.int32)
    with jax.numpy_rank_promotion("raise"):
      score = lambda *a: selector_pallas.score_candidates_pallas(*a, interpret=self.INTERPRET)
      scores = _compile(score, rows, table, candidates)(rows, table, candidates)
    ref = selector_reference.score_candidates(rows, table, candidates)
    empty = np.asarray(candidates < 0)
    assert scores.shape == ref.shape and scores.dtype == jnp.float32
    assert np.all(np.isneginf(np.asarray(scores)[empty]))
    assert np.all(np.isfinite(np.asarray(scores)[~empty]))
    tol = 1e-4 if dtype == jnp.float32 else 1e-2  # bf16 products are exact in f32
    np.testing.assert_allclose(
      np.asarray(scores)[~empty], np.asarray(ref)[~empty], rtol=tol, atol=tol * np.sqrt(d)
    )

  @pytest.mark.parametrize(
    "summary, hq, hkv, dtype, c, table_dtype",
    [
      ("mean", 8, 2, jnp.float32, 20, jnp.float32),
      ("bounds", 4, 4, jnp.float32, 40, jnp.float32),  # two candidate pieces: 32 + 16
      ("bounds", 8, 1, jnp.bfloat16, 20, jnp.bfloat16),
      ("mean", 8, 2, jnp.bfloat16, 50, jnp.float32),  # f32 table, bf16 products; 64 + 16
    ],
  )
  def test_score_candidates_from_queries(self, summary, hq, hkv, dtype, c, table_dtype):
    rng = np.random.default_rng([hq, hkv, len(summary), c])
    b, t, d, qt, nodes = 1, 64, 32, 16, 12
    num_tiles, g = t // qt, hq // hkv
    q = jnp.asarray(rng.standard_normal((b, t, hq, d)), dtype)
    dt = 2 * d if summary == "bounds" else d
    table = jnp.asarray(rng.standard_normal((b, hkv, nodes, dt)), table_dtype)
    candidates = jnp.asarray(rng.integers(-1, nodes, (b, hkv, num_tiles, c)), jnp.int32)
    with jax.numpy_rank_promotion("raise"):
      score = lambda q, table, cand: selector_pallas.score_candidates_from_queries_pallas(
        q, table, cand, query_tile=qt, summary=summary, interpret=self.INTERPRET
      )
      scores = _compile(score, q, table, candidates)(q, table, candidates)
    # The rows SSA routes with: positions [i*Q - Q + 1, i*Q], clamped at 0.
    pos = np.maximum(np.arange(num_tiles)[:, None] * qt - qt + 1 + np.arange(qt), 0)
    rows = q[:, pos.reshape(-1)].reshape(b, num_tiles, qt, hkv, g, d).astype(jnp.float32)
    rows = rows.transpose(0, 3, 1, 2, 4, 5).reshape(b, hkv, num_tiles, qt * g, d)
    if summary == "bounds":
      rows = jnp.concatenate([jnp.maximum(rows, 0), jnp.minimum(rows, 0)], axis=-1)
    ref = selector_reference.score_candidates(rows, table.astype(jnp.float32), candidates)
    empty = np.asarray(candidates < 0)
    assert np.all(np.isneginf(np.asarray(scores)[empty]))
    tol = 1e-4 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(
      np.asarray(scores)[~empty], np.asarray(ref)[~empty], rtol=tol, atol=tol * np.sqrt(dt)
    )


class TestPallasKernelsCompiled(PallasKernelsTest):
  INTERPRET = False


class TestPallasKernelsInterpret(PallasKernelsTest):
  INTERPRET = True


@pytest.mark.parametrize("wgs", [1, 2, 3, 4])
def test_mosaic_register_split(wgs):
  """setmaxnreg counts fit what the program launches with (a program's threads times
  at most 65,536 / threads registers each, a multiple of 8): an increase beyond it
  waits for ever, as four consumers at 120 registers did on an H100."""
  consumer, producer = attention_mosaic._registers(wgs)
  threads = 128 * (wgs + 1)
  assert consumer % 8 == 0 and producer % 8 == 0 and 24 <= producer <= consumer <= 256
  assert 128 * (wgs * consumer + producer) <= (65536 // threads // 8 * 8) * threads


def test_default_forward_kernel():
  """The Mosaic GPU forward is the default only on Hopper; specs pick either."""
  want = "mosaic" if attention_pallas._on_hopper() else "triton"
  assert attention_pallas.BlockSizes.get_default().fwd_kernel == want
  assert attention_pallas.BlockSizes.from_spec("64/4/2/mosaic").fwd_kernel == "mosaic"
  assert attention_pallas.BlockSizes.from_spec("64/4/2").fwd_kernel == "triton"
  assert attention_mosaic.BlockSizes.from_spec("w4/s3/nosched") == attention_mosaic.BlockSizes(
    4, 3, False
  )

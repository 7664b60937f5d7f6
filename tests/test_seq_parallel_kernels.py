"""The sparse-attention kernel options that the sequence-parallel ring uses, in the
Pallas interpreter against the plain-JAX reference: `causal=False` (a remote chunk's
blocks seen whole), a forward that goes on from an earlier (out, lse) in place, a dq
pass that adds into a given dq, and dK/dV written over K/V.

Random inputs; outputs poisoned first (a run on NaN inputs leaves NaN in the buffers the
real run gets), so an element a kernel never writes shows up as non-finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import index
from pallas_kernels.sparse_attention import pallas_gpu as attention_pallas
from pallas_kernels.sparse_attention import reference as attention_reference

B, T, HQ, HKV, D, BS, QT = 2, 64, 4, 1, 16, 16, 8  # rows per program: QT x G = 32
SIZES = attention_pallas.BlockSizes(block_m=32, block_m_dq=32, block_m_dkv=32)
KW = dict(block_size=BS, query_tile=QT, scale=D**-0.5)
RTOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def _inputs(seed, dtype):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, T, HQ, D)), dtype)
  k, v = (jnp.asarray(rng.standard_normal((B, T, HKV, D)), dtype) for _ in range(2))
  return rng, q, k, v


def _lists(rng, earlier_only, empty_tiles=True):
  """Random distinct blocks per tile, -1 slots, shuffled; `earlier_only`: only blocks
  before the tile's own block (as a ring step lists a remote chunk's blocks); some
  tiles list nothing."""
  tiles, blocks, slots = T // QT, T // BS, 4
  ids = np.full((B, HKV, tiles, slots), -1, np.int32)
  for bi, hi, t in np.ndindex(B, HKV, tiles):
    pool = np.arange(t * QT // BS if earlier_only else blocks)
    n = rng.integers(0 if empty_tiles else 1, min(slots, len(pool)) + 1) if len(pool) else 0
    row = list(rng.choice(pool, size=n, replace=False)) + [-1] * (slots - n)
    ids[bi, hi, t] = rng.permutation(row)
  return jnp.asarray(ids)


def _run_poisoned(fn, *args):
  """jit(fn) on NaN floats first, then on args."""
  compiled = jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})
  nan = lambda x: jnp.full_like(x, jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating) else x
  jax.block_until_ready(compiled(*jax.tree.map(nan, args)))
  return compiled(*args)


def _finite(**arrays):
  for name, x in arrays.items():
    assert bool(jnp.all(jnp.isfinite(x))), f"{name} has non-finite (unwritten?) elements"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_non_causal_matches_reference(dtype):
  """causal=False: every listed block is seen whole, also blocks after the tile."""
  rng, q, k, v = _inputs(0, dtype)
  ids = _lists(rng, earlier_only=False)
  w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

  def grads(attention):
    def loss(q, k, v):
      out, _ = attention(q, k, v)
      return jnp.sum(out.astype(jnp.float32) * w), out

    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)

  pallas = lambda q, k, v: attention_pallas.sparse_attention_pallas(
    q, k, v, ids, block_sizes=SIZES, causal=False, interpret=True, **KW
  )
  (dq, dk, dv), out = _run_poisoned(grads(pallas), q, k, v)
  _, lse = _run_poisoned(pallas, q, k, v)
  f32 = lambda x: x.astype(jnp.float32)
  reference = lambda q, k, v: attention_reference.sparse_attention(
    f32(q), f32(k), f32(v), ids, causal=False, **KW
  )
  (rq, rk, rv), ref_out = jax.jit(grads(reference))(q, k, v)
  ref_lse = jax.jit(reference)(q, k, v)[1]
  _finite(out=out, dq=dq, dk=dk, dv=dv)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
  assert not bool(jnp.all(jnp.isneginf(ref_lse)))
  # A tile listing a later block sees it: some query sees a key after its position.
  causal_out, _ = attention_reference.sparse_attention(f32(q), f32(k), f32(v), ids, **KW)
  assert _rel_err(causal_out, ref_out) > 0.01
  for name, x, ref in (("out", out, ref_out), ("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
    assert _rel_err(x, ref) < 2 * RTOL[dtype], name


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_goes_on_from_earlier_result(dtype):
  """Own blocks causally, then earlier blocks with init=(out, lse): the merge of both,
  equal to one pass over the union; rows that saw nothing in either stay empty."""
  rng, q, k, v = _inputs(1, dtype)
  first = _lists(rng, earlier_only=False)
  second = np.array(_lists(rng, earlier_only=True))
  second[np.isin(second, np.array(first)).any(-1, keepdims=True) & (second >= 0)] = -1
  second = jnp.asarray(second)  # blocks disjoint from the first list's
  compact = lambda ids, causal: index.compact_block_lists(
    ids, block_size=BS, query_tile=QT, causal=causal
  )
  args = (BS, QT, KW["scale"], SIZES, True)

  def two_passes(q, k, v):
    init = attention_pallas._forward(q, k, v, compact(first, True), *args)
    return attention_pallas._forward(
      q, k, v, compact(second, False), *args, causal=False, init=init
    )

  out, lse = _run_poisoned(two_passes, q, k, v)
  f32 = lambda x: x.astype(jnp.float32)
  union = jnp.concatenate([first, second], axis=-1)
  ref_out, ref_lse = attention_reference.sparse_attention(f32(q), f32(k), f32(v), union, **KW)
  _finite(out=out)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
  assert bool(jnp.any(jnp.isneginf(ref_lse))) and not bool(jnp.all(jnp.isneginf(ref_lse)))
  # bf16: the earlier out is rounded once more than a single pass's.
  assert _rel_err(out, ref_out) < 2 * RTOL[dtype]
  finite = jnp.isfinite(ref_lse)
  np.testing.assert_allclose(
    jnp.where(finite, lse, 0), jnp.where(finite, ref_lse, 0), atol=10 * RTOL[dtype]
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dq_init_and_overwritten_kv(dtype):
  """dq_init adds into a given dq; overwrite_kv gives the same dK/dV as fresh buffers."""
  rng, q, k, v = _inputs(2, dtype)
  ids = index.compact_block_lists(
    _lists(rng, earlier_only=True), block_size=BS, query_tile=QT, causal=False
  )
  shape5 = (B, T, HKV, HQ // HKV, D)
  q5 = q.reshape(shape5)
  do5 = jnp.asarray(rng.standard_normal(shape5), dtype)
  lse4 = jnp.asarray(rng.standard_normal(shape5[:4]) + 3.0, jnp.float32)
  delta = jnp.asarray(rng.standard_normal(shape5[:4]), jnp.float32)
  dq_in = jnp.asarray(rng.standard_normal(shape5), dtype)
  tail = (BS, QT, KW["scale"], SIZES, True)

  def passes(q5, k, v, do5, lse4, delta, dq_in):
    args = (q5, k, v, ids, do5, lse4, delta, *tail)
    fresh = attention_pallas._backward_dq(*args, causal=False)
    added = attention_pallas._backward_dq(*args, causal=False, dq_init=dq_in)
    dkv = attention_pallas._backward_dkv(*args, causal=False)
    return fresh, added, dkv

  def overwritten(q5, k, v, do5, lse4, delta):
    args = (q5, k, v, ids, do5, lse4, delta, *tail)
    return attention_pallas._backward_dkv(*args, causal=False, overwrite_kv=True)

  fresh, added, (dk, dv) = _run_poisoned(passes, q5, k, v, do5, lse4, delta, dq_in)
  dk_o, dv_o = _run_poisoned(overwritten, q5, k, v, do5, lse4, delta)
  _finite(fresh=fresh, added=added, dk=dk_o, dv=dv_o)
  f32 = lambda x: x.astype(jnp.float32)
  assert _rel_err(added, f32(fresh) + f32(dq_in)) < RTOL[dtype]
  np.testing.assert_array_equal(np.asarray(f32(dk_o)), np.asarray(f32(dk)))
  np.testing.assert_array_equal(np.asarray(f32(dv_o)), np.asarray(f32(dv)))
  # And the passes are the reference's gradients for these statistics: with lse and
  # delta of the reference's own forward, dq, dk, dv match autodiff of it.
  out, lse = attention_reference.sparse_attention(f32(q), f32(k), f32(v), ids, causal=False, **KW)
  lse4_ref = lse.transpose(0, 2, 1).reshape(shape5[:4])
  do = do5.reshape(q.shape)
  delta_ref = jnp.sum(out * f32(do), -1).reshape(shape5[:4])
  args = (q5, k, v, ids, do5, lse4_ref, delta_ref, *tail)
  got = (
    attention_pallas._backward_dq(*args, causal=False).reshape(q.shape),
    *attention_pallas._backward_dkv(*args, causal=False, overwrite_kv=True),
  )
  _, vjp = jax.vjp(
    lambda q, k, v: attention_reference.sparse_attention(q, k, v, ids, causal=False, **KW)[0],
    f32(q), f32(k), f32(v),
  )  # fmt: skip
  for name, x, ref in zip(("dq", "dk", "dv"), got, vjp(f32(do)), strict=True):
    assert _rel_err(x, ref) < 2 * RTOL[dtype], name


@pytest.mark.parametrize("option", ["non_causal", "init"])
def test_ring_options_take_triton_when_mosaic_is_default(option):
  """The Mosaic forward has neither option: with `fwd_kernel="mosaic"` (the Hopper
  default) on shapes it supports, such calls must still run the Triton kernel."""
  from pallas_kernels.sparse_attention import mosaic_gpu

  rng = np.random.default_rng(5)
  t, d, bs = 128, 64, 64
  q = jnp.asarray(rng.standard_normal((1, t, 2, d)), jnp.bfloat16)
  k, v = (jnp.asarray(rng.standard_normal((1, t, 1, d)), jnp.bfloat16) for _ in range(2))
  assert not mosaic_gpu.unsupported(q, k, bs, mosaic_gpu.ROWS)
  ids = jnp.asarray([[[[0, -1], [0, 1]]]], jnp.int32)  # tile i: blocks 0..i, own last
  kw = dict(block_size=bs, query_tile=mosaic_gpu.ROWS, scale=d**-0.5, interpret=True)
  if option == "non_causal":
    kw["causal"] = False
  else:
    out0 = jnp.asarray(rng.standard_normal(q.shape), jnp.bfloat16)
    lse0 = jnp.asarray(rng.standard_normal((1, 2, t)), jnp.float32)
    kw["init"] = (out0, lse0)
  run = lambda kernel: attention_pallas._forward(
    q, k, v, ids, block_sizes=attention_pallas.BlockSizes(fwd_kernel=kernel), **kw
  )
  for want, got in zip(run("triton"), run("mosaic"), strict=True):
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))

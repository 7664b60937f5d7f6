"""Block-sparse attention as Pallas GPU kernels (Triton backend), forward and backward.

Same semantics as `reference.sparse_attention`: every query tile attends, with one
softmax, to the KV blocks listed for it, causally; the G query heads of a KV head's
group share the list, so a program's rows are (queries x G heads) and the matrix
units stay full for any GQA ratio.

- forward: one program per (batch, kv head, chunk of a query tile): online softmax
  over the tile's listed blocks, bf16 (input dtype) matmuls with f32 accumulation,
  output and log-sum-exp.
- backward: dq query-centric (same grid as the forward); dk/dv key-centric, one
  program per (batch, kv head, block) looping over the tiles that listed the block
  (the transposed CSR index from `index.py`, built on device in XLA), one chunk of
  block_m_dkv rows per step; optionally one program per bounded segment of that list,
  with f32 partial sums for the blocks that get several (`BlockSizes.dkv_chunk`).

The lists are compacted first (`index.compact_block_lists`, or by the caller without a
sort: `index.pack_runs`, `compacted=True`): valid blocks ascending, so the tile's own
block, the only one that needs a causal mask, comes last.

Layouts: q, out and dq are viewed as [batch, T, kv_heads, G, head_dim] (a free
reshape), k and v stay [batch, T, kv_heads, head_dim]; nothing is transposed.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.sparse_attention import index, mosaic_gpu

LOG2E = math.log2(math.e)
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Rows (queries x G heads) per program and Triton launch parameters of each kernel.

  Attributes:
    block_m: rows per forward program; a tile of Q queries x G heads is split into
      Q * G / block_m programs (at least G rows: one query of every head).
    block_m_dq: rows per dq program.
    block_m_dkv: rows per step of a dk/dv program's loop over the tiles of a block.
    num_warps, num_stages: forward launch parameters; *_dq and *_dkv for the backward.
    dkv_unroll: chunks of block_m_dkv rows per step of the dk/dv loop (0: a whole tile
      per step). Each chunk's q and dout are separate loads that the software pipeline
      buffers, so a whole tile per step takes so much shared memory that one program
      fills a multiprocessor.
    dkv_chunk: 0: one dk/dv program per block loops over every tile that listed it;
      > 0: a block's CSR row is split into segments of at most this many tiles, one
      program each (load balance: a sink block is listed by every tile); the segments
      of a block with several write f32 partial sums to compact slots (at most 2 x
      entries / dkv_chunk of them), added in XLA.
    split_heads_over_4gib: run a pass one KV head at a time when an operand its inner
      loop reads is over 4 GiB (Pallas Triton then computes 64-bit offsets). Worth it
      only with `dkv_chunk` > 0: per head, one sink program is a larger share.
    fwd_fold_scale: the forward keeps its running max in raw logits and applies the
      scale inside each exponent (one fused multiply-add per logit); False: the logits
      are scaled first (a multiply per logit, then a subtract). Measured the same on an
      H100 at 1M (431 ms folded, 429 ms not, spread 10%): the forward is not bound by
      its per-logit arithmetic. Kept for comparison.
    fwd_kernel: "triton" (this file) or "mosaic" (`mosaic_gpu.forward`, its default
      tiling; shapes it cannot run fall back to Triton). The backward is Triton's.
  """

  block_m: int = 64
  block_m_dq: int = 64
  block_m_dkv: int = 64
  num_warps: int = 4
  num_stages: int = 2
  num_warps_dq: int = 4
  num_stages_dq: int = 2
  num_warps_dkv: int = 4
  num_stages_dkv: int = 2
  dkv_unroll: int = 1
  dkv_chunk: int = 0
  split_heads_over_4gib: bool = False
  fwd_fold_scale: bool = True
  fwd_kernel: str = "triton"

  @classmethod
  def get_default(cls) -> BlockSizes:
    """Fastest measured on an H100 (jax 0.11.2, Triton 3.6) for Llama-3-8B heads at 1M
    tokens, 8,192 keys per query (experiments/tune_sparse_attention.py; results in
    experiments/results/tune_sparse_attention_h100_1M*.json): dk/dv with the flat loop
    903 ms against 1575 ms a whole tile per step; segments and the per-head split
    measured no faster at 1M (908 and 904 ms), so both stay off. On Hopper the forward
    is Mosaic GPU's: 37.9 ms against Triton's 50.1 ms at 128K, same run and inputs
    (experiments/results/tune_mosaic_fwd_h100_128K.txt)."""
    return cls(fwd_kernel="mosaic" if _on_hopper() else "triton")

  @classmethod
  def from_spec(cls, spec: str) -> BlockSizes:
    """One tiling for all three kernels from
    `block_m/num_warps/num_stages[/c<chunk>][/u<unroll>][/h][/s0][/mosaic]` (c:
    `dkv_chunk`; u: `dkv_unroll`, default 1; h: `split_heads_over_4gib`; s0:
    `fwd_fold_scale=False`; mosaic: `fwd_kernel="mosaic"`), as the tuning scripts take it."""
    m, w, s, *extra = spec.split("/")
    m, w, s = int(m), int(w), int(s)
    opt = lambda p, default: next((int(x[1:]) for x in extra if x.startswith(p)), default)
    return cls(
      m, m, m, w, s, w, s, w, s,
      dkv_unroll=opt("u", 1),
      dkv_chunk=opt("c", 0),
      split_heads_over_4gib="h" in extra,
      fwd_fold_scale="s0" not in extra,
      fwd_kernel="mosaic" if "mosaic" in extra else "triton",
    )  # fmt: skip


def _on_hopper() -> bool:
  """The default device is a Hopper GPU (compute capability 9.0: wgmma, TMA)."""
  device = jax.devices()[0]
  return device.platform == "gpu" and getattr(device, "compute_capability", "") == "9.0"


# Pallas Triton switches to 64-bit pointer arithmetic for an operand over 4 GiB; in a
# kernel's inner loop that costs registers and time (the dk/dv pass at 1M tokens, whose
# loop reads q and dout). With `split_heads_over_4gib` such passes run head by head.
_INT32_BYTES = 2**32


def _per_kv_head(split, fn, looped, *arrays_by_head_axis):
  """fn(*arrays) over all KV heads at once, or head by head when an array that `fn`'s
  inner loop reads (`looped`: indices into the arrays) is over 4 GiB.

  arrays_by_head_axis: (array, head_axis) pairs; fn returns arrays with the KV head on
  axis 2 ([b, T, kv_heads, ...]).
  """
  arrays = [a for a, _ in arrays_by_head_axis]
  if not split or all(arrays[i].size * arrays[i].dtype.itemsize <= _INT32_BYTES for i in looped):
    return fn(*arrays)
  hkv = arrays[0].shape[arrays_by_head_axis[0][1]]
  outs = []
  for h in range(hkv):
    sliced = [jax.lax.slice_in_dim(a, h, h + 1, axis=ax) for a, ax in arrays_by_head_axis]
    outs.append(fn(*sliced))
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=2), *outs)


def _queries_per_program(block_m: int, g: int, query_tile: int) -> int:
  qm = min(query_tile, max(1, block_m // g))
  if query_tile % qm:
    raise ValueError(f"{query_tile=} must be a multiple of {qm=} (block_m={block_m} // {g=})")
  return qm


def _dot(a, b, trans_b=False):
  """a @ b (a @ b.T with trans_b) with f32 accumulation; lowers to tl.dot."""
  dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
  # float32 operands: IEEE products (Triton would otherwise pick tf32 on some versions).
  exact = a.dtype == jnp.float32 and b.dtype == jnp.float32
  precision = jax.lax.Precision.HIGHEST if exact else None
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _safe_lse2(lse):
  """lse in base 2; a row that saw no key (lse = -inf) gets +inf, so its p = 0."""
  return jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)


def _mask(s, q_pos, k_pos):
  return jnp.where(k_pos <= q_pos, s, MASK_VALUE)


def _fwd_kernel(
  ids_ref, q_ref, k_ref, v_ref, *refs, block_size, qm, g, scale, fold_scale, causal, init
):
  """One chunk of qm queries x G heads against its tile's compacted block list.

  `causal=False`: no causal mask (the caller lists only blocks before the tile). `init`:
  refs start with an earlier (out, lse) of these queries over other keys, aliased to the
  outputs; the online softmax goes on from it, so the result is the exact merge.
  """
  o_in_ref, lse_in_ref, o_ref, lse_ref = refs if init else (None, None, *refs)
  d = q_ref.shape[-1]
  rows = qm * g
  q_first = pl.program_id(2) * qm
  q = q_ref[...].reshape(rows, d)
  q_pos = (q_first + jnp.arange(rows, dtype=jnp.int32) // g)[:, None]
  k_off = jnp.arange(block_size, dtype=jnp.int32)[None, :]
  num_valid = jnp.sum((ids_ref[...] >= 0).astype(jnp.int32))
  if init:  # with no listed block, the masked step below must add nothing
    q_pos = jnp.where(num_valid > 0, q_pos, -1)

  # m and l (see the FlashAttention paper) are the running max and sum of the row's
  # exponentials; acc is the unnormalised output. With fold_scale, m is kept in raw
  # logits (q . k) and the scale (and log2 e) enters each exponent through one fused
  # multiply-add, s * c - m * c, instead of a multiply per logit before the max and a
  # subtract after it; otherwise m is in scaled base-2 units.
  c = scale * LOG2E
  m_unit = scale if fold_scale else 1 / LOG2E  # m * m_unit: m in natural-log units

  def step(i, carry, masked):
    acc, m, l_sum = carry
    start = pl.multiple_of(jnp.maximum(ids_ref[i], 0) * block_size, block_size)
    k = k_ref[pl.ds(start, block_size), :]
    s = _dot(q, k, trans_b=True)
    if not fold_scale:
      s = s * c
    if masked:
      s = _mask(s, q_pos, start + k_off)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    if fold_scale:
      m_scaled = m_new * c
      alpha = jnp.exp2(m * c - m_scaled)
      p = jnp.exp2(s * c - m_scaled[:, None])
    else:
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(s - m_new[:, None])
    l_sum = l_sum * alpha + jnp.sum(p, axis=1)
    v = v_ref[pl.ds(start, block_size), :]
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l_sum

  carry = (
    jnp.zeros((rows, d), jnp.float32),
    jnp.full((rows,), MASK_VALUE, jnp.float32),
    jnp.zeros((rows,), jnp.float32),
  )
  # A tile with no valid block (a partial list, e.g. one shard's share) sees no key:
  # out = 0 and lse = -inf, so that partial results merge by lse.
  empty = o_empty = num_valid == 0
  if init:  # the earlier result is one more, normalised, term: l = 1 at m = its lse
    lse_in = lse_in_ref[...].reshape(rows)
    l_in = (lse_in > -jnp.inf).astype(jnp.float32)
    acc_in = o_in_ref[...].reshape(rows, d).astype(jnp.float32) * l_in[:, None]
    carry = (acc_in, jnp.where(l_in > 0, lse_in / m_unit, MASK_VALUE), l_in)
    empty = empty & (l_in == 0)
    o_empty = empty[:, None]
  if causal:
    # Blocks before the tile's own block are fully visible; the own block comes last.
    carry = jax.lax.fori_loop(0, num_valid - 1, functools.partial(step, masked=False), carry)
    acc, m, l_sum = step(jnp.maximum(num_valid - 1, 0), carry, masked=True)
  else:
    acc, m, l_sum = jax.lax.fori_loop(0, num_valid, functools.partial(step, masked=False), carry)
  o_ref[...] = jnp.where(o_empty, 0.0, acc / l_sum[:, None]).reshape(qm, g, d).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, -jnp.inf, m * m_unit + jnp.log(l_sum)).reshape(qm, g)


def _dq_kernel(
  ids_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, block_size, qm, g, scale,
  causal, init,
):  # fmt: skip
  """dq of one chunk of queries; `init`: refs start with a dq that the result adds to
  (aliased to the output); `causal` as in `_fwd_kernel`."""
  dq_in_ref, dq_ref = refs if init else (None, *refs)
  d = q_ref.shape[-1]
  rows = qm * g
  q_first = pl.program_id(2) * qm
  q = q_ref[...].reshape(rows, d)
  do = do_ref[...].reshape(rows, d)
  lse2 = _safe_lse2(lse_ref[...].reshape(rows))
  delta = delta_ref[...].reshape(rows)
  q_pos = (q_first + jnp.arange(rows, dtype=jnp.int32) // g)[:, None]
  k_off = jnp.arange(block_size, dtype=jnp.int32)[None, :]
  num_valid = jnp.sum((ids_ref[...] >= 0).astype(jnp.int32))

  def step(i, dq, masked):
    start = pl.multiple_of(jnp.maximum(ids_ref[i], 0) * block_size, block_size)
    k = k_ref[pl.ds(start, block_size), :]
    v = v_ref[pl.ds(start, block_size), :]
    s = _dot(q, k, trans_b=True) * (scale * LOG2E)
    if masked:
      s = _mask(s, q_pos, start + k_off)
    p = jnp.exp2(s - lse2[:, None])
    dp = _dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  zero = jnp.zeros((rows, d), jnp.float32)
  if causal:
    dq = jax.lax.fori_loop(0, num_valid - 1, functools.partial(step, masked=False), zero)
    dq = step(jnp.maximum(num_valid - 1, 0), dq, masked=True)
  else:
    dq = jax.lax.fori_loop(0, num_valid, functools.partial(step, masked=False), zero)
  dq = (dq * scale).reshape(qm, g, d)
  if init:
    dq = dq + dq_in_ref[...].astype(jnp.float32)
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(
  meta_ref,
  tiles_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  dk_ref,
  dv_ref,
  pdk_ref,
  pdv_ref,
  *,
  block_size,
  query_tile,
  qm,
  g,
  scale,
  unroll,
):
  """dk, dv of one KV block from one segment of the tiles that listed it (CSR).

  meta_ref holds (start, diag_end, end, block, slot). The loop walks the segment's
  tiles in chunks of qm queries x G heads, `unroll` chunks per step. A block's only
  segment (slot < 0) writes dk and dv; a segment of a block with several writes f32
  partial sums to its slot of pdk/pdv; an unused segment (block = num_blocks) writes
  nothing.
  """
  d = k_ref.shape[-1]
  rows = qm * g
  num_blocks = k_ref.shape[0] // block_size
  start, diag_end, end = meta_ref[0], meta_ref[1], meta_ref[2]
  block, slot = meta_ref[3], meta_ref[4]
  k_first = pl.multiple_of(jnp.minimum(block, num_blocks - 1) * block_size, block_size)
  k = k_ref[pl.ds(k_first, block_size), :]
  v = v_ref[pl.ds(k_first, block_size), :]
  k_pos = (k_first + jnp.arange(block_size, dtype=jnp.int32))[:, None]
  row_query = (jnp.arange(rows, dtype=jnp.int32) // g)[None, :]
  steps_per_tile = query_tile // (qm * unroll)

  def step(n, carry, masked):
    dk, dv = carry
    tile = tiles_ref[n // steps_per_tile]
    first_chunk = (n % steps_per_tile) * unroll
    for u in range(unroll):
      q_first = pl.multiple_of(tile * query_tile + (first_chunk + u) * qm, qm)
      q = q_ref[pl.ds(q_first, qm), :, :].reshape(rows, d)
      do = do_ref[pl.ds(q_first, qm), :, :].reshape(rows, d)
      lse2 = _safe_lse2(lse_ref[pl.ds(q_first, qm), :].reshape(rows))
      delta = delta_ref[pl.ds(q_first, qm), :].reshape(rows)
      # Transposed logits (keys x rows): dk and dv come out without transposes.
      s_t = _dot(k, q, trans_b=True) * (scale * LOG2E)
      if masked:
        s_t = _mask(s_t, q_first + row_query, k_pos)
      p_t = jnp.exp2(s_t - lse2[None, :])
      dv = dv + _dot(p_t.astype(do.dtype), do)
      dp_t = _dot(v, do, trans_b=True)
      ds_t = p_t * (dp_t - delta[None, :])
      dk = dk + _dot(ds_t.astype(q.dtype), q)
    return dk, dv

  carry = (jnp.zeros((block_size, d), jnp.float32), jnp.zeros((block_size, d), jnp.float32))
  # Tiles inside the block (causal mask) come first in the CSR row, later tiles after.
  masked_end = diag_end * steps_per_tile
  carry = jax.lax.fori_loop(
    start * steps_per_tile, masked_end, functools.partial(step, masked=True), carry
  )
  dk, dv = jax.lax.fori_loop(
    masked_end, end * steps_per_tile, functools.partial(step, masked=False), carry
  )
  dk = dk * scale

  @pl.when((slot < 0) & (block < num_blocks))
  def _():
    dk_ref[pl.ds(k_first, block_size), :] = dk.astype(dk_ref.dtype)
    dv_ref[pl.ds(k_first, block_size), :] = dv.astype(dv_ref.dtype)

  @pl.when(slot >= 0)
  def _():
    pdk_ref[slot] = dk
    pdv_ref[slot] = dv


def _check(q, k, v, block_ids, block_size, query_tile):
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  if k.shape != (b, t, hkv, d) or v.shape != k.shape:
    raise ValueError(f"{q.shape=}, {k.shape=} and {v.shape=} do not match")
  if hq % hkv:
    raise ValueError(f"q_heads={hq} must be a multiple of kv_heads={hkv}")
  if t % block_size or block_size % query_tile:
    raise ValueError(
      f"seq_len={t} must be a multiple of {block_size=}, a multiple of {query_tile=}"
    )
  if block_ids.shape[:3] != (b, hkv, t // query_tile):
    raise ValueError(f"{block_ids.shape=} must start with {(b, hkv, t // query_tile)}")


def _forward(
  q, k, v, ids, block_size, query_tile, scale, block_sizes, interpret, causal=True, init=None
):
  """(out, lse); `init` = an earlier (out, lse) of q over other keys, which the result
  merges with, in place (the kernel's outputs alias them); `causal` as in `_fwd_kernel`."""
  # The Mosaic forward has no `causal=False` or `init` (the sequence-parallel ring's
  # options): those calls take the Triton kernel below.
  if (
    block_sizes.fwd_kernel == "mosaic"
    and causal
    and init is None
    and not mosaic_gpu.unsupported(q, k, block_size, query_tile)
  ):
    return mosaic_gpu.forward(q, k, v, ids, block_size, query_tile, scale, interpret=interpret)
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  slots = ids.shape[-1]
  qm = _queries_per_program(block_sizes.block_m, g, query_tile)
  per_tile = query_tile // qm
  q5 = q.reshape(b, t, hkv, g, d)
  kernel = functools.partial(
    _fwd_kernel,
    block_size=block_size,
    qm=qm,
    g=g,
    scale=scale,
    fold_scale=block_sizes.fwd_fold_scale,
    causal=causal,
    init=init is not None,
  )
  rows_spec = pl.BlockSpec((None, qm, None, g, d), lambda bi, hi, i: (bi, i, hi, 0, 0))
  lse_spec = pl.BlockSpec((None, qm, None, g), lambda bi, hi, i: (bi, i, hi, 0))
  kv_spec = pl.BlockSpec((None, t, None, d), lambda bi, hi, i: (bi, 0, hi, 0))
  ids_spec = pl.BlockSpec((None, None, None, slots), lambda bi, hi, i: (bi, hi, i // per_tile, 0))
  arrays = [(ids, 1), (q5, 2), (k, 2), (v, 2)]
  if init is not None:
    out_in, lse_in = init
    lse_in = lse_in.transpose(0, 2, 1).reshape(q5.shape[:-1])
    arrays += [(out_in.reshape(q5.shape), 2), (lse_in.astype(jnp.float32), 2)]
  call = lambda ids, q5, k, v, *init: pl.pallas_call(
    kernel,
    grid=(b, k.shape[2], t // qm),
    in_specs=[ids_spec, rows_spec, kv_spec, kv_spec] + [rows_spec, lse_spec][: len(init)],
    out_specs=[rows_spec, lse_spec],
    out_shape=[
      jax.ShapeDtypeStruct(q5.shape, q5.dtype),
      jax.ShapeDtypeStruct(q5.shape[:-1], jnp.float32),
    ],
    input_output_aliases={4: 0, 5: 1} if init else {},
    compiler_params=plgpu.CompilerParams(
      num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
    ),
    interpret=interpret,
    name="ssa_sparse_attention_fwd",
  )(ids, q5, k, v, *init)
  split = block_sizes.split_heads_over_4gib
  out, lse = _per_kv_head(split, call, (2, 3), *arrays)
  return out.reshape(b, t, hq, d), lse.reshape(b, t, hq).transpose(0, 2, 1)


def _backward(
  q, k, v, ids, out, lse, do, dlse, block_size, query_tile, scale, block_sizes, interpret,
  causal=True,
):  # fmt: skip
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  q5 = q.reshape(b, t, hkv, g, d)
  do5 = do.reshape(b, t, hkv, g, d)
  # d lse / d logits = p, so an lse cotangent folds into delta.
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  delta = delta - dlse.transpose(0, 2, 1)
  delta = delta.reshape(b, t, hkv, g)
  lse4 = lse.transpose(0, 2, 1).reshape(b, t, hkv, g)
  args = (q5, k, v, ids, do5, lse4, delta, block_size, query_tile, scale, block_sizes, interpret)
  dq = _backward_dq(*args, causal=causal)
  dk, dv = _backward_dkv(*args, causal=causal)
  return dq.reshape(q.shape), dk, dv


def _backward_dq(
  q5, k, v, ids, do5, lse4, delta, block_size, query_tile, scale, block_sizes, interpret,
  causal=True, dq_init=None,
):  # fmt: skip
  """dq, query-centric: [b, T, kv_heads, G, d]; plus `dq_init` (same shape), in place."""
  b, t, hkv, g, d = q5.shape
  slots = ids.shape[-1]
  qm = _queries_per_program(block_sizes.block_m_dq, g, query_tile)
  per_tile = query_tile // qm
  rows_spec = pl.BlockSpec((None, qm, None, g, d), lambda bi, hi, i: (bi, i, hi, 0, 0))
  stat_spec = pl.BlockSpec((None, qm, None, g), lambda bi, hi, i: (bi, i, hi, 0))
  kv_spec = pl.BlockSpec((None, t, None, d), lambda bi, hi, i: (bi, 0, hi, 0))
  init = () if dq_init is None else ((dq_init, 2),)
  kernel = functools.partial(
    _dq_kernel, block_size=block_size, qm=qm, g=g, scale=scale, causal=causal, init=bool(init)
  )
  call = lambda ids, q5, k, v, do5, lse4, delta, *dq_init: pl.pallas_call(
    kernel,
    grid=(b, k.shape[2], t // qm),
    in_specs=[
      pl.BlockSpec((None, None, None, slots), lambda bi, hi, i: (bi, hi, i // per_tile, 0)),
      rows_spec,
      kv_spec,
      kv_spec,
      rows_spec,
      stat_spec,
      stat_spec,
    ]
    + [rows_spec] * len(dq_init),
    out_specs=rows_spec,
    out_shape=jax.ShapeDtypeStruct(q5.shape, q5.dtype),
    input_output_aliases={7: 0} if dq_init else {},
    compiler_params=plgpu.CompilerParams(
      num_warps=block_sizes.num_warps_dq, num_stages=block_sizes.num_stages_dq
    ),
    interpret=interpret,
    name="ssa_sparse_attention_dq",
  )(ids, q5, k, v, do5, lse4, delta, *dq_init)
  head_axes = ((ids, 1), (q5, 2), (k, 2), (v, 2), (do5, 2), (lse4, 2), (delta, 2), *init)
  return _per_kv_head(block_sizes.split_heads_over_4gib, call, (2, 3), *head_axes)


def _backward_dkv(
  q5, k, v, ids, do5, lse4, delta, block_size, query_tile, scale, block_sizes, interpret,
  causal=True, overwrite_kv=False,
):  # fmt: skip
  """dk and dv, key-centric over the transposed (CSR) index: [b, T, kv_heads, d] each.

  `overwrite_kv`: dk and dv are written over k and v (a program reads only its own
  block's k and v, before it writes that block), so no new buffers are needed when the
  caller is done with k and v."""
  b, t, hkv, g, d = q5.shape
  num_blocks = t // block_size
  tiles_sorted, meta = index.transpose_block_lists(
    ids, num_blocks=num_blocks, block_size=block_size, query_tile=query_tile
  )
  if not causal:  # no tile is masked: every entry goes to the unmasked loop
    meta = meta.at[..., 1].set(meta[..., 0])
  entries = tiles_sorted.shape[-1]
  seg_meta, slot_group, group_block = index.segment_block_lists(
    meta, entries=entries, segment=block_sizes.dkv_chunk
  )
  num_items, num_slots = seg_meta.shape[2], slot_group.shape[2]
  qm = _queries_per_program(block_sizes.block_m_dkv, g, query_tile)
  unroll = block_sizes.dkv_unroll or query_tile // qm
  if (query_tile // qm) % unroll:
    raise ValueError(f"dkv_unroll={unroll} must divide the {query_tile // qm} chunks of a tile")
  full_rows = pl.BlockSpec((None, t, None, g, d), lambda bi, hi, j: (bi, 0, hi, 0, 0))
  full_stat = pl.BlockSpec((None, t, None, g), lambda bi, hi, j: (bi, 0, hi, 0))
  kv_spec = pl.BlockSpec((None, t, None, d), lambda bi, hi, j: (bi, 0, hi, 0))
  part_spec = pl.BlockSpec(
    (None, None, num_slots, block_size, d), lambda bi, hi, j: (bi, hi, 0, 0, 0)
  )

  def call(seg_meta, tiles_sorted, slot_group, group_block, q5, k, v, do5, lse4, delta):
    heads = k.shape[2]
    part_shape = jax.ShapeDtypeStruct((b, heads, num_slots, block_size, d), jnp.float32)
    dk, dv, pdk, pdv = pl.pallas_call(
      functools.partial(
        _dkv_kernel,
        block_size=block_size,
        query_tile=query_tile,
        qm=qm,
        g=g,
        scale=scale,
        unroll=unroll,
      ),
      grid=(b, heads, num_items),
      in_specs=[
        pl.BlockSpec((None, None, None, 5), lambda bi, hi, j: (bi, hi, j, 0)),
        pl.BlockSpec((None, None, entries), lambda bi, hi, j: (bi, hi, 0)),
        full_rows,
        kv_spec,
        kv_spec,
        full_rows,
        full_stat,
        full_stat,
      ],
      out_specs=[kv_spec, kv_spec, part_spec, part_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2 + [part_shape] * 2,
      input_output_aliases={3: 0, 4: 1} if overwrite_kv else {},
      compiler_params=plgpu.CompilerParams(
        num_warps=block_sizes.num_warps_dkv, num_stages=block_sizes.num_stages_dkv
      ),
      interpret=interpret,
      name="ssa_sparse_attention_dkv",
    )(seg_meta, tiles_sorted, q5, k, v, do5, lse4, delta)
    if not block_sizes.dkv_chunk:
      return dk, dv
    # Blocks with several segments: add their slots (ordered by block) per group, then
    # write the sums over those blocks' rows; unused slots and groups drop out.
    add = lambda x, ids: jax.ops.segment_sum(
      x, ids, num_segments=num_slots, indices_are_sorted=True, mode="drop"
    )
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(heads)[None, :, None]

    def finish(x, part):
      sums = jax.vmap(jax.vmap(add))(part, slot_group).astype(x.dtype)
      x = x.reshape(b, num_blocks, block_size, heads, d)
      x = x.at[bi, group_block, :, hi, :].set(sums, mode="drop")
      return x.reshape(b, t, heads, d)

    return finish(dk, pdk), finish(dv, pdv)

  head_axes = ((seg_meta, 1), (tiles_sorted, 1), (slot_group, 1), (group_block, 1), (q5, 2),
               (k, 2), (v, 2), (do5, 2), (lse4, 2), (delta, 2))  # fmt: skip
  return _per_kv_head(block_sizes.split_heads_over_4gib, call, (4, 7), *head_axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _sparse_attention(q, k, v, ids, block_size, query_tile, scale, block_sizes, interpret, causal):
  return _forward(q, k, v, ids, block_size, query_tile, scale, block_sizes, interpret, causal)


def _sparse_attention_fwd(
  q, k, v, ids, block_size, query_tile, scale, block_sizes, interpret, causal
):
  out, lse = _forward(q, k, v, ids, block_size, query_tile, scale, block_sizes, interpret, causal)
  return (out, lse), (q, k, v, ids, out, lse)


def _sparse_attention_bwd(block_size, query_tile, scale, block_sizes, interpret, causal, res, cts):
  q, k, v, ids, out, lse = res
  do, dlse = cts
  dq, dk, dv = _backward(
    q, k, v, ids, out, lse, do, dlse, block_size, query_tile, scale, block_sizes, interpret,
    causal,
  )  # fmt: skip
  return dq, dk, dv, None


_sparse_attention.defvjp(_sparse_attention_fwd, _sparse_attention_bwd)


def sparse_attention_pallas(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  block_ids: jax.Array,
  *,
  block_size: int,
  query_tile: int,
  scale: float,
  block_sizes: BlockSizes | None = None,
  compacted: bool = False,
  causal: bool = True,
  interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Attention of each query tile to its listed KV blocks (Pallas GPU kernels).

  Args and returns as `reference.sparse_attention`: q [batch, T, q_heads, head_dim],
  k and v [batch, T, kv_heads, head_dim] with T a multiple of `block_size`,
  block_ids int32 [batch, kv_heads, T // query_tile, slots] (-1 = empty slot; a tile's
  blocks distinct); returns out in q's dtype and the log-sum-exp, float32
  [batch, q_heads, T]; a query that sees no key gets out = 0 and lse = -inf.
  Differentiable in q, k and v.
  `compacted=True`: block_ids is already in the kernels' layout (each tile's valid
  blocks ascending, none after its own block, then -1s, as `index.pack_runs` builds
  it), so the sort of `index.compact_block_lists` is skipped.
  `causal=False`: no causal mask, every listed block is seen whole (the caller lists
  only blocks before the tile: a sequence shard's earlier blocks held by another shard).
  `interpret=True` runs the kernels in the Pallas interpreter (CPU tests).
  """
  _check(q, k, v, block_ids, block_size, query_tile)
  block_sizes = block_sizes or BlockSizes.get_default()
  block_ids = jax.lax.stop_gradient(block_ids)
  if compacted:
    ids = index.pad_slots(block_ids)
  else:
    ids = index.compact_block_lists(
      block_ids, block_size=block_size, query_tile=query_tile, causal=causal
    )
  return _sparse_attention(
    q, k, v, ids, block_size, query_tile, float(scale), block_sizes, interpret, causal
  )

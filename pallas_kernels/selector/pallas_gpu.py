"""Selector scoring as a Pallas GPU kernel (Triton backend).

One program per (batch, kv head, tile): gather the tile's candidate summaries from the
level's table (one row each), multiply by the tile's routing rows (its queries x the G
heads of the group) on the matrix units, and reduce the max over rows. Top-k stays in
XLA. Same semantics as `reference.score_candidates`.

Shapes are padded to what the Triton backend needs (powers of two, at least 16 for a
matrix product) without changing the result: rows by repeating a row (the max is
unchanged), the summary dimension with zeros, candidates with -1.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.sparse_attention.index import next_power_of_2


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Rows per step of a program's loop over its tile's rows, and launch parameters."""

  block_rows: int = 64
  num_warps: int = 4
  num_stages: int = 2

  @classmethod
  def get_default(cls) -> BlockSizes:
    return cls()


def _score_kernel(cand_ref, rows_ref, table_ref, out_ref, *, block_rows, compute_dtype):
  cand = cand_ref[...]
  summaries = table_ref[jnp.maximum(cand, 0), :].astype(compute_dtype)  # gather: [C, D]
  num_rows = rows_ref.shape[0]
  best = jnp.full(cand.shape, -jnp.inf, jnp.float32)
  for r in range(0, num_rows, block_rows):
    rows = rows_ref[pl.ds(r, block_rows), :].astype(compute_dtype)
    scores = jax.lax.dot_general(
      rows,
      summaries,
      (((1,), (1,)), ((), ())),
      precision=jax.lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None,
      preferred_element_type=jnp.float32,
    )
    best = jnp.maximum(best, jnp.max(scores, axis=0))
  out_ref[...] = jnp.where(cand >= 0, best, -jnp.inf)


def _pad_to(x, axis, size, **kw):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, **kw)


def score_candidates_pallas(
  rows: jax.Array,
  table: jax.Array,
  candidates: jax.Array,
  *,
  compute_dtype: jnp.dtype | None = None,
  block_sizes: BlockSizes | None = None,
  interpret: bool = False,
) -> jax.Array:
  """Max over each tile's rows of row . table[candidate] (Pallas GPU kernel).

  Args:
    rows: [batch, kv_heads, tiles, R, D] routing rows of every tile.
    table: [batch, kv_heads, nodes, D] summaries of one tree level.
    candidates: int32 [batch, kv_heads, tiles, C] node ids, -1 for an empty slot.
    compute_dtype: operand dtype of the in-kernel matmul (accumulation is f32); None
      keeps the rows' dtype (float32 rows: exact IEEE products on CUDA cores, slow;
      bfloat16 runs on the tensor cores). Rows and table are read in their own dtype.
    block_sizes: kernel tiling; `BlockSizes.get_default()` when None.
    interpret: run in the Pallas interpreter (CPU tests).

  Returns:
    float32 [batch, kv_heads, tiles, C]; -inf where the candidate is -1.
  """
  block_sizes = block_sizes or BlockSizes.get_default()
  b, h, num_tiles, r, d = rows.shape
  nodes = table.shape[2]
  c = candidates.shape[-1]
  if table.shape != (b, h, nodes, d):
    raise ValueError(f"{table.shape=} does not match {rows.shape=}")
  if candidates.shape[:3] != (b, h, num_tiles):
    raise ValueError(f"{candidates.shape=} does not match {rows.shape=}")
  if table.dtype != rows.dtype:
    table = table.astype(rows.dtype)
  d_pad = max(16, next_power_of_2(d))
  c_pad = max(16, next_power_of_2(c))
  block_rows = min(block_sizes.block_rows, max(16, next_power_of_2(r)))
  r_pad = -(-r // block_rows) * block_rows
  if r_pad != r:  # repeat the first row: the max over rows is unchanged
    rows = jnp.concatenate(
      [rows, jnp.broadcast_to(rows[:, :, :, :1], (b, h, num_tiles, r_pad - r, d))], axis=3
    )
  rows = _pad_to(rows, 4, d_pad)
  table = _pad_to(table, 3, d_pad)
  candidates = _pad_to(candidates.astype(jnp.int32), 3, c_pad, constant_values=-1)
  scores = pl.pallas_call(
    functools.partial(
      _score_kernel, block_rows=block_rows, compute_dtype=compute_dtype or rows.dtype
    ),
    grid=(b, h, num_tiles),
    in_specs=[
      pl.BlockSpec((None, None, None, c_pad), lambda bi, hi, i: (bi, hi, i, 0)),
      pl.BlockSpec((None, None, None, r_pad, d_pad), lambda bi, hi, i: (bi, hi, i, 0, 0)),
      pl.BlockSpec((None, None, nodes, d_pad), lambda bi, hi, i: (bi, hi, 0, 0)),
    ],
    out_specs=pl.BlockSpec((None, None, None, c_pad), lambda bi, hi, i: (bi, hi, i, 0)),
    out_shape=jax.ShapeDtypeStruct((b, h, num_tiles, c_pad), jnp.float32),
    compiler_params=plgpu.CompilerParams(
      num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
    ),
    interpret=interpret,
    name="ssa_score_candidates",
  )(candidates, rows, table)
  return scores[..., :c]

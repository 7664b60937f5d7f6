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
import numpy as np
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


# ----------------------------------------------- scoring straight from routing queries


def _pieces(c: int) -> list[int]:
  """Power-of-two widths (each >= 16, largest first) covering c candidates: Triton
  blocks are powers of two, and one block of next_power_of_2(c) would score up to
  twice the candidates needed (143 at the last tree level: 256 against 128 + 16)."""
  left, out = max(16, -(-c // 16) * 16), []
  while left > 0:
    width = max(16, 1 << (left.bit_length() - 1))
    out.append(width)
    left -= width
  return out


def _score_q_kernel(*refs, num_pieces, query_tile, chunk_q, bounds, compute_dtype):
  """One tile: its routing window read from q (no rows array), scored, max over rows.

  refs: the candidate pieces, q, the table, then one output per piece.
  """
  cand_refs, (q_ref, table_ref), out_refs = (
    refs[:num_pieces],
    refs[num_pieces : num_pieces + 2],
    refs[num_pieces + 2 :],
  )
  g, d = q_ref.shape[1], q_ref.shape[2]
  last = pl.program_id(2) * query_tile  # the tile's first position ends its window
  start = jnp.maximum(last - query_tile + 1, 0)
  precision = jax.lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None
  dims = (((1,), (1,)), ((), ()))
  dot = lambda a, b: jax.lax.dot_general(
    a, b, dims, precision=precision, preferred_element_type=jnp.float32
  )
  cands, summaries, best = [], [], []
  for cand_ref in cand_refs:
    cand = cand_ref[...]
    safe = jnp.maximum(cand, 0)
    if bounds:  # table rows are [max, min]
      summaries.append(
        (
          table_ref[safe, pl.ds(0, d)].astype(compute_dtype),
          table_ref[safe, pl.ds(d, d)].astype(compute_dtype),
        )
      )
    else:
      summaries.append(table_ref[safe, :].astype(compute_dtype))
    cands.append(cand)
    best.append(jnp.full(cand.shape, -jnp.inf, jnp.float32))
  rows = chunk_q * g
  for c in range(0, query_tile, chunk_q):
    x = q_ref[pl.ds(start + c, chunk_q), :, :].reshape(rows, d)
    pos = start + c + jnp.arange(rows, dtype=jnp.int32) // g
    if bounds:
      zero = jnp.zeros_like(x)
      upper_x = jnp.maximum(x, zero).astype(compute_dtype)
      lower_x = jnp.minimum(x, zero).astype(compute_dtype)
    else:
      x = x.astype(compute_dtype)
    for n, summary in enumerate(summaries):
      if bounds:
        scores = dot(upper_x, summary[0]) + dot(lower_x, summary[1])
      else:
        scores = dot(x, summary)
      scores = jnp.where((pos <= last)[:, None], scores, -jnp.inf)
      best[n] = jnp.maximum(best[n], jnp.max(scores, axis=0))
  for cand, b, out_ref in zip(cands, best, out_refs, strict=True):
    out_ref[...] = jnp.where(cand >= 0, b, -jnp.inf)


def score_candidates_from_queries_pallas(
  routing_q: jax.Array,
  table: jax.Array,
  candidates: jax.Array,
  *,
  query_tile: int,
  summary: str = "mean",
  compute_dtype: jnp.dtype | None = None,
  block_sizes: BlockSizes | None = None,
  interpret: bool = False,
) -> jax.Array:
  """`score_candidates` with the routing rows built inside the kernel from routing_q.

  Tile i's rows are the routing queries at positions [i*Q - Q + 1, i*Q] (clamped at 0:
  SSA's causal routing window) x the G query heads of each KV head; with
  summary="bounds" a row r is [relu(r), min(r, 0)] against a table of [max, min]. The
  result equals `score_candidates(rows, table, candidates)` for those rows, without
  materialising them (at 1M tokens the f32 rows are 17 GB, read once per tree level).

  Args:
    routing_q: [batch, T, q_heads, d]; T a multiple of query_tile.
    table: [batch, kv_heads, nodes, D], D = d (mean) or 2 d (bounds: [max, min]).
    candidates: int32 [batch, kv_heads, tiles, C], -1 for an empty slot; tiles = T / Q.
    query_tile: Q.
    summary: "mean" or "bounds".
    compute_dtype: matmul operand dtype (None: routing_q's); accumulation is f32.

  Returns:
    float32 [batch, kv_heads, tiles, C]; -inf where the candidate is -1.
  """
  block_sizes = block_sizes or BlockSizes.get_default()
  b, t, hq, d = routing_q.shape
  _, hkv, nodes, dt = table.shape
  num_tiles, c = candidates.shape[2:]
  if summary not in ("mean", "bounds"):
    raise ValueError(f"{summary=} must be 'mean' or 'bounds'")
  bounds = summary == "bounds"
  if dt != (2 * d if bounds else d) or hq % hkv or table.shape[0] != b:
    raise ValueError(f"{table.shape=} does not fit {routing_q.shape=} and {summary=}")
  if t % query_tile or candidates.shape[:3] != (b, hkv, t // query_tile):
    raise ValueError(f"{candidates.shape=} must be [b, kv_heads, T / {query_tile=}, C]")
  g = hq // hkv
  # Rows per matmul: a power of two of at least 16 (Triton) where the tile allows it.
  chunk_q = min(query_tile, max(1, block_sizes.block_rows // g))
  if query_tile % chunk_q:
    raise ValueError(f"{query_tile=} must be a multiple of {chunk_q=}")
  compute_dtype = compute_dtype or routing_q.dtype
  if jnp.dtype(compute_dtype).itemsize < table.dtype.itemsize:
    # Rounded once here as the kernel would round each gathered row: the same operands,
    # half the bytes gathered (the last level's f32 table does not fit in L2; bf16 does).
    table = table.astype(compute_dtype)
  widths = _pieces(c)
  candidates = _pad_to(candidates.astype(jnp.int32), 3, sum(widths), constant_values=-1)
  offsets = np.cumsum([0] + widths)
  pieces = [candidates[..., o : o + w] for o, w in zip(offsets, widths, strict=False)]
  q5 = routing_q.reshape(b, t, hkv, g, d)
  piece_spec = lambda w: pl.BlockSpec((None, None, None, w), lambda bi, hi, i: (bi, hi, i, 0))
  scores = pl.pallas_call(
    functools.partial(
      _score_q_kernel,
      num_pieces=len(widths),
      query_tile=query_tile,
      chunk_q=chunk_q,
      bounds=bounds,
      compute_dtype=compute_dtype,
    ),
    grid=(b, hkv, num_tiles),
    in_specs=[piece_spec(w) for w in widths]
    + [
      pl.BlockSpec((None, t, None, g, d), lambda bi, hi, i: (bi, 0, hi, 0, 0)),
      pl.BlockSpec((None, None, nodes, dt), lambda bi, hi, i: (bi, hi, 0, 0)),
    ],
    out_specs=[piece_spec(w) for w in widths],
    out_shape=[jax.ShapeDtypeStruct((b, hkv, num_tiles, w), jnp.float32) for w in widths],
    compiler_params=plgpu.CompilerParams(
      num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
    ),
    interpret=interpret,
    name="ssa_score_candidates_from_queries",
  )(*pieces, q5, table)
  return jnp.concatenate(scores, axis=-1)[..., :c]

"""Selector scoring in plain JAX: the reference of the Pallas kernels and SSA's `xla` path.

For every query tile, gather its candidate nodes' summaries (one row of a level's table
each) and reduce the tile's routing rows (its routing window's queries x the G heads of
the group) to one score per candidate: the max over rows of row . summary.
Top-k stays outside, in XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
CHUNK_ELEMENTS = 1 << 25  # f32 elements of row x candidate scores materialised per chunk


def score_candidates(
  rows: jax.Array,
  table: jax.Array,
  candidates: jax.Array,
  *,
  tiles_per_chunk: int | None = None,
) -> jax.Array:
  """Max over each tile's rows of row . table[candidate].

  Args:
    rows: [batch, kv_heads, tiles, R, D] routing rows of every tile.
    table: [batch, kv_heads, nodes, D] summaries of one tree level.
    candidates: int32 [batch, kv_heads, tiles, C] node ids, -1 for an empty slot.
    tiles_per_chunk: tiles scored together (default: as many as fit CHUNK_ELEMENTS).

  Returns:
    float32 [batch, kv_heads, tiles, C]; -inf where the candidate is -1.
  """
  b, h, num_tiles, r, _ = rows.shape
  c = candidates.shape[-1]
  batch_idx = jnp.arange(b)[:, None, None]
  head_idx = jnp.arange(h)[None, :, None]

  def one_tile(args):
    rows_t, cand_t = args  # [b, h, R, D], [b, h, C]
    summaries = table[batch_idx, head_idx, jnp.maximum(cand_t, 0)]  # [b, h, C, D]
    scores = jnp.einsum(
      "bhrd,bhcd->bhrc",
      rows_t.astype(jnp.float32),
      summaries.astype(jnp.float32),
      precision=HIGHEST,
    ).max(axis=2)
    return jnp.where(cand_t >= 0, scores, -jnp.inf)

  if tiles_per_chunk is None:
    tiles_per_chunk = max(1, min(num_tiles, CHUNK_ELEMENTS // max(1, b * h * r * c)))
  scores = jax.lax.map(
    one_tile,
    (jnp.moveaxis(rows, 2, 0), jnp.moveaxis(candidates, 2, 0)),
    batch_size=tiles_per_chunk,
  )
  return jnp.moveaxis(scores, 0, 2)

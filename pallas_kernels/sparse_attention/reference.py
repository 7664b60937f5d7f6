"""Block-sparse attention in plain JAX: the reference of the Pallas kernels and SSA's `xla` path.

Every query tile (Q consecutive queries) attends, with one softmax, to the KV blocks
listed for it in `block_ids`, causally: a query at position p sees a listed key at
position s only if s <= p. The GQA group's G query heads share their KV head's list,
so a tile's work is one (Q * G) x (S * B) problem per KV head.

Work is done a chunk of tiles at a time under `jax.checkpoint`, so memory is
O(T * keys per query / chunks) in the forward pass and the backward pass recomputes
a chunk instead of storing it; nothing is T x T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
# Upper bound on the logits (f32 elements) one chunk of tiles materialises.
CHUNK_ELEMENTS = 1 << 25


def sparse_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  block_ids: jax.Array,
  *,
  block_size: int,
  query_tile: int,
  scale: float,
  tiles_per_chunk: int | None = None,
  causal: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """Attention of each query tile to its listed KV blocks.

  Args:
    q: queries [batch, T, q_heads, head_dim]; T a multiple of `block_size`.
    k, v: keys and values [batch, T, kv_heads, head_dim].
    block_ids: int32 [batch, kv_heads, T // query_tile, slots]: the blocks
      each tile attends to, -1 for an empty slot. A tile's blocks must be distinct.
      A query that sees no key gets out = 0 and lse = -inf.
    block_size: keys per block (B).
    query_tile: queries per tile (Q); divides B.
    scale: softmax scale.
    tiles_per_chunk: tiles processed together (default: as many as fit CHUNK_ELEMENTS).
    causal: False drops the causal mask: every listed key is seen (the caller lists only
      earlier blocks, e.g. a sequence shard's blocks held by another shard).

  Returns:
    out [batch, T, q_heads, head_dim] in q's dtype, and the log-sum-exp of the scaled
    logits, float32 [batch, q_heads, T].
  """
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  num_tiles, slots = block_ids.shape[2:]
  num_blocks = t // block_size
  rows = query_tile * g

  # Tile-major layouts; a tile's rows are its Q queries x G heads of one KV head.
  q_tiles = (
    q.reshape(b, num_tiles, query_tile, hkv, g, d)
    .transpose(1, 0, 3, 2, 4, 5)
    .reshape(num_tiles, b, hkv, rows, d)
  )
  k_blocks = k.reshape(b, num_blocks, block_size, hkv, d).transpose(0, 3, 1, 2, 4)
  v_blocks = v.reshape(b, num_blocks, block_size, hkv, d).transpose(0, 3, 1, 2, 4)
  ids_tiles = block_ids.transpose(2, 0, 1, 3)
  batch_idx = jnp.arange(b)[:, None, None]
  head_idx = jnp.arange(hkv)[None, :, None]
  key_offsets = jnp.arange(block_size)
  row_query = jnp.arange(rows) // g  # query within the tile for each row

  def one_tile(args):
    q_t, ids_t, tile = args
    safe_ids = jnp.maximum(ids_t, 0)
    k_t = k_blocks[batch_idx, head_idx, safe_ids].astype(jnp.float32)
    v_t = v_blocks[batch_idx, head_idx, safe_ids].astype(jnp.float32)
    logits = jnp.einsum(
      "bkrd,bksnd->bkrsn",
      q_t.astype(jnp.float32),
      k_t,
      precision=HIGHEST,
    )
    logits = logits * scale
    q_pos = tile * query_tile + row_query  # [R]
    k_pos = safe_ids[..., None] * block_size + key_offsets  # [b, K, S, Bs]
    visible = (ids_t >= 0)[:, :, None, :, None]
    if causal:
      visible = visible & (k_pos[:, :, None, :, :] <= q_pos[None, None, :, None, None])
    logits = jnp.where(visible, logits, -jnp.inf)
    # A row that sees no key (possible for a partial block list, e.g. one shard's share
    # of a tile's blocks) gives out = 0 and lse = -inf, so partial results merge by lse.
    m = jnp.max(logits, axis=(-2, -1))
    m_safe = jnp.where(m > -jnp.inf, m, 0.0)
    p = jnp.exp(logits - m_safe[..., None, None])
    l_sum = jnp.sum(p, axis=(-2, -1))
    o = jnp.einsum("bkrsn,bksnd->bkrd", p, v_t, precision=HIGHEST)
    l_safe = jnp.where(l_sum > 0, l_sum, 1.0)
    return o / l_safe[..., None], jnp.where(l_sum > 0, m_safe + jnp.log(l_safe), -jnp.inf)

  if tiles_per_chunk is None:
    per_tile = b * hq * query_tile * slots * block_size
    tiles_per_chunk = max(1, min(num_tiles, CHUNK_ELEMENTS // per_tile))
  o_tiles, lse_tiles = jax.lax.map(
    jax.checkpoint(one_tile),
    (q_tiles, ids_tiles, jnp.arange(num_tiles)),
    batch_size=tiles_per_chunk,
  )
  out = (
    o_tiles.reshape(num_tiles, b, hkv, query_tile, g, d)
    .transpose(1, 0, 3, 2, 4, 5)
    .reshape(b, t, hq, d)
  )
  lse = (
    lse_tiles.reshape(num_tiles, b, hkv, query_tile, g).transpose(1, 2, 4, 0, 3).reshape(b, hq, t)
  )
  return out.astype(q.dtype), lse

"""Sparsity metadata for the block-sparse attention kernels, built on device in XLA.

Kept out of the kernel bodies (as splash attention keeps its mask info apart):

- `compact_block_lists`: each tile's list with empty slots and blocks after the tile's
  own block dropped, sorted ascending and padded with -1 to a power of two. Sorted, the
  tile's own block (the only one that needs a causal mask) is its last valid entry.
- `transpose_block_lists`: the transposed (CSR) index of which tiles listed each
  block, for the key-centric dk/dv pass.

Both cost O(tiles * slots) memory and a sort of that many entries: linear in T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_EMPTY = np.iinfo(np.int32).max


def next_power_of_2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def compact_block_lists(block_ids: jax.Array, *, block_size: int, query_tile: int) -> jax.Array:
  """Valid blocks of each tile, ascending, then -1s; the slot axis padded to a power of 2.

  Args:
    block_ids: int32 [batch, kv_heads, tiles, slots], -1 for an empty slot.
    block_size: keys per block (B).
    query_tile: queries per tile (Q).

  Returns:
    int32 [batch, kv_heads, tiles, next_power_of_2(slots)]. Blocks after the tile's own
    block are dropped: no query of the tile sees any of their keys.
  """
  num_tiles, slots = block_ids.shape[2:]
  own_block = (jnp.arange(num_tiles, dtype=jnp.int32) * query_tile) // block_size
  valid = (block_ids >= 0) & (block_ids <= own_block[None, None, :, None])
  keys = jnp.sort(jnp.where(valid, block_ids, _EMPTY), axis=-1)
  ids = jnp.where(keys == _EMPTY, -1, keys).astype(jnp.int32)
  padded = next_power_of_2(slots)
  if padded != slots:
    ids = jnp.pad(ids, [(0, 0)] * 3 + [(0, padded - slots)], constant_values=-1)
  return ids


def transpose_block_lists(
  ids: jax.Array, *, num_blocks: int, block_size: int, query_tile: int
) -> tuple[jax.Array, jax.Array]:
  """CSR index of the tiles that list each block.

  Args:
    ids: compacted lists from `compact_block_lists`, int32 [batch, kv_heads, tiles, S].
    num_blocks: KV blocks in the sequence.
    block_size: keys per block (B).
    query_tile: queries per tile (Q).

  Returns:
    tiles_sorted: int32 [batch, kv_heads, tiles * S]: for block j, the tiles that list
      it are tiles_sorted[start_j:end_j], ascending (entries past the last block's end
      are padding).
    meta: int32 [batch, kv_heads, num_blocks, 4]: (start_j, diag_end_j, end_j, j).
      Entries [start_j, diag_end_j) are tiles inside block j (they need the causal
      mask); entries [diag_end_j, end_j) are later tiles, which see all of block j.
  """
  b, h, num_tiles, slots = ids.shape
  flat = ids.reshape(b, h, num_tiles * slots)
  key = jnp.where(flat >= 0, flat, num_blocks)
  tile_of = jnp.broadcast_to(jnp.repeat(jnp.arange(num_tiles, dtype=jnp.int32), slots), key.shape)
  # The flat order is tile-major, so a stable sort by block keeps tiles ascending.
  key_sorted, tiles_sorted = jax.lax.sort((key, tile_of), dimension=-1, num_keys=1, is_stable=True)
  tiles_per_block = block_size // query_tile
  in_block = (tile_of // tiles_per_block == key).astype(jnp.int32)
  batch_idx = jnp.arange(b)[:, None, None]
  head_idx = jnp.arange(h)[None, :, None]
  counts = jnp.zeros((b, h, num_blocks + 1), jnp.int32).at[batch_idx, head_idx, key].add(1)
  diag = jnp.zeros((b, h, num_blocks + 1), jnp.int32).at[batch_idx, head_idx, key].add(in_block)
  counts, diag = counts[..., :num_blocks], diag[..., :num_blocks]
  end = jnp.cumsum(counts, axis=-1, dtype=jnp.int32)
  start = end - counts
  block = jnp.broadcast_to(jnp.arange(num_blocks, dtype=jnp.int32), end.shape)
  meta = jnp.stack([start, start + diag, end, block], axis=-1)
  del key_sorted
  return tiles_sorted, meta


def chunk_block_lists(meta: jax.Array, *, entries: int, chunk: int) -> jax.Array:
  """Split every CSR row into chunks of at most `chunk` entries (load balance).

  A block listed by many tiles (a sink block is listed by every tile) would otherwise
  be one program's serial loop, the critical path of the whole pass.

  Args:
    meta: [batch, kv_heads, num_blocks, 4] from `transpose_block_lists`.
    entries: length of the CSR entry axis (tiles * slots).
    chunk: most entries per chunk.

  Returns:
    int32 [batch, kv_heads, num_chunks, 4]: (start, diag_end, end, block) per chunk,
    ordered by block; num_chunks = num_blocks + entries // chunk + 1 is a static bound,
    unused chunks are (0, 0, 0, num_blocks).
  """
  b, h, num_blocks, _ = meta.shape
  start, diag_end, end = meta[..., 0], meta[..., 1], meta[..., 2]
  per_block = (end - start + chunk - 1) // chunk  # 0 for a block nobody listed
  first = jnp.cumsum(per_block, axis=-1) - per_block  # first chunk of each block
  num_chunks = num_blocks + entries // chunk + 1
  u = jnp.arange(num_chunks, dtype=jnp.int32)
  # The block of chunk u: the last block whose first chunk is <= u. A block nobody
  # listed shares its `first` with the next listed block, which is the later one.
  search = lambda f: jnp.searchsorted(f, u, side="right")
  block = jax.vmap(jax.vmap(search))(first)
  block = (block - 1).astype(jnp.int32)
  total = jnp.sum(per_block, axis=-1, keepdims=True)
  used = u[None, None, :] < total
  safe = jnp.clip(block, 0, num_blocks - 1)
  take = lambda x: jnp.take_along_axis(x, safe, axis=-1)
  c_start = take(start) + (u[None, None, :] - take(first)) * chunk
  c_end = jnp.minimum(c_start + chunk, take(end))
  c_diag = jnp.clip(take(diag_end), c_start, c_end)
  chunk_meta = jnp.stack([c_start, c_diag, c_end, block], axis=-1)
  unused = jnp.array([0, 0, 0, num_blocks], jnp.int32)
  return jnp.where(used[..., None], chunk_meta, unused).astype(jnp.int32)

"""Sparsity metadata for the block-sparse attention kernels, built on device in XLA.

Kept out of the kernel bodies (as splash attention keeps its mask info apart):

- `compact_block_lists`: each tile's list with empty slots and blocks after the tile's
  own block dropped, sorted ascending and padded with -1 to a power of two. Sorted, the
  tile's own block (the only one that needs a causal mask) is its last valid entry.
- `transpose_block_lists`: the transposed (CSR) index of which tiles listed each
  block, for the key-centric dk/dv pass.
- `segment_block_lists`: that index cut into bounded segments (one dk/dv program each)
  with compact slots for the partial sums of long rows.

Both cost O(tiles * slots) memory and a sort of that many entries: linear in T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_EMPTY = np.iinfo(np.int32).max


def next_power_of_2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def compact_block_lists(
  block_ids: jax.Array, *, block_size: int, query_tile: int, causal: bool = True
) -> jax.Array:
  """Valid blocks of each tile, ascending, then -1s; the slot axis padded to a power of 2.

  Args:
    block_ids: int32 [batch, kv_heads, tiles, slots], -1 for an empty slot.
    block_size: keys per block (B).
    query_tile: queries per tile (Q).
    causal: drop blocks after the tile's own block; False keeps every listed block
      (attention without a causal mask, see `sparse_attention_pallas`).

  Returns:
    int32 [batch, kv_heads, tiles, next_power_of_2(slots)]. Blocks after the tile's own
    block are dropped: no query of the tile sees any of their keys.
  """
  num_tiles, slots = block_ids.shape[2:]
  own_block = (jnp.arange(num_tiles, dtype=jnp.int32) * query_tile) // block_size
  valid = block_ids >= 0
  if causal:
    valid = valid & (block_ids <= own_block[None, None, :, None])
  keys = jnp.sort(jnp.where(valid, block_ids, _EMPTY), axis=-1)
  ids = jnp.where(keys == _EMPTY, -1, keys).astype(jnp.int32)
  padded = next_power_of_2(slots)
  if padded != slots:
    ids = jnp.pad(ids, [(0, 0)] * 3 + [(0, padded - slots)], constant_values=-1)
  return ids


def pack_runs(runs: list[jax.Array]) -> jax.Array:
  """The concatenation of `runs` with its empty (-1) slots moved to the end: the layout
  of `compact_block_lists` without a sort, for lists whose valid blocks are ascending
  across the runs and none after the tile's own block (the caller's promise).

  Args:
    runs: int32 arrays [batch, kv_heads, tiles, n_i]; in each, the valid entries are
      one contiguous stretch (-1 before and/or after it).

  Returns:
    int32 [batch, kv_heads, tiles, next_power_of_2(sum n_i)]: the valid entries of the
    runs in order, then -1s. One gather per run, fused by XLA (no sort).
  """
  lead = runs[0].shape[:-1]
  width = next_power_of_2(sum(r.shape[-1] for r in runs))
  pos = jnp.arange(width, dtype=jnp.int32).reshape((1,) * len(lead) + (width,))
  out = jnp.full(lead + (width,), -1, jnp.int32)
  offset = jnp.zeros(lead + (1,), jnp.int32)
  for run in runs:
    run = run.astype(jnp.int32)
    valid = run >= 0
    count = jnp.sum(valid, axis=-1, keepdims=True, dtype=jnp.int32)
    first = jnp.argmax(valid, axis=-1, keepdims=True).astype(jnp.int32)
    src = jnp.clip(first + pos - offset, 0, run.shape[-1] - 1)
    take = jnp.take_along_axis(run, src, axis=-1)
    out = jnp.where((pos >= offset) & (pos < offset + count), take, out)
    offset = offset + count
  return out


def pad_slots(ids: jax.Array) -> jax.Array:
  """The slot axis padded with -1 to a power of two (the kernels' block shapes)."""
  slots = ids.shape[-1]
  padded = next_power_of_2(slots)
  if padded == slots:
    return ids.astype(jnp.int32)
  return jnp.pad(ids.astype(jnp.int32), [(0, 0)] * 3 + [(0, padded - slots)], constant_values=-1)


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


def segment_block_lists(
  meta: jax.Array, *, entries: int, segment: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Split every CSR row into segments of at most `segment` entries (load balance).

  A block listed by many tiles (a sink block is listed by every tile; a popular routed
  block by thousands) would otherwise be one program's serial loop. Every block keeps
  at least one segment (a block nobody listed gets dk = dv = 0 from it). A block with one
  segment has its dk/dv written directly; the segments of a block with several write f32
  partial sums to compact slots, added afterwards: the partial buffer is bounded by
  2 * entries / segment slots (a row of n > segment entries has < 2n / segment segments),
  so it stays small against dk/dv for long segments.

  Args:
    meta: [batch, kv_heads, num_blocks, 4] from `transpose_block_lists`.
    entries: length of the CSR entry axis (tiles * slots).
    segment: most entries per segment; 0 = one segment per block, no partials.

  Returns:
    seg_meta: int32 [batch, kv_heads, num_items, 5]: (start, diag_end, end, block, slot)
      per segment, ordered by block (the long rows of early blocks, the sink first, are
      scheduled first); slot = -1 for a block's only segment, else its partial slot;
      num_items = num_blocks + entries // segment is a static bound, unused items are
      (0, 0, 0, num_blocks, -1).
    slot_group: int32 [batch, kv_heads, num_slots]: the group (a block with several
      segments, numbered in order) each slot adds into; num_slots for an unused slot.
    group_block: int32 [batch, kv_heads, num_slots]: the block of each group;
      num_blocks for an unused group.
  """
  b, h, num_blocks, _ = meta.shape
  start, diag_end, end = meta[..., 0], meta[..., 1], meta[..., 2]
  if not segment:
    slot = jnp.full((b, h, num_blocks, 1), -1, jnp.int32)
    none = jnp.ones((b, h, 1), jnp.int32)
    return jnp.concatenate([meta, slot], axis=-1), none, none * num_blocks
  per_block = jnp.maximum((end - start + segment - 1) // segment, 1)
  first = jnp.cumsum(per_block, axis=-1) - per_block  # first segment of each block
  multi = per_block > 1
  slots_of = jnp.where(multi, per_block, 0)
  first_slot = jnp.cumsum(slots_of, axis=-1) - slots_of
  rank = (jnp.cumsum(multi, axis=-1) - multi).astype(jnp.int32)  # group of a multi block
  num_items = num_blocks + entries // segment
  num_slots = max(1, 2 * entries // segment)
  u = jnp.arange(num_items, dtype=jnp.int32)
  # The block of segment u: the last block whose first segment is <= u (firsts are
  # strictly increasing: every block has a segment).
  search = lambda f: jnp.searchsorted(f, u, side="right")
  block = (jax.vmap(jax.vmap(search))(first) - 1).astype(jnp.int32)
  used = u[None, None, :] < jnp.sum(per_block, axis=-1, keepdims=True)
  take = lambda x: jnp.take_along_axis(x, block, axis=-1)
  offset = u[None, None, :] - take(first)
  s_start = take(start) + offset * segment
  s_end = jnp.minimum(s_start + segment, take(end))
  s_diag = jnp.clip(take(diag_end), s_start, s_end)
  slot = jnp.where(take(multi), take(first_slot) + offset, -1)
  seg_meta = jnp.stack([s_start, s_diag, s_end, block, slot], axis=-1)
  unused = jnp.array([0, 0, 0, num_blocks, -1], jnp.int32)
  seg_meta = jnp.where(used[..., None], seg_meta, unused).astype(jnp.int32)
  bi = jnp.arange(b)[:, None, None]
  hi = jnp.arange(h)[None, :, None]
  target = jnp.where(used & (slot >= 0), slot, num_slots)
  slot_group = jnp.full((b, h, num_slots), num_slots, jnp.int32)
  slot_group = slot_group.at[bi, hi, target].set(take(rank), mode="drop")
  group_target = jnp.where(multi, rank, num_slots)
  blocks = jnp.broadcast_to(jnp.arange(num_blocks, dtype=jnp.int32), (b, h, num_blocks))
  group_block = jnp.full((b, h, num_slots), num_blocks, jnp.int32)
  group_block = group_block.at[bi, hi, group_target].set(blocks, mode="drop")
  return seg_meta, slot_group, group_block

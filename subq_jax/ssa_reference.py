"""Brute-force float32 ground truth for every kind (`implementation="reference"`).

Written to be read, not to be fast: it materialises T x T masks and scores every tree
node for every tile, so it is for small sequences only. It shares no code with the
blockwise path in `subq_jax.ssa`: summaries are taken directly over each node's keys,
the frontier comes from its definition (complete nodes inside the prefix whose parent
is not), the routing window from explicit positions, and attention is a dense masked
softmax over the union of the attended blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from subq_jax.config import SSAConfig

HIGHEST = jax.lax.Precision.HIGHEST


def attention(q, k, v, config: SSAConfig, routing_q, routing_k, indexer_weights, scale, far=None):
  """(out, AttentionInfo) of `config.kind`, as `ssa_attention` with implementation='reference'.

  `far`: None or (far_q, far_k), which score the keys outside the query's own block and
  the `local_blocks` before it (`SSAConfig.far_distance`).
  """
  from subq_jax.ssa import AttentionInfo

  b, t, hq, _ = q.shape
  hkv = k.shape[2]
  causal = jnp.tril(jnp.ones((t, t), bool))
  selected = None
  if config.kind == "dense":
    allowed = jnp.broadcast_to(causal, (b, hkv, t, t))
  elif config.kind == "indexer":
    score, allowed = _indexer_mask(routing_q, routing_k, indexer_weights, config)
    allowed = jnp.broadcast_to(allowed[:, None], (b, hkv, t, t))
  else:
    rq = q if routing_q is None else routing_q
    rk = k if routing_k is None else routing_k
    selected = select_blocks(rq, rk, config)
    allowed = block_mask(selected, config, t)
  near = None
  if far is not None:
    pos = jnp.arange(t)
    near = (
      pos[None, :] // config.block_size >= pos[:, None] // config.block_size - config.local_blocks
    )
  out, _ = masked_attention(q, k, v, allowed, scale, far, near)
  pairs = allowed.sum(axis=(2, 3)).astype(jnp.float32)
  loss = None
  if config.kind == "indexer":
    loss = _indexer_loss(q, k, allowed[:, 0], score, scale)
  return out.astype(q.dtype), AttentionInfo(selected, pairs, loss)


def masked_attention(q, k, v, allowed, scale, far=None, near=None):
  """Dense float32 softmax attention under `allowed` [b, kv_heads, T, T]; (out, lse).

  With `far` = (far_q, far_k), a (query, key) pair outside `near` [T, T] is scored
  far_q . far_k instead of q . k.
  """
  b, t, hq, d = q.shape
  g = hq // k.shape[2]
  f32 = jnp.float32
  v_rep = jnp.repeat(v.astype(f32), g, axis=2)

  def scores(q_, k_):
    k_rep = jnp.repeat(k_.astype(f32), g, axis=2)
    return jnp.einsum("bqhd,bkhd->bhqk", q_.astype(f32), k_rep, precision=HIGHEST) * scale

  logits = scores(q, k)
  if far is not None:
    logits = jnp.where(near, logits, scores(*far))
  logits = jnp.where(jnp.repeat(allowed, g, axis=1), logits, -jnp.inf)
  lse = jax.nn.logsumexp(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(logits - lse[..., None]), v_rep, precision=HIGHEST)
  return out, lse


def block_mask(selected, config: SSAConfig, seq_len: int):
  """[b, kv_heads, T, T] mask of the block kinds: key s is visible to query p if s <= p
  and block(s) is p's own block, one of the W before it, a sink block, or chosen by
  p's tile."""
  bs = config.block_size
  pos = jnp.arange(seq_len)
  qblock, kblock = pos[:, None] // bs, pos[None, :] // bs
  fixed = (kblock >= qblock - config.local_blocks) | (kblock < config.sink_blocks)
  blocks = jnp.arange(_num_blocks(seq_len, bs))
  chosen_by_tile = (selected[..., None] == blocks).any(-2)  # [b, kv, tiles, blocks]
  chosen = chosen_by_tile[:, :, pos // config.tile][..., pos // bs]  # [b, kv, T, T]
  return (pos[None, :] <= pos[:, None]) & (fixed | chosen)


def _num_blocks(seq_len: int, block_size: int) -> int:
  return -(-seq_len // block_size)


def select_blocks(routing_q, routing_k, config: SSAConfig):
  """Chosen blocks [b, kv_heads, tiles, top_k], ascending, -1 empty; by brute force."""
  b, t, hq, _ = routing_q.shape
  hkv = routing_k.shape[2]
  bs, q_tile, f = config.block_size, config.tile, config.fanout
  num_blocks = _num_blocks(t, bs)
  num_tiles = num_blocks * bs // q_tile
  tile_start = jnp.arange(num_tiles) * q_tile
  # Routable blocks; a tile made only of padding routes to none.
  prefix = jnp.where(tile_start < t, jnp.maximum(tile_start // bs - config.local_blocks, 0), 0)
  rq = jax.lax.stop_gradient(routing_q).astype(jnp.float32)
  rk = jax.lax.stop_gradient(routing_k).astype(jnp.float32)
  pos = jnp.arange(t)
  # Routing window of tile i: positions (i*Q - Q, i*Q], clipped to the sequence.
  window = (pos[None, :] <= tile_start[:, None]) & (pos[None, :] > tile_start[:, None] - q_tile)

  if config.kind == "sliding":
    nodes = jnp.arange(num_blocks)
    chosen = (nodes >= prefix[:, None] - config.top_k) & (nodes < prefix[:, None])
    chosen &= nodes >= config.sink_blocks
    return _ids_from_mask(jnp.broadcast_to(chosen, (b, hkv, num_tiles, num_blocks)), config.top_k)

  def scores_at(level):
    """Score of every node of `level` for every tile: [b, kv, tiles, nodes]."""
    span = bs * f ** (level - 1)  # keys per node
    member = (pos // span)[None, :] == jnp.arange(-(-t // span))[:, None]  # [nodes, T]
    qg = rq.reshape(b, t, hkv, hq // hkv, -1)
    if config.summary == "mean":
      mean = jnp.einsum("nt,btkd->bknd", member / member.sum(1, keepdims=True), rk)
      per_query = jnp.einsum("btkgd,bknd->btkgn", qg, mean, precision=HIGHEST)
    else:
      keys = jnp.where(member[None, :, :, None, None], rk[:, None], jnp.nan)  # [b, n, T, kv, d]
      hi = jnp.nanmax(keys, axis=2).transpose(0, 2, 1, 3)
      lo = jnp.nanmin(keys, axis=2).transpose(0, 2, 1, 3)
      per_query = jnp.einsum("btkgd,bknd->btkgn", jnp.maximum(qg, 0), hi, precision=HIGHEST)
      per_query += jnp.einsum("btkgd,bknd->btkgn", jnp.minimum(qg, 0), lo, precision=HIGHEST)
    per_query = per_query.max(axis=3)  # over the G heads: [b, T, kv, nodes]
    in_window = window[None, :, :, None, None]  # [1, tiles, T, 1, 1]
    per_tile = jnp.where(in_window, per_query[:, None], -jnp.inf).max(axis=2)
    return per_tile.transpose(0, 2, 1, 3)

  if config.kind == "block_topk":
    scores = scores_at(1)
    nodes = jnp.arange(num_blocks)
    ok = (nodes >= config.sink_blocks) & (nodes < prefix[:, None])
    return _top_ids(jnp.where(ok, scores, -jnp.inf), config.top_k)

  levels = config.num_levels(num_blocks)
  kept = None  # [b, kv, tiles, nodes one level up] mask
  for level in range(levels, 0, -1):
    span = f ** (level - 1)  # blocks per node
    nodes = jnp.arange(-(-num_blocks // span))
    inside = (nodes + 1) * span <= prefix[:, None]
    parent_inside = (nodes // f + 1) * span * f <= prefix[:, None]
    allowed = jnp.broadcast_to(inside & ~parent_inside, (b, hkv, num_tiles, nodes.size))
    if kept is not None:
      allowed = allowed | kept[..., nodes // f]
    if level == 1:
      allowed &= nodes >= config.sink_blocks
    masked = jnp.where(allowed, scores_at(level), -jnp.inf)
    keep = config.top_k if level == 1 else config.beam_at(level)
    ids = _top_ids(masked, keep)
    kept = (ids[..., None] == nodes).any(-2)
  return ids


def _top_ids(masked, keep):
  """Best `keep` finite entries of the last axis as ascending ids, -1 padded to `keep`."""
  n = masked.shape[-1]
  best, idx = jax.lax.top_k(masked, min(keep, n))
  ids = jnp.where(best > -jnp.inf, idx, -1)
  ids = jnp.pad(ids, ((0, 0),) * 3 + ((0, keep - ids.shape[-1]),), constant_values=-1)
  big = jnp.iinfo(jnp.int32).max
  ids = jnp.sort(jnp.where(ids >= 0, ids, big), axis=-1)
  return jnp.where(ids == big, -1, ids).astype(jnp.int32)


def _ids_from_mask(mask, keep):
  return _top_ids(jnp.where(mask, 0.0, -jnp.inf), keep)


def _indexer_mask(index_q, index_k, weights, config: SSAConfig):
  """(scores I [b, T, T], mask [b, T, T] of each query's best min(p + 1,
  keys_per_query) earlier tokens)."""
  t = index_q.shape[1]
  f32 = jnp.float32
  logits = jnp.einsum("bqhd,bkd->bqhk", index_q.astype(f32), index_k[:, :, 0].astype(f32))
  score = jnp.einsum("bqhk,bqh->bqk", jax.nn.relu(logits), weights.astype(f32))
  causal = jnp.tril(jnp.ones((t, t), bool))
  score = jnp.where(causal, score, -jnp.inf)
  # lax.top_k breaks ties (ReLU zeros) towards lower positions, as the xla path does.
  # Slots past a query's causal prefix hold -inf scores at non-causal positions.
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(score), min(config.keys_per_query, t))
  return score, (idx[..., None] == jnp.arange(t)).any(-2) & causal


def _indexer_loss(q, k, allowed, score, scale):
  """[b]: mean over queries of KL(p || softmax(score)) on the allowed keys, where p is
  the attention probability summed over all query heads / heads (a constant target)."""
  b, t, hq, _ = q.shape
  g = hq // k.shape[2]
  f32 = jnp.float32
  k_rep = jnp.repeat(k.astype(f32), g, axis=2)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(f32), k_rep, precision=HIGHEST) * scale
  logits = jnp.where(allowed[:, None], logits, -jnp.inf)
  p = jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1).sum(1) / hq)  # [b, T, T]
  log_q = jax.nn.log_softmax(jnp.where(allowed, score, -jnp.inf), axis=-1)
  kl = jnp.where(allowed & (p > 0), p * (jnp.log(jnp.maximum(p, 1e-30)) - log_q), 0.0)
  return kl.sum(-1).mean(-1)

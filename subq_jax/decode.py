"""Greedy decoding with a KV cache, for every attention kind.

    logits_BxV, cache, pairs = prefill(model, tokens_BxT, lengths_B)
    logits_BxV, cache = step(model, cache, next_tokens_B)
    generate_fn = make_generate(graphdef, max_new_tokens)   # jitted prefill + scan of steps

`prefill` runs the full forward once over right-padded prompts (`tokens_BxT`, row b's
prompt is its first `lengths_B[b]` tokens) and keeps every layer's keys and values in
fixed-size buffers of T positions; each `step` feeds one token per row at that row's own
position (rows may have prompts of different lengths) and attends to the cache. Buffers
never change shape, so a jitted step compiles once.

Exactness. Every mechanism is causal, so the output at position t depends only on
positions <= t; a step recomputes exactly what the full forward computes at t:
- `dense`: keys [0, t].
- `sliding`: the tile's fixed block list.
- `ssa`, `block_topk`: the tile of t (Q = `query_tile` positions starting at
  t0 = floor(t / Q) Q) routes with the routing queries [t0 - Q + 1, t0] (see
  `subq_jax.ssa`), kept in a ring of the last 2Q routing queries, against the summaries
  of the complete blocks before the tile (rebuilt from the routing-key cache, which
  past t may hold stale entries: no summary the selection reads covers them).
- `indexer`: the best `keys_per_query` tokens of [0, t] by the indexer score.
With `far_distance` > 0 the cache also keeps the far keys (`far_k`), which score the
sink and chosen slots against the step's `far_q` (and route, as in `subq_jax.ssa`).
Positions of a buffer past a row's current position hold stale values (prompt padding)
that no step reads before overwriting them. The step is a plain-JAX reference, O(T) per
token (the cache is read whole to rebuild summaries and, for `dense`, to attend); the fast
decode kernel is separate work.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.selector.reference import score_candidates
from subq_jax import ssa
from subq_jax.config import SSAConfig
from subq_jax.ssa import ssa_attention

HIGHEST = jax.lax.Precision.HIGHEST


def cache_multiple(model_cfg) -> int:
  """Cache lengths must be a multiple of this (whole KV blocks)."""
  sizes = [model_cfg.layer_attention(i).block_size for i in range(model_cfg.num_layers)]
  return math.lcm(*sizes)


# ----------------------------------------------------------------------------- layers


def _layer(block, x, positions_BxT, inv_freq, attend_fn, history=None):
  """One decoder block as `Block.__call__`, with attention replaced by `attend_fn`.

  Returns (x, attend_fn's extra, the attention input): the short convolution's cache is
  the last W - 1 attention inputs, `history` those before x.
  """
  b, t, _ = x.shape
  attn = block.attn
  xn = block.attn_norm(x)
  q, k, v, routing = attn.project(xn, positions_BxT, inv_freq, history)
  out, extra = attend_fn(attn.attn_cfg, q, k, v, routing)
  x = x + attn.wo(out.reshape(b, t, -1))
  return x + block.mlp(block.mlp_norm(x)), extra, xn


def _routing_inputs(a: SSAConfig, q, k, routing):
  """(routing queries, routing keys) the selector of kind `a.kind` reads, or None."""
  if a.kind in ("ssa", "block_topk"):
    if not a.route_with_rope:
      return routing["routing_q"], routing["routing_k"]
    if a.far_distance:
      return routing["far_q"], routing["far_k"]
    return q, k
  return None


def _routing_keys(layer: dict) -> jax.Array:
  """The cache's routing keys: position-free ones, else the far keys, else k."""
  return layer.get("rk", layer.get("kf", layer["k"]))


def prefill(model, tokens_BxT, lengths_B, *, return_argmax: bool = False):
  """Full forward over padded prompts.

  Returns logits [B, V] at each row's last prompt token, the cache (positions
  `lengths_B` are next), and the mean over layers of the fraction of causal token pairs
  each mechanism attended over the whole T (float32 scalar); with `return_argmax`, also
  the argmax of the logits at every position [B, T] (teacher-forced scoring).
  """
  cfg = model.cfg
  b, t = tokens_BxT.shape
  if t % cache_multiple(cfg):
    raise ValueError(f"cache length {t} must be a multiple of {cache_multiple(cfg)}")
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  inv_freq, scale = model.rope_tables()
  lengths_B = jnp.asarray(lengths_B, jnp.int32)

  def attend_fn(a, q, k, v, routing):
    out, info = ssa_attention(
      q, k, v, a, scale=scale, implementation=cfg.attention_impl, return_info=True, **routing
    )
    layer = {"k": k, "v": v}
    if a.far_distance:
      layer["kf"] = routing["far_k"]
    rqk = _routing_inputs(a, q, k, routing)
    if rqk is not None:
      rq, rk = rqk
      if not a.route_with_rope:
        layer["rk"] = rk
      layer["rq"] = _ring_from_prefill(rq, lengths_B, 2 * a.tile)
    if a.kind == "indexer":
      layer["ik"] = routing["routing_k"][:, :, 0]
    return out, (layer, jnp.mean(info.pairs_attended))

  x = model.embed(tokens_BxT)
  layers, pairs = [], []
  w = cfg.short_conv
  for block in model.blocks:
    x, (layer, p), xn = _layer(block, x, positions, inv_freq, attend_fn)
    if w > 1:  # the W - 1 attention inputs before position lengths_B (zeros before 0)
      back = lengths_B[:, None] - (w - 1) + jnp.arange(w - 1)[None, :]
      rows = jnp.arange(b)[:, None]
      layer["conv"] = jnp.where((back >= 0)[..., None], xn[rows, jnp.maximum(back, 0)], 0)
    layers.append(layer)
    pairs.append(p)
  fraction = jnp.mean(jnp.stack(pairs)) / (t * (t + 1) / 2)
  cache = {"pos": lengths_B, "layers": layers}
  if return_argmax:
    every = model.head(x)
    logits = every[jnp.arange(b), lengths_B - 1]
    return logits, cache, fraction, jnp.argmax(every, axis=-1).astype(jnp.int32)
  logits = model.head(x[jnp.arange(b), lengths_B - 1][:, None])[:, 0]
  return logits, cache, fraction


def _ring_from_prefill(rq_BxTxHxD, lengths_B, size: int):
  """Ring of the last `size` routing queries: slot s holds the latest position p < length
  with p = s (mod size) (position 0 where there is none yet: never read)."""
  last = lengths_B[:, None] - 1
  slots = jnp.arange(size)[None, :]
  pos = jnp.maximum(last - (last - slots) % size, 0)
  return rq_BxTxHxD[jnp.arange(rq_BxTxHxD.shape[0])[:, None], pos]


def step(model, cache, tokens_B):
  """One token per row at position `cache["pos"]`: (logits [B, V], updated cache)."""
  pos = cache["pos"]
  b = tokens_B.shape[0]
  rows = jnp.arange(b)
  inv_freq, scale = model.rope_tables()
  layers = iter(cache["layers"])
  new_layers = []

  def attend_fn(a, q, k, v, routing):
    layer = dict(next(layers))
    layer["k"] = layer["k"].at[rows, pos].set(k[:, 0].astype(layer["k"].dtype))
    layer["v"] = layer["v"].at[rows, pos].set(v[:, 0].astype(layer["v"].dtype))
    if "kf" in layer:
      layer["kf"] = layer["kf"].at[rows, pos].set(routing["far_k"][:, 0].astype(layer["kf"].dtype))
    rqk = _routing_inputs(a, q, k, routing)
    if rqk is not None:
      rq, rk = rqk
      if "rk" in layer:
        layer["rk"] = layer["rk"].at[rows, pos].set(rk[:, 0].astype(layer["rk"].dtype))
      ring = layer["rq"]
      layer["rq"] = ring.at[rows, pos % ring.shape[1]].set(rq[:, 0].astype(ring.dtype))
    if a.kind == "indexer":
      ik = routing["routing_k"][:, 0, 0]
      layer["ik"] = layer["ik"].at[rows, pos].set(ik.astype(layer["ik"].dtype))
    new_layers.append(layer)
    out = decode_attention(a, q[:, 0], layer, pos, scale, routing)
    return out[:, None], None

  x = model.embed(tokens_B[:, None])
  for i, block in enumerate(model.blocks):
    history = cache["layers"][i].get("conv")
    x, _, xn = _layer(block, x, pos[:, None], inv_freq, attend_fn, history)
    if history is not None:
      new_layers[i]["conv"] = jnp.concatenate([history[:, 1:], xn.astype(history.dtype)], axis=1)
  logits = model.head(x)[:, 0]
  return logits, {"pos": pos + 1, "layers": new_layers}


# ------------------------------------------------------------------------ attention


def decode_attention(a: SSAConfig, q_BxHxD, layer: dict, pos_B, scale: float, routing=None):
  """Attention of one query per row (at position pos_B, already in the cache) of kind
  `a.kind`: [B, q_heads, head_dim] in q's dtype."""
  k, v = layer["k"], layer["v"]
  b, t, hkv, d = k.shape
  hq = q_BxHxD.shape[1]
  q = q_BxHxD.astype(jnp.float32).reshape(b, hkv, hq // hkv, d)
  if a.kind == "dense":
    logits = jnp.einsum("bkgd,btkd->bkgt", q, k.astype(jnp.float32), precision=HIGHEST)
    visible = (jnp.arange(t)[None, :] <= pos_B[:, None])[:, None, None, :]
    out = _softmax_values(logits * scale, visible, v.astype(jnp.float32), "bkgt,btkd->bkgd")
  elif a.kind == "indexer":
    out = _indexer_attention(a, q, layer, pos_B, scale, routing)
  else:
    ids = _block_list(a, layer, pos_B, hkv)  # [B, hkv, slots]
    bs = a.block_size
    safe = jnp.maximum(ids, 0)
    bi, hi = jnp.arange(b)[:, None, None], jnp.arange(hkv)[None, :, None]
    blocks = lambda x: x.reshape(b, t // bs, bs, hkv, d)[bi, safe, :, hi].astype(jnp.float32)
    v_blocks = blocks(v)
    logits = jnp.einsum("bkgd,bksnd->bkgsn", q, blocks(k), precision=HIGHEST)
    if a.far_distance:  # sink and chosen slots scored far_q . far_k
      qf = routing["far_q"][:, 0].astype(jnp.float32).reshape(q.shape)
      far_logits = jnp.einsum("bkgd,bksnd->bkgsn", qf, blocks(layer["kf"]), precision=HIGHEST)
      is_far = jnp.arange(ids.shape[-1]) < a.sink_blocks + a.top_k
      logits = jnp.where(is_far[:, None], far_logits, logits)
    k_pos = safe[..., None] * bs + jnp.arange(bs)  # [B, hkv, slots, bs]
    visible = (ids >= 0)[..., None] & (k_pos <= pos_B[:, None, None, None])
    out = _softmax_values(logits * scale, visible[:, :, None], v_blocks, "bkgsn,bksnd->bkgd")
  return out.reshape(b, hq, d).astype(q_BxHxD.dtype)


def _softmax_values(logits, visible, v, spec):
  """softmax(logits over the visible keys) . v, with the reference's safe statistics."""
  logits = jnp.where(visible, logits, -jnp.inf)
  axes = tuple(range(3, logits.ndim))
  m = jnp.max(logits, axis=axes, keepdims=True)
  m = jnp.where(m > -jnp.inf, m, 0.0)
  p = jnp.exp(logits - m)
  denom = jnp.sum(p, axis=axes)
  out = jnp.einsum(spec, p, v, precision=HIGHEST)
  return out / jnp.where(denom > 0, denom, 1.0)[..., None]


def _indexer_attention(a: SSAConfig, q, layer, pos_B, scale, routing):
  """DeepSeek-style: the best min(keys_per_query, t + 1) tokens of [0, t] by
  sum_h w_h relu(q_I,h . k_I), shared by the heads."""
  k, v, ik = layer["k"], layer["v"], layer["ik"]
  b, t, hkv, d = k.shape
  iq = routing["routing_q"][:, 0].astype(jnp.float32)  # [B, H_I, d_I]
  w = routing["indexer_weights"][:, 0].astype(jnp.float32)  # [B, H_I]
  logits_i = jnp.einsum("bhd,bsd->bhs", iq, ik.astype(jnp.float32), precision=HIGHEST)
  score = jnp.einsum("bhs,bh->bs", jax.nn.relu(logits_i), w, precision=HIGHEST)
  causal = jnp.arange(t)[None, :] <= pos_B[:, None]
  best, idx = jax.lax.top_k(jnp.where(causal, score, -jnp.inf), min(a.keys_per_query, t))
  valid = best > -jnp.inf  # [B, K]
  bi = jnp.arange(b)[:, None]
  k_sel = k[bi, idx].astype(jnp.float32)  # [B, K, hkv, d]
  v_sel = v[bi, idx].astype(jnp.float32)
  logits = jnp.einsum("bkgd,bskd->bkgs", q, k_sel, precision=HIGHEST) * scale
  return _softmax_values(logits, valid[:, None, None, :], v_sel, "bkgs,bskd->bkgd")


# ------------------------------------------------------------------------ block lists


def _block_list(a: SSAConfig, layer, pos_B, hkv: int):
  """The block list of the tile holding pos_B: sinks, chosen, local, own; -1 empty."""
  b = pos_B.shape[0]
  j0 = pos_B // a.block_size  # the tile lies inside block j0
  prefix = jnp.maximum(j0 - a.local_blocks, 0)
  if a.kind == "sliding":
    chosen = prefix[:, None] - a.top_k + jnp.arange(a.top_k)
    chosen = jnp.where(chosen >= a.sink_blocks, chosen, -1)
    chosen = jnp.broadcast_to(chosen[:, None], (b, hkv, a.top_k))
  else:
    chosen = _route(a, layer, pos_B, prefix, hkv)
  sinks = jnp.arange(a.sink_blocks)
  sinks = jnp.where(sinks[None] < prefix[:, None], sinks[None], -1)
  local = j0[:, None] - a.local_blocks + jnp.arange(a.local_blocks)
  local = jnp.where(local >= 0, local, -1)
  fixed = [
    jnp.broadcast_to(sinks[:, None], (b, hkv, a.sink_blocks)),
    chosen,
    jnp.broadcast_to(local[:, None], (b, hkv, a.local_blocks)),
    jnp.broadcast_to(j0[:, None, None], (b, hkv, 1)),
  ]
  return jnp.concatenate(fixed, axis=-1).astype(jnp.int32)


def _route(a: SSAConfig, layer, pos_B, prefix_B, hkv: int):
  """Chosen blocks [B, hkv, top_k] of the tile holding pos_B (`ssa`, `block_topk`),
  with the selector of `subq_jax.ssa` run for that one tile of each row."""
  ring = layer["rq"]  # [B, 2Q, hq, dr]
  b, size, hq, dr = ring.shape
  q_tile, g = a.tile, hq // hkv
  t0 = pos_B // q_tile * q_tile
  window = jnp.maximum(t0[:, None] - q_tile + 1 + jnp.arange(q_tile), 0)  # [B, Q]
  rows = ring[jnp.arange(b)[:, None], window % size]  # [B, Q, hq, dr]
  rows = rows.reshape(b, q_tile, hkv, g, dr).transpose(0, 2, 1, 3, 4)
  rows = ssa._as_scoring_rows(rows.reshape(b, hkv, 1, q_tile * g, dr), a)
  tables = ssa._tree(_routing_keys(layer), a)

  def one_row(rows_r, tables_r, prefix_r):
    tables_r = [x[None] for x in tables_r]
    if a.kind == "block_topk":
      chosen = ssa._flat_topk(rows_r[None], tables_r[0], prefix_r[None], a)
    else:
      chosen = ssa._beam_descent(rows_r[None], tables_r, prefix_r[None], a, score_candidates)
    return ssa._sorted_ids(chosen, a.top_k)[0, :, 0]

  return jax.vmap(one_row)(rows, tables, prefix_B)


# ----------------------------------------------------------------------------- generate


def make_generate(graphdef, capacity: int):
  """Jitted greedy decoding: (params, tokens_BxT, lengths_B, num_new=capacity) ->
  (generated [B, capacity] int32, pairs fraction, argmax at every prompt position
  [B, T] int32).

  Prefill once, then `num_new - 1` cached steps in a loop whose trip count is traced,
  so tasks with different generation budgets up to `capacity`, and teacher-forced
  scoring (`num_new=1`, the argmax of the prefill), share one compile per shape;
  columns from `num_new` on are the pad value -1.
  """
  if capacity < 1:
    raise ValueError(f"capacity={capacity} must be >= 1")

  @jax.jit
  def generate(params, tokens_BxT, lengths_B, num_new):
    model = nnx.merge(graphdef, params)
    logits, cache, fraction, every = prefill(model, tokens_BxT, lengths_B, return_argmax=True)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out = jnp.full((first.shape[0], capacity), -1, jnp.int32).at[:, 0].set(first)

    def body(i, carry):
      cache, token, out = carry
      logits, cache = step(model, cache, token)
      nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      return cache, nxt, out.at[:, i].set(nxt)

    _, _, out = jax.lax.fori_loop(1, jnp.minimum(num_new, capacity), body, (cache, first, out))
    return out, fraction, every

  def call(params, tokens_BxT, lengths_B, num_new: int | None = None):
    num_new = capacity if num_new is None else num_new
    return generate(params, tokens_BxT, lengths_B, jnp.int32(num_new))

  return call

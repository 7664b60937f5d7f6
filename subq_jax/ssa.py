"""Subquadratic Sparse Attention: the public entry point and its blockwise (`xla`) path.

    out = ssa_attention(q, k, v, config)
    out, info = ssa_attention(q, k, v, config, return_info=True)

`config.kind` picks the mechanism (`ssa`, `block_topk`, `sliding`, `indexer`,
`dense`; see `subq_jax.config`). For `ssa` (DESIGN.md §1):

1. Routing tree. Level-1 nodes are KV blocks; a level-l node covers F level-(l-1)
   nodes. Each node keeps a summary of its routing keys: `mean`, or `bounds`
   ([max, min], scored as relu(q) . max + min(q, 0) . min).
2. Causal frontier. A query tile in block j0 may route to blocks [0, j0 - W). That
   prefix is covered by at most F - 1 complete nodes per level (the base-F digits of
   j0 - W); no summary covers a key at or after the tile's block.
3. Beam descent. From the top level down, the frontier's nodes and the children of
   the nodes kept one level up are scored; a level keeps its best `config.beam_at(l)`
   nodes and level 1 its best `top_k` blocks (never a sink block: those are attended
   anyway). A node's score is the max, over the tile's routing window and the G query
   heads of the KV head, of routing query . summary.
4. Exact sparse attention, one softmax over sink, chosen, local and own (causal) blocks.

Routing window. A tile routes with the Q routing queries that end at its first
position (positions [t0 - Q + 1, t0]), not with its own Q queries: a query must never
choose its keys from a later query's content, or outputs at t would depend on tokens
after t. A decoder then routes each tile once, when its first token arrives.

Selection runs under stop_gradient; attention is differentiable in q, k and v.
With `config.coarse_grad` > 0 the routing q and k also get the gradient of a coarse
branch over every routable block's summary (`_coarse`; outputs unchanged).
With `config.far_distance` > 0 the far blocks (sinks and chosen) are scored with the
caller's `far_q` and `far_k` (bounded RoPE distances) and the near blocks (local and
own) with q and k: two sparse calls whose (out, lse) merge into the one softmax.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.selector import reference as selector_reference
from pallas_kernels.selector.pallas_gpu import (
  score_candidates_from_queries_pallas,
  score_candidates_pallas,
)
from pallas_kernels.sparse_attention import index as attention_index
from pallas_kernels.sparse_attention import reference as attention_reference
from pallas_kernels.sparse_attention.pallas_gpu import sparse_attention_pallas
from subq_jax.config import BLOCK_KINDS, ROUTED_KINDS, SSAConfig

__all__ = ["AttentionInfo", "SSAConfig", "select_blocks", "ssa_attention"]

IMPLEMENTATIONS = ("reference", "xla", "pallas")
CHUNK_ELEMENTS = 1 << 25  # f32 elements materialised per chunk by the quadratic selectors
# The indexer's chunks: larger, fewer sequential steps (H100, 16 x 4096 tokens, forward and
# backward of one layer with the masked dense forward of session 8: 130 ms a step against
# 148 ms with 1 << 25).
INDEXER_CHUNK_ELEMENTS = 1 << 27


class AttentionInfo(NamedTuple):
  """What the mechanism did.

  selected_blocks: int32 [batch, kv_heads, num_tiles, top_k], ascending, -1 for an
    empty slot (block kinds); None for `dense` and `indexer`.
  pairs_attended: float32 [batch, kv_heads]: (query, key) pairs attended by each
    query head of the group, over the real (unpadded) sequence.
  indexer_loss: `indexer` only: float32 [batch], the mean over queries of
    KL(attention || indexer) on each query's selected tokens (DeepSeek-V3.2's indexer
    training signal). The attention distribution (summed over heads) is the constant
    target; the gradient reaches only the indexer inputs. None for the other kinds.
  """

  selected_blocks: jax.Array | None
  pairs_attended: jax.Array
  indexer_loss: jax.Array | None = None


def ssa_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  config: SSAConfig,
  *,
  routing_q: jax.Array | None = None,
  routing_k: jax.Array | None = None,
  indexer_weights: jax.Array | None = None,
  far_q: jax.Array | None = None,
  far_k: jax.Array | None = None,
  scale: float | None = None,
  implementation: str | None = None,
  return_info: bool = False,
):
  """Causal attention of `config.kind`.

  Args:
    q: [batch, seq, q_heads, head_dim], floating point.
    k, v: [batch, seq, kv_heads, head_dim]; q_heads % kv_heads == 0.
    config: mechanism and knobs (static under jit).
    routing_q, routing_k: what the selector scores, when it is not q and k.
      `ssa`, `block_topk` with `route_with_rope=False`: position-free (pre-RoPE) q and
      k, [batch, seq, q_heads, d_r] and [batch, seq, kv_heads, d_r].
      `indexer` (required): indexer queries [batch, seq, indexer_heads, indexer_dim]
      and the indexer key [batch, seq, 1, indexer_dim].
      `dense` and `sliding` do not route and ignore them.
    indexer_weights: `indexer` only: per-token head weights [batch, seq, indexer_heads].
    far_q, far_k: required with `config.far_distance` > 0 (block kinds), else None: q
      and k as the far blocks (sinks and chosen) are scored, shaped as q and k (the
      model rotates them to bounded distances, see `SSAConfig.far_distance`); routed
      kinds with `route_with_rope` also route with them.
    scale: softmax scale; default 1 / sqrt(head_dim).
    implementation: `reference` (float32 brute force, small seq only), `xla`
      (blockwise), `pallas` (kernels; interpret mode on CPU), or None for the best
      on the backend: `pallas` on GPU for the block kinds when the kernels take the
      shapes (power-of-two head_dim and GQA ratio; tiles of query_tile * G < 16 rows run
      repeated heads up to 16), else `xla`
      (`dense`: `pallas` and None mean cuDNN flash attention on GPU for bf16/f16).
    return_info: also return an `AttentionInfo`.

  Returns:
    out with q's shape and dtype, and an `AttentionInfo` if `return_info`.
  """
  _check_inputs(q, k, v, config, routing_q, routing_k, indexer_weights, implementation)
  _check_far(q, k, config, far_q, far_k)
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
  far = None if far_q is None else (far_q, far_k)
  if far is not None and config.route_with_rope and config.kind in ROUTED_KINDS:
    routing_q, routing_k = far  # route as attention scores the chosen blocks
  if implementation is None:
    implementation = _default_implementation(q, k, config)
  elif implementation == "pallas" and config.kind in BLOCK_KINDS:
    problem = _pallas_unsupported(q, k, config)
    if problem:
      raise ValueError(f"implementation='pallas' cannot run this shape: {problem}")
  if implementation == "reference":
    from subq_jax import ssa_reference

    out, info = ssa_reference.attention(
      q, k, v, config, routing_q, routing_k, indexer_weights, scale, far
    )
  elif config.kind == "dense":
    out, info = _dense(q, k, v, scale, implementation)
  elif config.kind == "indexer":
    out, info = _indexer(q, k, v, config, routing_q, routing_k, indexer_weights, scale)
  else:
    out, info = _block_sparse(q, k, v, config, routing_q, routing_k, scale, implementation, far)
  if config.coarse_grad:
    rq = q if routing_q is None else routing_q
    rk = k if routing_k is None else routing_k
    branch = _coarse_frontier if config.coarse_nodes == "frontier" else _coarse
    coarse = branch(rq, rk, v, config, scale).astype(out.dtype)
    out = _add_gradient(out, coarse, config.coarse_grad)
  return (out, info) if return_info else out


def select_blocks(
  routing_q: jax.Array,
  routing_k: jax.Array,
  config: SSAConfig,
  *,
  implementation: str = "xla",
) -> jax.Array:
  """The blocks each query tile chooses: int32 [batch, kv_heads, num_tiles, top_k].

  Ascending block ids, -1 for an empty slot. `routing_q` [batch, seq, q_heads, d_r]
  and `routing_k` [batch, seq, kv_heads, d_r]; kinds `ssa`, `block_topk`, `sliding`.
  """
  if config.kind not in BLOCK_KINDS:
    raise ValueError(f"select_blocks needs a block kind {BLOCK_KINDS}, got kind={config.kind!r}")
  _check_qkv(routing_q, routing_k, routing_k, "routing_q", "routing_k", "routing_k")
  if implementation == "reference":
    from subq_jax import ssa_reference

    return ssa_reference.select_blocks(routing_q, routing_k, config)
  hkv, g = routing_k.shape[2], routing_q.shape[2] // routing_k.shape[2]
  group = _kernel_group(g, config) if implementation == "pallas" else g
  if group > g:  # as _block_sparse: the kernels score repeated heads
    routing_q = _repeat_group(routing_q, hkv, group)
  rq, rk = (_pad_seq(x, config.block_size) for x in (routing_q, routing_k))
  return _select(rq, rk, config, routing_q.shape[1], implementation)


# ----------------------------------------------------------------------------- checks


def _check_qkv(q, k, v, qn="q", kn="k", vn="v"):
  for name, x in ((qn, q), (kn, k), (vn, v)):
    if not hasattr(x, "ndim") or x.ndim != 4:
      shape = getattr(x, "shape", type(x).__name__)
      raise ValueError(f"{name} must have rank 4 [batch, seq, heads, dim], got shape {shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
  if k.shape != v.shape:
    raise ValueError(f"{kn}.shape={k.shape} and {vn}.shape={v.shape} must be equal")
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"batch differs: {qn}.shape={q.shape}, {kn}.shape={k.shape}")
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"seq differs: {qn}.shape={q.shape}, {kn}.shape={k.shape}")
  if q.shape[1] < 1:
    raise ValueError(f"seq must be >= 1, got {qn}.shape={q.shape}")
  if q.shape[3] != k.shape[3]:
    raise ValueError(f"head_dim differs: {qn}.shape={q.shape}, {kn}.shape={k.shape}")
  if k.shape[2] < 1 or q.shape[2] % k.shape[2]:
    raise ValueError(
      f"q_heads={q.shape[2]} must be a multiple of kv_heads={k.shape[2]} "
      f"({qn}.shape={q.shape}, {kn}.shape={k.shape})"
    )


def _check_inputs(q, k, v, config, routing_q, routing_k, indexer_weights, implementation):
  if not isinstance(config, SSAConfig):
    raise ValueError(f"config must be an SSAConfig, got {type(config).__name__}")
  if implementation not in (None, *IMPLEMENTATIONS):
    raise ValueError(f"implementation={implementation!r} is not one of {IMPLEMENTATIONS} or None")
  _check_qkv(q, k, v)
  b, t, hq, _ = q.shape
  hkv = k.shape[2]
  routes = config.kind in ROUTED_KINDS
  if (routing_q is None) != (routing_k is None):
    raise ValueError("pass routing_q and routing_k together, or neither")
  if config.kind == "indexer":
    want = {
      "routing_q": (b, t, config.indexer_heads, config.indexer_dim),
      "routing_k": (b, t, 1, config.indexer_dim),
      "indexer_weights": (b, t, config.indexer_heads),
    }
    for name, x in zip(want, (routing_q, routing_k, indexer_weights), strict=True):
      if x is None or tuple(x.shape) != want[name]:
        got = None if x is None else tuple(x.shape)
        raise ValueError(f"kind='indexer' needs {name} of shape {want[name]}, got {got}")
  elif indexer_weights is not None:
    raise ValueError(f"indexer_weights is for kind='indexer', not kind={config.kind!r}")
  elif routes and routing_q is None and not config.route_with_rope:
    raise ValueError(
      "route_with_rope=False: pass the position-free routing_q and routing_k (pre-RoPE q, k)"
    )
  elif routes and routing_q is not None:
    if config.route_with_rope:
      raise ValueError(
        "routing_q/routing_k are for route_with_rope=False; got route_with_rope=True"
      )
    _check_qkv(routing_q, routing_k, routing_k, "routing_q", "routing_k", "routing_k")
    if routing_q.shape[:3] != (b, t, hq) or routing_k.shape[:3] != (b, t, hkv):
      raise ValueError(
        f"routing_q.shape={routing_q.shape} / routing_k.shape={routing_k.shape} must match "
        f"q.shape={q.shape} / k.shape={k.shape} except in the last dim"
      )


def _check_far(q, k, config, far_q, far_k):
  if (far_q is None) != (far_k is None):
    raise ValueError("pass far_q and far_k together, or neither")
  if not config.far_distance:
    if far_q is not None:
      raise ValueError("far_q/far_k are for far_distance > 0; got far_distance=0")
    return
  if far_q is None:
    raise ValueError(
      f"far_distance={config.far_distance} needs far_q and far_k (q and k rotated to the "
      "far blocks' bounded positions, see SSAConfig.far_distance)"
    )
  if far_q.shape != q.shape or far_k.shape != k.shape:
    raise ValueError(
      f"far_q.shape={far_q.shape} / far_k.shape={far_k.shape} must equal "
      f"q.shape={q.shape} / k.shape={k.shape}"
    )


# ------------------------------------------------------------------------ block kinds


def _ops(implementation: str, dtype=jnp.float32):
  """(score_candidates on routing rows, sparse_attention) of an implementation."""
  if implementation != "pallas":
    return selector_reference.score_candidates, attention_reference.sparse_attention
  _check_pallas_backend()
  interpret = jax.default_backend() == "cpu"  # the Pallas interpreter: how CI runs them
  # Selector matmuls in the inputs' precision: bf16 inputs score on the tensor cores.
  score = functools.partial(score_candidates_pallas, compute_dtype=dtype, interpret=interpret)
  return score, functools.partial(sparse_attention_pallas, interpret=interpret)


def _pow2(n: int) -> bool:
  return n > 0 and not n & (n - 1)


def _pallas_unsupported(q, k, config: SSAConfig) -> str:
  """Why the Pallas GPU kernels cannot take these shapes ('' if they can): Triton
  tiles need power-of-two sizes and matmuls of at least 16 rows."""
  d, g = q.shape[-1], q.shape[2] // k.shape[2]
  if not _pow2(d) or d < 16:
    return f"head_dim={d} must be a power of two >= 16"
  if not _pow2(g):
    return f"q_heads / kv_heads = {g} must be a power of two"
  if 16 % (config.tile * g) and config.tile * g < 16:
    return f"query_tile * (q_heads / kv_heads) = {config.tile} * {g} must divide 16 or be >= 16"
  return ""


def _kernel_group(g: int, config: SSAConfig) -> int:
  """Query heads a KV head as the kernels see them: G, or more when a tile has fewer than
  the 16 rows of the kernels' smallest matmul (query_tile * G < 16). The extra heads
  repeat the real ones (same routing scores) and their outputs are dropped, so they add
  nothing to the result or the gradients."""
  return max(g, 16 // config.tile)


def _repeat_group(x: jax.Array, kv_heads: int, group: int) -> jax.Array:
  """[b, t, kv_heads * g, d] -> [b, t, kv_heads * group, d], each KV head's g heads
  repeated group / g times."""
  b, t, h, d = x.shape
  x = x.reshape(b, t, kv_heads, h // kv_heads, d)
  return jnp.tile(x, (1, 1, 1, group * kv_heads // h, 1)).reshape(b, t, kv_heads * group, d)


def _default_implementation(q, k, config: SSAConfig) -> str:
  """Pallas kernels on GPU for the block kinds when they fit the shapes (cuDNN for
  `dense`); XLA otherwise."""
  on_gpu = jax.default_backend() == "gpu"
  if on_gpu and config.kind == "dense":
    return "pallas"
  if on_gpu and config.kind in BLOCK_KINDS and not _pallas_unsupported(q, k, config):
    return "pallas"
  return "xla"


def pallas_score_fn(config: SSAConfig, dtype):
  """The Pallas candidate scorer that builds each tile's routing window from the routing
  queries (interpreted on CPU), as `_beam_descent` calls it."""
  return functools.partial(
    score_candidates_from_queries_pallas,
    query_tile=config.tile,
    summary=config.summary,
    compute_dtype=dtype,
    interpret=jax.default_backend() == "cpu",
  )


def _check_pallas_backend():
  backend = jax.default_backend()
  if backend not in ("gpu", "cpu"):
    raise ValueError(f"implementation='pallas' has GPU kernels only; backend is {backend!r}")


def _pad_seq(x: jax.Array, multiple: int) -> jax.Array:
  pad = -x.shape[1] % multiple
  return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x


def _block_sparse(q, k, v, config, routing_q, routing_k, scale, implementation, far=None):
  hkv, g = k.shape[2], q.shape[2] // k.shape[2]
  group = _kernel_group(g, config) if implementation == "pallas" else g
  if group > g:  # tiles of fewer than 16 rows: the kernels run repeated heads
    rq = q if routing_q is None else routing_q
    out, info = _block_sparse(
      _repeat_group(q, hkv, group),
      k,
      v,
      config,
      _repeat_group(rq, hkv, group),
      routing_k,
      scale,
      implementation,
      None if far is None else (_repeat_group(far[0], hkv, group), far[1]),
    )
    b, t, _, d = out.shape
    return out.reshape(b, t, hkv, group, d)[:, :, :, :g].reshape(q.shape), info
  t = q.shape[1]
  bs = config.block_size
  qp, kp, vp = (_pad_seq(x, bs) for x in (q, k, v))
  rq = qp if routing_q is None else _pad_seq(routing_q, bs)
  rk = kp if routing_k is None else _pad_seq(routing_k, bs)
  selected = _select(rq, rk, config, t, implementation)
  attention_fn = _ops(implementation, rq.dtype)[1]
  runs = _slot_runs(selected, config)
  kw = dict(block_size=bs, query_tile=config.tile, scale=scale)

  def attend(q_, k_, runs_):
    if implementation == "pallas":  # the kernels' layout without the compaction sort
      return attention_fn(q_, k_, vp, attention_index.pack_runs(runs_), compacted=True, **kw)
    return attention_fn(q_, k_, vp, jnp.concatenate(runs_, axis=-1), **kw)

  if far is None:
    out, _ = attend(qp, kp, runs)
  else:  # far blocks (sinks, chosen) with far_q . far_k, near (local, own) with q . k
    far_q, far_k = (_pad_seq(x, bs) for x in far)
    out = _merge_by_lse(attend(far_q, far_k, runs[:2]), attend(qp, kp, runs[2:]))
  block_ids = jnp.concatenate(runs, axis=-1)
  return out[:, :t], AttentionInfo(selected, _block_pairs(block_ids, config, t))


def _merge_by_lse(far, near):
  """One softmax over two disjoint key sets from their (out, lse): the near set (the
  query's own block) is never empty, so the merged lse is finite."""
  (o_far, l_far), (o_near, l_near) = far, near
  lse = jnp.logaddexp(l_far, l_near)  # [b, hq, t]
  weight = lambda lse_part: jnp.exp(lse_part - lse).transpose(0, 2, 1)[..., None]
  out = weight(l_far) * o_far.astype(jnp.float32) + weight(l_near) * o_near.astype(jnp.float32)
  return out.astype(o_near.dtype)


def _tile_prefix(num_tiles: int, config: SSAConfig) -> tuple[jax.Array, jax.Array]:
  """Each tile's block j0 and routable prefix length P = max(j0 - W, 0), in blocks."""
  j0 = jnp.arange(num_tiles) * config.tile // config.block_size
  return j0, jnp.maximum(j0 - config.local_blocks, 0)


def _select(rq, rk, config: SSAConfig, seq_len: int, implementation: str) -> jax.Array:
  """Chosen blocks [b, kv_heads, num_tiles, top_k] from padded routing q and k.

  Tiles made only of padding (first position >= seq_len) choose nothing.
  """
  rq, rk = jax.lax.stop_gradient(rq), jax.lax.stop_gradient(rk)
  b, tp, hkv, _ = rk.shape
  num_tiles = tp // config.tile
  _, prefix = _tile_prefix(num_tiles, config)
  if config.kind == "sliding":  # the top_k blocks right before the local window
    ids = prefix[:, None] - config.top_k + jnp.arange(config.top_k)
    ids = jnp.where(ids >= config.sink_blocks, ids, -1).astype(jnp.int32)
    chosen = jnp.broadcast_to(ids, (b, hkv, num_tiles, config.top_k))
  elif config.kind == "block_topk":
    chosen = _flat_topk(_routing_rows(rq, hkv, config), _tree(rk, config)[0], prefix, config)
  elif implementation == "pallas":  # the kernel builds each tile's routing window from rq
    _check_pallas_backend()
    score_fn = pallas_score_fn(config, rq.dtype)
    # The top levels of up to 128 nodes in one pass over the routing queries.
    chosen = _beam_descent(rq, _tree(rk, config), prefix, config, score_fn, whole_top_nodes=128)
  else:
    score_fn = _ops(implementation)[0]
    chosen = _beam_descent(
      _routing_rows(rq, hkv, config), _tree(rk, config), prefix, config, score_fn
    )
  real = (jnp.arange(num_tiles) * config.tile < seq_len)[:, None]
  return _sorted_ids(jnp.where(real, chosen, -1), config.top_k)


def _routing_rows(rq, hkv: int, config: SSAConfig) -> jax.Array:
  """Routing rows of every tile: [b, kv_heads, num_tiles, Q * G, D].

  Tile i routes with routing queries at positions [i*Q - Q + 1, i*Q]; positions below
  0 repeat position 0, which leaves the max unchanged.
  """
  b, tp, hq, dr = rq.shape
  q_tile, g = config.tile, hq // hkv
  num_tiles = tp // q_tile
  pos = jnp.maximum(jnp.arange(num_tiles)[:, None] * q_tile - q_tile + 1 + jnp.arange(q_tile), 0)
  rows = rq[:, pos.reshape(-1)].reshape(b, num_tiles, q_tile, hkv, g, dr)
  rows = rows.transpose(0, 3, 1, 2, 4, 5).reshape(b, hkv, num_tiles, q_tile * g, dr)
  return _as_scoring_rows(rows, config)


def _as_scoring_rows(rq, config: SSAConfig) -> jax.Array:
  """Routing queries as rows that score a summary table with one dot product: float32,
  and for `bounds` [relu(q), min(q, 0)] (against the table's [max, min])."""
  rq = rq.astype(jnp.float32)
  if config.summary == "bounds":
    rq = jnp.concatenate([jnp.maximum(rq, 0), jnp.minimum(rq, 0)], axis=-1)
  return rq


def _tree(rk, config: SSAConfig) -> list[jax.Array]:
  """Summary tables of levels 1..L, each [b, kv_heads, nodes_l, D].

  `mean`: D = d_r; `bounds`: D = 2 d_r, [max, min]. The last node of a level may be
  partial (padded); the frontier only ever uses complete nodes.
  """
  b, _, hkv, dr = rk.shape
  f = config.fanout
  level = _leaf_summaries(rk, config)
  num_blocks = level.shape[2]
  tables = [level]
  for _ in range(1, config.num_levels(num_blocks)):
    n = level.shape[2]
    padded = jnp.pad(level, ((0, 0), (0, 0), (0, -n % f), (0, 0)))
    grouped = padded.reshape(b, hkv, -1, f, level.shape[-1])
    if config.summary == "mean":
      level = grouped.mean(axis=3)
    else:
      level = jnp.concatenate([grouped[..., :dr].max(axis=3), grouped[..., dr:].min(axis=3)], -1)
    tables.append(level)
  return tables


def _leaf_summaries(rk, config: SSAConfig) -> jax.Array:
  """Level-1 summaries [b, kv_heads, N, D] of padded routing keys [b, N * B, kv_heads, d_r]."""
  b, tp, hkv, dr = rk.shape
  keys = rk.astype(jnp.float32).reshape(b, tp // config.block_size, config.block_size, hkv, dr)
  keys = keys.transpose(0, 3, 1, 2, 4)  # [b, hkv, N, B, dr]
  if config.summary == "mean":
    return keys.mean(axis=3)
  return jnp.concatenate([keys.max(axis=3), keys.min(axis=3)], axis=-1)


def _beam_descent(
  routing,
  tables,
  prefix,
  config: SSAConfig,
  score_fn,
  whole_top_nodes: int = 0,
  return_candidates: bool = False,
):
  """Beam descent from the top level; returns level-1 ids [b, kv, tiles, <=top_k], and
  with `return_candidates` also every level's scored candidates, [(level, ids [b, kv,
  tiles, c]), ...] from the top (-1 for an empty slot).

  `score_fn(routing, table, candidates)` scores candidates: `routing` is whatever it
  reads (the routing rows of `_routing_rows`, or the routing queries themselves for
  the Pallas kernel that builds each tile's window in-kernel).
  `whole_top_nodes` > 0: the top levels (not level 1) whose tables hold that many nodes
  together are scored whole in one call, and each level picks its candidates' scores
  from it: one pass over the routing rows instead of one per level (the same scores).
  """
  b, hkv = tables[0].shape[:2]
  num_tiles = prefix.shape[0]
  f = config.fanout
  slot = jnp.arange(f - 1)
  whole, top = {}, []  # level -> scores of all its nodes [b, kv, tiles, nodes]
  for level in range(len(tables), 1, -1):
    if sum(tables[lv - 1].shape[2] for lv in top) + tables[level - 1].shape[2] > whole_top_nodes:
      break
    top.append(level)
  if len(top) > 1:
    sizes = [tables[lv - 1].shape[2] for lv in top]
    every = jnp.arange(sum(sizes), dtype=jnp.int32)
    every = jnp.broadcast_to(every, (b, hkv, num_tiles, sum(sizes)))
    all_scores = score_fn(routing, jnp.concatenate([tables[lv - 1] for lv in top], 2), every)
    start = 0
    for lv, size in zip(top, sizes, strict=True):
      whole[lv] = all_scores[..., start : start + size]
      start += size
  kept = None  # node ids kept one level up, -1 for none
  scored = []
  for level in range(len(tables), 0, -1):
    span = f ** (level - 1)
    # Frontier at this level: nodes [start, stop) with start = (P // F^l) * F.
    start = prefix // (span * f) * f
    stop = prefix // span
    frontier = jnp.where(slot < (stop - start)[:, None], start[:, None] + slot, -1)
    candidates = jnp.broadcast_to(frontier, (b, hkv, num_tiles, f - 1)).astype(jnp.int32)
    if kept is not None:
      children = kept[..., None] * f + jnp.arange(f)
      children = jnp.where(kept[..., None] >= 0, children, -1)
      candidates = jnp.concatenate([candidates, children.reshape(b, hkv, num_tiles, -1)], -1)
    if level == 1:
      candidates = jnp.where(candidates >= config.sink_blocks, candidates, -1)
    scored.append((level, candidates))
    if level in whole:
      picked = jnp.take_along_axis(whole[level], jnp.maximum(candidates, 0), axis=-1)
      scores = jnp.where(candidates >= 0, picked, -jnp.inf)
    else:
      scores = score_fn(routing, tables[level - 1], candidates)
    keep = config.top_k if level == 1 else config.beam_at(level)
    best, idx = jax.lax.top_k(scores, min(keep, candidates.shape[-1]))
    kept = jnp.where(best > -jnp.inf, jnp.take_along_axis(candidates, idx, axis=-1), -1)
  return (kept, scored) if return_candidates else kept


def _flat_topk(rows, table, prefix, config: SSAConfig) -> jax.Array:
  """block_topk: score every block [sink, P) of every tile, keep the best top_k.

  Quadratic in T by design (the NSA/MoBA-style baseline); chunked over tiles so that
  memory stays bounded.
  """
  b, hkv, num_tiles, r, _ = rows.shape
  n = table.shape[2]
  keep = min(config.top_k, n)
  blocks = jnp.arange(n)

  def chunk(args):
    rows_t, prefix_t = args  # [b, hkv, R, D], scalar
    scores = jnp.einsum("bhrd,bhnd->bhrn", rows_t, table, precision="highest").max(axis=2)
    ok = (blocks >= config.sink_blocks) & (blocks < prefix_t)
    best, idx = jax.lax.top_k(jnp.where(ok, scores, -jnp.inf), keep)
    return jnp.where(best > -jnp.inf, idx, -1).astype(jnp.int32)

  per_chunk = max(1, min(num_tiles, CHUNK_ELEMENTS // max(1, b * hkv * r * n)))
  ids = jax.lax.map(chunk, (jnp.moveaxis(rows, 2, 0), prefix), batch_size=per_chunk)
  return jnp.moveaxis(ids, 0, 2)


def _sorted_ids(ids: jax.Array, top_k: int) -> jax.Array:
  """Ascending block ids with -1 slots last, padded to `top_k` columns."""
  ids = jnp.pad(ids, ((0, 0),) * 3 + ((0, top_k - ids.shape[-1]),), constant_values=-1)
  big = jnp.iinfo(jnp.int32).max
  ids = jnp.sort(jnp.where(ids >= 0, ids, big), axis=-1)
  return jnp.where(ids == big, -1, ids).astype(jnp.int32)


def _slot_list(selected, config: SSAConfig) -> jax.Array:
  """Every tile's block list [b, kv, tiles, slots]: sinks, chosen, local, own; -1 empty."""
  return jnp.concatenate(_slot_runs(selected, config), axis=-1)


def _slot_runs(selected, config: SSAConfig) -> list[jax.Array]:
  """The runs of `_slot_list` (sinks, chosen, local, own), each [b, kv, tiles, n] int32.

  Valid blocks ascend across them (sinks < chosen < the routable prefix end <= local <
  own) and each run's valid entries are contiguous (`_sorted_ids` puts -1s last), so
  `index.pack_runs` lays them out for the Pallas kernels without a sort.
  """
  b, hkv, num_tiles, _ = selected.shape
  j0, prefix = _tile_prefix(num_tiles, config)
  sinks = jnp.arange(config.sink_blocks)
  sinks = jnp.where(sinks < prefix[:, None], sinks, -1)
  local = j0[:, None] - config.local_blocks + jnp.arange(config.local_blocks)
  local = jnp.where(local >= 0, local, -1)
  fixed = lambda x: jnp.broadcast_to(x, (b, hkv) + x.shape).astype(jnp.int32)
  return [fixed(sinks), selected.astype(jnp.int32), fixed(local), fixed(j0[:, None])]


def _block_pairs(block_ids, config: SSAConfig, seq_len: int) -> jax.Array:
  """Pairs attended per (batch, kv head): full listed blocks + the causal own block."""
  bs, q_tile = config.block_size, config.tile
  full_blocks = jnp.sum(block_ids[..., :-1] >= 0, axis=-1).astype(jnp.float32)  # [b, kv, tiles]
  pos = jnp.arange(block_ids.shape[2] * q_tile)
  own = jnp.where(pos < seq_len, pos % bs + 1, 0).reshape(-1, q_tile).astype(jnp.float32)
  real = jnp.sum(own > 0, axis=-1).astype(jnp.float32)  # real queries per tile
  return jnp.sum(full_blocks * bs * real + own.sum(-1), axis=-1)


# ------------------------------------------------------------------ coarse gradient


def _coarse(rq, rk, v, config: SSAConfig, scale: float) -> jax.Array:
  """The coarse branch [b, t, q_heads, d] (DESIGN.md section 1.7), float32.

  The query at position t attends, with one softmax, to the level-1 summaries of the
  blocks it may route to, [sink_blocks, t // B - W): logits are `scale` times the
  routing score of the summary (`mean`: q . mean(k); `bounds`: relu(q) . max + min(q, 0)
  . min), values the blocks' mean values. A query with no routable block gets 0. The
  values are constants (stop_gradient): the branch trains routing, not the values.
  Quadratic in T / B, chunked over positions and recomputed in the backward pass.
  """
  b, t, hq, dr = rq.shape
  hkv, d, bs = rk.shape[2], v.shape[-1], config.block_size
  g = hq // hkv
  table = _leaf_summaries(_pad_seq(rk, bs), config)  # [b, hkv, N, D]
  n = table.shape[2]
  values = _block_mean_values(v, bs)  # [b, hkv, N, d]
  rows = _as_scoring_rows(rq.reshape(b, t, hkv, g, dr), config)
  blocks = jnp.arange(n)

  @jax.checkpoint
  def one(args):
    row, pos = args  # [b, hkv, g, D], scalar
    logits = scale * jnp.einsum("bkgD,bknD->bkgn", row, table, precision="highest")
    ok = (blocks >= config.sink_blocks) & (blocks < pos // bs - config.local_blocks)
    p = _masked_softmax(logits, ok)
    return jnp.einsum("bkgn,bknd->bkgd", p, values, precision="highest")

  per_chunk = max(1, min(t, CHUNK_ELEMENTS // max(1, b * hq * n)))
  out = jax.lax.map(one, (jnp.moveaxis(rows, 1, 0), jnp.arange(t)), batch_size=per_chunk)
  return jnp.moveaxis(out, 0, 1).reshape(b, t, hq, d)


def _coarse_frontier(rq, rk, v, config: SSAConfig, scale: float) -> jax.Array:
  """The coarse branch over the descent's frontier [b, t, q_heads, d], float32
  (`coarse_nodes='frontier'`).

  The queries of a tile attend, with one softmax, to every node the beam descent scores
  for that tile, at every level: each level's frontier and the children of the nodes
  kept above (`_beam_descent(..., return_candidates=True)` on constant inputs). Logits
  are `scale` times the routing score of the node's summary; values the mean values of
  the node's blocks (constants). A tile with no candidate gets 0. At most levels x
  (fanout - 1 + beam x fanout) nodes a tile: O(T log T), as the descent.
  """
  b, t, hq, dr = rq.shape
  hkv, d, bs, q_tile = rk.shape[2], v.shape[-1], config.block_size, config.tile
  g = hq // hkv
  rq, rk = _pad_seq(rq, bs), _pad_seq(rk, bs)
  tp = rq.shape[1]
  num_tiles = tp // q_tile
  tables = _tree(rk, config)  # the summaries, differentiable: [b, hkv, n_l, D] per level
  frozen = [jax.lax.stop_gradient(x) for x in tables]
  _, prefix = _tile_prefix(num_tiles, config)
  routing = _routing_rows(jax.lax.stop_gradient(rq), hkv, config)
  _, scored = _beam_descent(routing, frozen, prefix, config, _ops("xla")[0], return_candidates=True)
  level_values = _block_mean_values(v, bs)
  values, offsets, offset = [], {}, 0
  for level, table in enumerate(tables, start=1):  # mean values under each node
    if level > 1:
      pad = -level_values.shape[2] % config.fanout  # padding only fills partial nodes
      grouped = jnp.pad(level_values, ((0, 0), (0, 0), (0, pad), (0, 0)))
      level_values = grouped.reshape(b, hkv, -1, config.fanout, d).mean(axis=3)
    values.append(level_values[:, :, : table.shape[2]])
    offsets[level], offset = offset, offset + table.shape[2]
  table, values = jnp.concatenate(tables, axis=2), jnp.concatenate(values, axis=2)
  nodes = jnp.concatenate([jnp.where(c >= 0, c + offsets[lv], -1) for lv, c in scored], -1)
  rows = _as_scoring_rows(rq.reshape(b, num_tiles, q_tile, hkv, g, dr), config)
  rows = rows.transpose(0, 3, 1, 2, 4, 5).reshape(b, hkv, num_tiles, q_tile * g, -1)

  @jax.checkpoint
  def one(args):
    row, ids = args  # [b, hkv, Q * G, D], [b, hkv, C]
    at = jnp.maximum(ids, 0)[..., None]
    summaries = jnp.take_along_axis(table, at, axis=2)  # [b, hkv, C, D]
    logits = scale * jnp.einsum("bkrD,bkcD->bkrc", row, summaries, precision="highest")
    p = _masked_softmax(logits, (ids >= 0)[:, :, None, :])
    return jnp.einsum("bkrc,bkcd->bkrd", p, jnp.take_along_axis(values, at, axis=2))

  per_tile = b * hkv * nodes.shape[-1] * (table.shape[-1] + q_tile * g + d)
  per_chunk = max(1, min(num_tiles, CHUNK_ELEMENTS // max(1, per_tile)))
  out = jax.lax.map(
    one, (jnp.moveaxis(rows, 2, 0), jnp.moveaxis(nodes, 2, 0)), batch_size=per_chunk
  )  # [tiles, b, hkv, Q * G, d]
  out = out.reshape(num_tiles, b, hkv, q_tile, g, d).transpose(1, 0, 3, 2, 4, 5)
  return out.reshape(b, tp, hq, d)[:, :t]


def _block_mean_values(v, block_size: int) -> jax.Array:
  """Each block's mean value [b, kv_heads, N, d], float32 and constant (the coarse
  branches train routing, not the values)."""
  b, _, hkv, d = v.shape
  vp = jax.lax.stop_gradient(_pad_seq(v, block_size)).astype(jnp.float32)
  return vp.reshape(b, -1, block_size, hkv, d).mean(axis=2).transpose(0, 2, 1, 3)


def _masked_softmax(logits, ok) -> jax.Array:
  """Softmax over the last axis where `ok`; 0 elsewhere, and 0 for a row with none."""
  logits = jnp.where(ok, logits, -jnp.inf)
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  e = jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0))
  return e / jnp.maximum(e.sum(axis=-1, keepdims=True), 1e-30)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _add_gradient(out, extra, weight):
  """`out`, unchanged; the backward pass gives `extra` the cotangent of `out` times
  `weight`, as if `out + weight * extra` had been returned. Without differentiation
  `extra` is unused (and not computed under jit)."""
  del extra, weight
  return out


def _add_gradient_fwd(out, extra, weight):
  del extra, weight
  return out, None


def _add_gradient_bwd(weight, _, cotangent):
  return cotangent, (weight * cotangent).astype(cotangent.dtype)


_add_gradient.defvjp(_add_gradient_fwd, _add_gradient_bwd)


# ---------------------------------------------------------------- dense and indexer


def _dense(q, k, v, scale, implementation):
  b, t, _, _ = q.shape
  backend = "xla"
  if (
    implementation == "pallas"
    and jax.default_backend() == "gpu"
    and q.dtype in (jnp.bfloat16, jnp.float16)
  ):
    backend = "cudnn"
  out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=backend)
  pairs = jnp.full((b, k.shape[2]), t * (t + 1) / 2, jnp.float32)
  return out, AttentionInfo(None, pairs)


def _indexer(q, k, v, config: SSAConfig, index_q, index_k, weights, scale):
  """DeepSeek-DSA-style: I[t, s] = sum_h w[t, h] relu(qI[t, h] . kI[s]); top tokens.

  Every query attends to its `keys_per_query` best earlier tokens (all of them when
  fewer exist), shared by all heads. The selector is quadratic by design; it runs a
  chunk of queries at a time so memory stays O(chunk x T). The attention itself gathers
  each query's selected keys (`_attend_selected`). The scores and the selection are
  float32; the attention matmuls take q, k, v in their own dtype with float32
  accumulation, as the kernels of the block kinds do. The selection is discrete, so the
  attention output has no gradient to the indexer; `indexer_loss` (KL of the head-summed
  attention to softmax(I) over the selected tokens) is its training signal.
  """
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  budget = min(config.keys_per_query, t)
  f32 = jnp.float32
  index_q, index_k, weights = (x.astype(f32) for x in (index_q, index_k, weights))
  rows = max(config.indexer_heads, hq)  # [chunk, rows, T] f32 logits per sequence
  per_chunk = max(1, min(t, INDEXER_CHUNK_ELEMENTS // max(1, b * t * rows)))
  pad = -t % per_chunk
  qpos = jnp.arange(t + pad).reshape(-1, per_chunk)

  def padq(x):
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, -1, per_chunk, *x.shape[2:]), 1, 0)

  def chunk(args):
    pos, q_c, iq_c, w_c = args  # [c], [b, c, hq, d], [b, c, H_I, d_I], [b, c, H_I]
    logits_i = jnp.einsum("bchd,bsd->bchs", iq_c, index_k[:, :, 0], precision="highest")
    score = jnp.einsum("bchs,bch->bcs", jax.nn.relu(logits_i), w_c, precision="highest")
    causal = jnp.arange(t)[None, None, :] <= pos[None, :, None]
    _, idx = jax.lax.top_k(jnp.where(causal, jax.lax.stop_gradient(score), -jnp.inf), budget)
    # Slots past a query's causal prefix point at non-causal tokens: not valid.
    valid = idx <= pos[None, :, None]
    out, target = _attend_selected(q_c, k, v, idx, valid, scale)
    target = jax.lax.stop_gradient(target)
    kl = _kl(target, jnp.take_along_axis(score, idx, axis=-1), valid)
    return out, jnp.where(pos < t, kl, 0.0)

  out, kl = jax.lax.map(jax.checkpoint(chunk), (qpos, padq(q), padq(index_q), padq(weights)))
  out = jnp.moveaxis(out, 0, 1).reshape(b, t + pad, hq, d)[:, :t].astype(q.dtype)
  keys = jnp.minimum(jnp.arange(t) + 1, budget).astype(jnp.float32)
  loss = jnp.moveaxis(kl, 0, 1).reshape(b, -1).sum(-1) / t
  return out, AttentionInfo(None, jnp.broadcast_to(keys.sum(), (b, hkv)), loss)


# The gathered attention's helpers: per query, its S selected rows of k or v; einsums in
# the inputs' dtype with float32 accumulation.
_take = jax.vmap(lambda x, i: x[i])  # [T, hkv, d], [c, S] -> [c, S, hkv, d]
_mm = functools.partial(jnp.einsum, precision="highest", preferred_element_type=jnp.float32)


def _gathered(q_c, k, v, idx, valid, scale):
  """A chunk's queries [b, c, hq, d] attend to their selected tokens idx [b, c, S] of k, v
  [b, T, hkv, d] (the `valid` ones): O(S) keys gathered per query. Returns the output
  (float32) and the attention probabilities [b, c, hkv, hq // hkv, S]."""
  b, c, hq, d = q_c.shape
  hkv = k.shape[2]
  logits = _mm("bckgd,bcskd->bckgs", q_c.reshape(b, c, hkv, hq // hkv, d), _take(k, idx))
  probs = jax.nn.softmax(jnp.where(valid[:, :, None, None], logits * scale, -jnp.inf), axis=-1)
  out = _mm("bckgs,bcskd->bckgd", probs.astype(v.dtype), _take(v, idx))
  return out.reshape(b, c, hq, d), probs


def _attend_gathered(q_c, k, v, idx, valid, scale):
  """`_gathered`'s output and its attention summed over heads / hq, [b, c, S]."""
  out, probs = _gathered(q_c, k, v, idx, valid, scale)
  return out, probs.sum(axis=(2, 3)) / q_c.shape[2]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend_selected(q_c, k, v, idx, valid, scale):
  """`_attend_gathered`, with a backward that has no scatter-add. The gather's own
  backward adds each query's S key and value gradients into k and v, and that scatter-add
  ran the indexer 10x slower than the other kinds on the H100. The second output (the
  head-summed attention) has no gradient: its cotangent is dropped, and the caller stops
  it."""
  return _attend_gathered(q_c, k, v, idx, valid, scale)


def _attend_selected_fwd(q_c, k, v, idx, valid, scale):
  out, probs = _gathered(q_c, k, v, idx, valid, scale)
  return (out, probs.sum(axis=(2, 3)) / q_c.shape[2]), (q_c, k, v, idx, probs)


def _attend_selected_bwd(scale, residuals, cotangents):
  """The attention backward on the S selected keys (the forward's probabilities, zero at
  invalid slots), except for the key and value gradients: the S per-query terms are
  written (a scatter with unique indices: each query's selected tokens are distinct) into
  a [c, T] layout, zero elsewhere, and reduced over the chunk's queries by a matmul: two
  T-wide matmuls and no T-wide softmax, where differentiating the masked dense attention
  (session 8's path) takes five and one."""
  q_c, k, v, idx, probs = residuals
  b, c, hq, d = q_c.shape
  t = k.shape[1]
  f32 = jnp.float32
  k_sel, v_sel = _take(k, idx), _take(v, idx)
  q_g = q_c.reshape(b, c, k.shape[2], hq // k.shape[2], d)
  d_out = cotangents[0].astype(f32).reshape(q_g.shape)
  d_probs = _mm("bckgd,bcskd->bckgs", d_out, v_sel.astype(f32))
  d_logits = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True))
  dq = scale * _mm("bckgs,bcskd->bckgd", d_logits, k_sel.astype(f32))
  rows_b, rows_c = jnp.arange(b)[:, None, None], jnp.arange(c)[None, :, None]

  def spread(x):  # [b, c, hkv, g, S] -> [b, c, T, hkv, g], zero off the selection
    x = jnp.moveaxis(x, -1, 2)
    return jnp.zeros((b, c, t, *x.shape[3:]), x.dtype).at[rows_b, rows_c, idx].set(x)

  # T-wide operands in the inputs' dtype (f32 accumulation), as a flash backward's P, dS.
  dv = _mm("bctkg,bckgd->btkd", spread(probs.astype(v.dtype)), d_out.astype(v.dtype))
  dk = scale * _mm("bctkg,bckgd->btkd", spread(d_logits.astype(q_c.dtype)), q_g)
  return dq.reshape(q_c.shape).astype(q_c.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_attend_selected.defvjp(_attend_selected_fwd, _attend_selected_bwd)


def _kl(target, logits, valid):
  """KL(target || softmax(logits)) over the last axis's `valid` entries; target sums to 1."""
  log_q = jax.nn.log_softmax(jnp.where(valid, logits, -jnp.inf), axis=-1)
  terms = target * (jnp.log(jnp.maximum(target, 1e-30)) - log_q)
  return jnp.sum(jnp.where(valid & (target > 0), terms, 0.0), axis=-1)

"""ssa_attention: the blockwise `xla` path against the brute-force reference, and the
invariants of DESIGN.md §1, on fresh random inputs."""

from __future__ import annotations

import dataclasses
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subq_jax import ssa_reference
from subq_jax.ssa import SSAConfig, select_blocks, ssa_attention

# Outputs: both paths compute in float32 from the same inputs; bf16 differs by the final
# rounding of the output (one bf16 ulp, 2**-8 relative).
TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}
SMALL = dict(block_size=16, query_tile=8, top_k=3, fanout=4, beam=2, sink_blocks=1, local_blocks=1)


def _qkv(seed, b, t, hq, hkv, d, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(kq, (b, t, hq, d), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (b, t, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (b, t, hkv, d), jnp.float32).astype(dtype)
  return q, k, v


def _indexer_inputs(seed, b, t, config):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  return dict(
    routing_q=jax.random.normal(k1, (b, t, config.indexer_heads, config.indexer_dim)),
    routing_k=jax.random.normal(k2, (b, t, 1, config.indexer_dim)),
    indexer_weights=jax.random.normal(k3, (b, t, config.indexer_heads)),
  )


def _run(q, k, v, config, implementation, **kw):
  fn = jax.jit(ssa_attention, static_argnames=("config", "implementation", "return_info", "scale"))
  return fn(q, k, v, config, implementation=implementation, return_info=True, **kw)


# Every GQA ratio, head_dim and dtype appears with each of the others' values at least once.
@pytest.mark.parametrize(
  "group, head_dim, dtype, summary",
  [
    (1, 64, jnp.float32, "mean"),
    (1, 128, jnp.bfloat16, "bounds"),
    (4, 64, jnp.float32, "bounds"),
    (4, 128, jnp.bfloat16, "mean"),
    (8, 64, jnp.bfloat16, "mean"),
    (8, 128, jnp.float32, "bounds"),
  ],
)
def test_ssa_xla_matches_reference(group, head_dim, dtype, summary):
  config = SSAConfig(summary=summary, **SMALL)
  t = 173  # not a multiple of the block
  q, k, v = _qkv(group * head_dim, 1, t, 2 * group, 2, head_dim, dtype)
  out, info = _run(q, k, v, config, "xla")
  ref, ref_info = _run(q, k, v, config, "reference")
  chex.assert_shape(out, q.shape)
  assert out.dtype == dtype
  chex.assert_shape(info.selected_blocks, (1, 2, 176 // 8, config.top_k))
  np.testing.assert_array_equal(info.selected_blocks, ref_info.selected_blocks)
  chex.assert_trees_all_close(out.astype(jnp.float32), ref.astype(jnp.float32), **TOL[dtype])
  np.testing.assert_array_equal(info.pairs_attended, ref_info.pairs_attended)
  # The configuration really is sparse: not every causal pair is attended.
  assert float(info.pairs_attended.max()) < t * (t + 1) / 2


@pytest.mark.parametrize(
  "kind, dtype",
  [
    ("block_topk", jnp.float32),
    ("block_topk", jnp.bfloat16),
    ("sliding", jnp.float32),
    ("indexer", jnp.float32),
    ("indexer", jnp.bfloat16),
    ("dense", jnp.float32),
  ],
)
def test_baselines_xla_match_reference(kind, dtype):
  config = SSAConfig(kind=kind, indexer_heads=2, indexer_dim=8, **SMALL)
  t = 150
  q, k, v = _qkv(7, 2, t, 4, 2, 32, dtype)
  kw = _indexer_inputs(8, 2, t, config) if kind == "indexer" else {}
  out, info = _run(q, k, v, config, "xla", **kw)
  ref, ref_info = _run(q, k, v, config, "reference", **kw)
  chex.assert_trees_all_close(out.astype(jnp.float32), ref.astype(jnp.float32), **TOL[dtype])
  np.testing.assert_array_equal(info.pairs_attended, ref_info.pairs_attended)
  if kind in ("block_topk", "sliding"):
    np.testing.assert_array_equal(info.selected_blocks, ref_info.selected_blocks)
  if kind != "dense":
    assert float(info.pairs_attended.max()) < t * (t + 1) / 2
  if kind == "indexer":
    chex.assert_trees_all_close(info.indexer_loss, ref_info.indexer_loss, rtol=1e-4, atol=1e-5)
    assert float(info.indexer_loss.min()) > 0.0
  else:
    assert info.indexer_loss is None and ref_info.indexer_loss is None


def test_indexer_loss_trains_only_the_indexer(monkeypatch):
  """The output has no gradient to the indexer inputs; the KL has, equal to the reference's,
  also when the selector runs several padded query chunks."""
  import subq_jax.ssa as ssa_lib

  monkeypatch.setattr(ssa_lib, "INDEXER_CHUNK_ELEMENTS", 2 * 90 * 4 * 32)  # 32-query chunks
  config = SSAConfig(kind="indexer", indexer_heads=2, indexer_dim=8, **SMALL)
  t = 90
  q, k, v = _qkv(21, 2, t, 4, 2, 16)
  kw = _indexer_inputs(22, 2, t, config)
  w_out = jax.random.normal(jax.random.PRNGKey(23), q.shape)

  def grads(implementation):
    def out_term(kw):
      return jnp.sum(ssa_attention(q, k, v, config, implementation=implementation, **kw) * w_out)

    def kl_term(kw):
      _, info = ssa_attention(
        q, k, v, config, implementation=implementation, return_info=True, **kw
      )
      return jnp.sum(info.indexer_loss)

    return jax.grad(out_term)(kw), jax.grad(kl_term)(kw)

  g_out, g_kl = grads("xla")
  _, g_kl_ref = grads("reference")
  for name in kw:
    np.testing.assert_array_equal(g_out[name], 0.0)
    assert float(jnp.abs(g_kl[name]).max()) > 0.0, name
  chex.assert_trees_all_close(g_kl, g_kl_ref, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("kind", ["ssa", "block_topk", "sliding", "indexer", "dense"])
def test_gradients_match_reference(kind):
  config = SSAConfig(kind=kind, summary="bounds", indexer_heads=2, indexer_dim=8, **SMALL)
  t = 90
  q, k, v = _qkv(11, 1, t, 4, 1, 32)
  kw = _indexer_inputs(12, 1, t, config) if kind == "indexer" else {}
  cotangent = jax.random.normal(jax.random.PRNGKey(13), q.shape)

  def loss(q, k, v, implementation):
    out = ssa_attention(q, k, v, config, implementation=implementation, **kw)
    return jnp.sum(out * cotangent)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, "xla")
  ref = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, "reference")
  chex.assert_tree_all_finite(grads)
  chex.assert_trees_all_close(grads, ref, atol=5e-5, rtol=5e-5)
  assert float(jnp.abs(grads[1]).max()) > 0  # keys do receive gradient


def _coarse_by_hand(rq, rk, v, config, scale):
  """The coarse branch one query at a time: softmax over the summaries of blocks
  [sink_blocks, t // B - W), values the blocks' (constant) mean values; 0 without blocks."""
  b, t, hq, _ = rq.shape
  bs, hkv = config.block_size, rk.shape[2]
  g = hq // hkv
  summaries, values = [], []
  for j in range(-(-t // bs)):
    keys = rk[:, j * bs : (j + 1) * bs]  # [b, <=B, hkv, d_r] (no padding needed below)
    if config.summary == "mean":
      summaries.append(lambda r, keys=keys: jnp.einsum("bhd,bhd->bh", r, keys.mean(1)))
    else:
      hi, lo = keys.max(1), keys.min(1)
      summaries.append(
        lambda r, hi=hi, lo=lo: (
          jnp.einsum("bhd,bhd->bh", jnp.maximum(r, 0), hi)
          + jnp.einsum("bhd,bhd->bh", jnp.minimum(r, 0), lo)
        )
      )
    values.append(jax.lax.stop_gradient(v[:, j * bs : (j + 1) * bs].mean(1)))
  rows = []
  for pos in range(t):
    blocks = range(config.sink_blocks, pos // bs - config.local_blocks)
    if not blocks:
      rows.append(jnp.zeros((b, hq, v.shape[-1])))
      continue
    r = rq[:, pos].reshape(b, hkv, g, -1).transpose(2, 0, 1, 3)  # [g, b, hkv, d_r]
    logits = jnp.stack([jax.vmap(summaries[j])(r) for j in blocks], -1) * scale  # [g,b,hkv,n]
    p = jax.nn.softmax(logits, axis=-1)
    o = jnp.einsum("gbhn,nbhd->bhgd", p, jnp.stack([values[j] for j in blocks]))
    rows.append(o.reshape(b, hq, -1))
  return jnp.stack(rows, 1)


@pytest.mark.parametrize(
  "kind, summary, implementation",
  [("ssa", "mean", "xla"), ("ssa", "bounds", "reference"), ("block_topk", "bounds", "pallas")],
)
def test_coarse_grad_changes_no_output_and_adds_the_coarse_branch_gradient(
  kind, summary, implementation
):
  """With `coarse_grad` = w the outputs are bit for bit those without, and the gradients
  are those without plus w times the gradient of the coarse branch built by hand."""
  base = SSAConfig(kind=kind, summary=summary, **{**SMALL, "block_size": 8, "query_tile": 2})
  config = SSAConfig(**{**vars(base), "coarse_grad": 0.5})
  t = 67  # not a multiple of the block
  q, k, v = _qkv(141, 2, t, 4, 2, 16)
  cotangent = jax.random.normal(jax.random.PRNGKey(142), q.shape)
  attention = lambda c: lambda q, k, v: ssa_attention(q, k, v, c, implementation=implementation)
  np.testing.assert_array_equal(attention(config)(q, k, v), attention(base)(q, k, v))
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * cotangent)
  grads = jax.jit(jax.grad(loss(attention(config)), argnums=(0, 1, 2)))(q, k, v)
  without = jax.grad(loss(attention(base)), argnums=(0, 1, 2))(q, k, v)
  by_hand = lambda q, k, v: _coarse_by_hand(q, k, v, config, 0.25)  # 1 / sqrt(16)
  coarse = jax.grad(loss(by_hand), argnums=(0, 1, 2))(q, k, v)
  assert float(jnp.abs(coarse[1]).max()) > 0 and float(jnp.abs(coarse[2]).max()) == 0
  want = jax.tree.map(lambda a, c: a + 0.5 * c, without, coarse)
  chex.assert_tree_all_finite(grads)
  chex.assert_trees_all_close(grads, want, atol=5e-5, rtol=5e-5)


def _frontier_by_hand(rq, rk, config, t):
  """Every node the beam descent scores for each tile, in numpy, from DESIGN.md's
  descent: [b][kv][tile] -> [(level, node)]. Bounds summaries, tiles of Q queries routing
  with the rows of positions [iQ - Q + 1, iQ]."""
  rq, rk = np.asarray(rq, np.float64), np.asarray(rk, np.float64)
  b, _, hq, _ = rq.shape
  hkv, bs, f, q_tile = rk.shape[2], config.block_size, config.fanout, config.tile
  n = -(-t // bs)
  levels = config.num_levels(n)
  out = [[[] for _ in range(hkv)] for _ in range(b)]
  for bi, h in itertools.product(range(b), range(hkv)):
    for i in range(-(-t // q_tile)):
      pos = [max(p, 0) for p in range(i * q_tile - q_tile + 1, i * q_tile + 1)]
      rows = rq[bi, pos].reshape(len(pos), hkv, -1)[:, h]  # this head's group [Q, G * d]
      rows = rows.reshape(-1, rq.shape[-1])  # [Q * G, d]

      def score(level, node, rows=rows, bi=bi, h=h):
        keys = rk[bi, node * bs * f ** (level - 1) : (node + 1) * bs * f ** (level - 1), h]
        hi, lo = keys.max(0), keys.min(0)
        return (np.maximum(rows, 0) @ hi + np.minimum(rows, 0) @ lo).max()

      prefix = max(i * q_tile // bs - config.local_blocks, 0)
      kept, seen = [], []
      for level in range(levels, 0, -1):
        span = f ** (level - 1)
        candidates = list(range(prefix // (span * f) * f, prefix // span))
        candidates += [c * f + j for c in kept for j in range(f)]
        if level == 1:
          candidates = [c for c in candidates if c >= config.sink_blocks]
        seen += [(level, c) for c in candidates]
        keep = config.top_k if level == 1 else config.beam_at(level)
        kept = sorted(candidates, key=lambda c, lv=level: -score(lv, c))[:keep]
      out[bi][h].append(seen)
  return out


def _coarse_frontier_by_hand(rq, rk, v, config, scale, frontier):
  """The frontier coarse branch: each query's softmax over the bounds summaries of its
  tile's scored nodes (max and min of the keys under each node, taken from the keys
  directly), values the mean values under each node (constants)."""
  b, t, hq, _ = rq.shape
  hkv, bs, f = rk.shape[2], config.block_size, config.fanout
  g = hq // hkv
  hi, lo, mean_v, offset = [], [], [], {}
  for level in range(1, config.num_levels(-(-t // bs)) + 1):
    span = bs * f ** (level - 1)
    pad = ((0, 0), (0, -t % span), (0, 0), (0, 0))  # edge rows: only partial nodes see them
    keys, vals = (jnp.pad(x, pad, mode="edge") for x in (rk, v))
    keys = keys.reshape(b, -1, span, hkv, keys.shape[-1])
    offset[level] = sum(x.shape[1] for x in hi)
    hi.append(keys.max(2))
    lo.append(keys.min(2))
    mean_v.append(jax.lax.stop_gradient(vals.reshape(b, -1, span, hkv, v.shape[-1]).mean(2)))
  hi, lo, mean_v = (jnp.concatenate(x, 1) for x in (hi, lo, mean_v))  # [b, nodes, hkv, .]
  width = max(len(nodes) for per_b in frontier for per_h in per_b for nodes in per_h)
  ids = np.full((b, hkv, t, width), -1)  # each query's nodes, -1 for an empty slot
  for bi, h, p in itertools.product(range(b), range(hkv), range(t)):
    nodes = [offset[lv] + node for lv, node in frontier[bi][h][p // config.tile]]
    ids[bi, h, p, : len(nodes)] = nodes
  at = (np.arange(b)[:, None, None, None], np.maximum(ids, 0), np.arange(hkv)[None, :, None, None])
  r = rq.reshape(b, t, hkv, g, -1)
  logits = jnp.einsum("bthgd,bhtcd->bthgc", jnp.maximum(r, 0), hi[at])
  logits += jnp.einsum("bthgd,bhtcd->bthgc", jnp.minimum(r, 0), lo[at])
  ok = (ids >= 0).transpose(0, 2, 1, 3)[:, :, :, None]  # [b, t, hkv, 1, C]
  weights = jax.nn.softmax(jnp.where(ok, scale * logits, -jnp.inf), axis=-1)
  out = jnp.einsum("bthgc,bhtcd->bthgd", jnp.where(ok, weights, 0.0), mean_v[at])
  return out.reshape(b, t, hq, -1)  # 0 where a query has no node


def test_coarse_frontier_gradient_matches_the_branch_built_by_hand():
  """`coarse_nodes='frontier'` (three tree levels here): outputs unchanged, gradients those
  without plus w times the gradient of a by-hand softmax over the nodes a numpy descent
  scores; fewer nodes than the blocks branch reads, and not only level-1 ones."""
  base = SSAConfig(**{**SMALL, "block_size": 8, "query_tile": 4, "top_k": 2}, summary="bounds")
  config = SSAConfig(**{**vars(base), "coarse_grad": 0.5, "coarse_nodes": "frontier"})
  t = 141  # 18 blocks, 3 levels of fanout 4; not a multiple of the block
  q, k, v = _qkv(161, 1, t, 4, 2, 8)
  frontier = _frontier_by_hand(q, k, config, t)
  last = frontier[0][0][-1]
  assert {lv for lv, _ in last} == {1, 2, 3} and len(last) < 18 - 3
  cotangent = jax.random.normal(jax.random.PRNGKey(162), q.shape)
  attention = lambda c: lambda q, k, v: ssa_attention(q, k, v, c, implementation="xla")
  np.testing.assert_array_equal(attention(config)(q, k, v), attention(base)(q, k, v))
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent)
  grads = jax.jit(jax.grad(loss(attention(config)), argnums=(0, 1, 2)))(q, k, v)
  without = jax.grad(loss(attention(base)), argnums=(0, 1, 2))(q, k, v)
  by_hand = lambda q, k, v: _coarse_frontier_by_hand(q, k, v, config, 8**-0.5, frontier)
  coarse = jax.grad(loss(by_hand), argnums=(0, 1, 2))(q, k, v)
  assert float(jnp.abs(coarse[1]).max()) > 0 and float(jnp.abs(coarse[2]).max()) == 0
  want = jax.tree.map(lambda a, c: a + 0.5 * c, without, coarse)
  chex.assert_tree_all_finite(grads)
  chex.assert_trees_all_close(grads, want, atol=5e-5, rtol=5e-5)


def test_coarse_frontier_is_the_blocks_branch_when_the_tree_has_one_level():
  """With no more blocks than the fanout the descent's only level scores every routable
  block, so both coarse branches give the same gradients."""
  config = SSAConfig(**{**SMALL, "fanout": 16}, summary="mean", coarse_grad=1.0)
  frontier = SSAConfig(**{**vars(config), "coarse_nodes": "frontier"})
  q, k, v = _qkv(171, 2, 200, 4, 2, 16)  # 13 blocks
  grad = lambda c: jax.jit(
    jax.grad(lambda q, k: jnp.sum(ssa_attention(q, k, v, c, implementation="xla") ** 2), (0, 1))
  )(q, k)
  chex.assert_trees_all_close(grad(frontier), grad(config), atol=1e-5, rtol=1e-5)


def test_coarse_nodes_is_checked():
  with pytest.raises(ValueError, match=r"coarse_nodes='tree' is not one of"):
    SSAConfig(coarse_nodes="tree")
  with pytest.raises(ValueError, match=r"kind='block_topk' has no tree"):
    SSAConfig(kind="block_topk", coarse_grad=1.0, coarse_nodes="frontier")


def test_coarse_grad_reaches_keys_that_routing_did_not_select():
  """The last query's output depends on its sinks, chosen, local and own blocks only; its
  gradient reaches the other blocks' keys through the coarse branch alone."""
  config = SSAConfig(**SMALL)
  q, k, v = _qkv(151, 1, 160, 2, 1, 16)
  last = lambda c: lambda k: jnp.sum(ssa_attention(q, k, v, c, implementation="xla")[:, -1])
  _, info = _run(q, k, v, config, "xla")
  attended = {0, 8, 9} | set(np.asarray(info.selected_blocks[0, 0, -1]).tolist())
  others = [j for j in range(10) if j not in attended]
  assert len(others) >= 4
  key_grad = lambda c: np.abs(np.asarray(jax.grad(last(c))(k))).reshape(10, 16, -1).max((1, 2))
  np.testing.assert_array_equal(key_grad(config)[others], 0.0)
  with_coarse = key_grad(SSAConfig(**{**vars(config), "coarse_grad": 1.0}))
  assert np.all(with_coarse[others] > 0), with_coarse


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_indexer_gradients_match_reference_over_padded_chunks(monkeypatch, dtype):
  """The indexer's own backward (the selected keys' terms written into the dense layout,
  `ssa._attend_selected`) against autodiff of the reference: GQA 2, several query chunks,
  the last padded. In bf16 the T-wide operands of that backward are rounded to bf16, as
  a flash backward's are: within 2% of the largest gradient entry."""
  import subq_jax.ssa as ssa_lib

  monkeypatch.setattr(ssa_lib, "INDEXER_CHUNK_ELEMENTS", 2 * 90 * 4 * 32)  # 32-query chunks
  config = SSAConfig(kind="indexer", indexer_heads=2, indexer_dim=8, **SMALL)
  t = 90
  q, k, v = _qkv(31, 2, t, 4, 2, 16, dtype)
  kw = _indexer_inputs(32, 2, t, config)
  cotangent = jax.random.normal(jax.random.PRNGKey(33), q.shape)

  def loss(q, k, v, implementation):
    out = ssa_attention(q, k, v, config, implementation=implementation, **kw)
    return jnp.sum(out.astype(jnp.float32) * cotangent)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  grads, ref = grad(q, k, v, "xla"), grad(q, k, v, "reference")
  for g, r, name in zip(grads, ref, "qkv", strict=True):
    assert g.dtype == dtype, name
    g, r = g.astype(jnp.float32), r.astype(jnp.float32)
    assert float(jnp.abs(r).max()) > 0.1, name
    if dtype == jnp.float32:
      chex.assert_trees_all_close(g, r, atol=5e-5, rtol=5e-5)
    else:
      err = float(jnp.abs(g - r).max() / jnp.abs(r).max())
      assert err < 2e-2, (name, err)


@pytest.mark.parametrize("summary", ["mean", "bounds"])
@pytest.mark.parametrize("query_tile", [16, 4])
def test_full_budget_equals_dense(summary, query_tile):
  t = 200
  num_blocks = -(-t // 16)
  config = SSAConfig(
    block_size=16, query_tile=query_tile, top_k=num_blocks, fanout=3, beam=1, summary=summary
  )
  q, k, v = _qkv(21, 1, t, 4, 2, 32)
  for implementation in ("xla", "reference"):
    out, info = _run(q, k, v, config, implementation)
    dense, dense_info = _run(q, k, v, SSAConfig(kind="dense"), "reference")
    chex.assert_trees_all_close(out, dense, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(info.pairs_attended, dense_info.pairs_attended)


@pytest.mark.parametrize(
  "kind, summary",
  [("ssa", "mean"), ("ssa", "bounds"), ("block_topk", "bounds"), ("indexer", "mean")],
)
def test_causal_outputs_never_see_later_tokens(kind, summary):
  config = SSAConfig(kind=kind, summary=summary, indexer_heads=2, indexer_dim=8, **SMALL)
  t, cut = 220, 131  # cut falls inside a query tile and a block
  q, k, v = _qkv(31, 1, t, 4, 2, 32)
  q2, k2, v2 = _qkv(32, 1, t, 4, 2, 32)
  kw = _indexer_inputs(33, 1, t, config) if kind == "indexer" else {}
  kw2 = _indexer_inputs(34, 1, t, config) if kind == "indexer" else {}
  changed = lambda a, b: jnp.concatenate([a[:, :cut], b[:, cut:]], axis=1)
  out, _ = _run(q, k, v, config, "xla", **kw)
  kw_changed = {name: changed(kw[name], kw2[name]) for name in kw}
  out2, _ = _run(changed(q, q2), changed(k, k2), changed(v, v2), config, "xla", **kw_changed)
  chex.assert_trees_all_close(out[:, :cut], out2[:, :cut], atol=1e-6, rtol=1e-6)
  assert not np.allclose(out[:, cut:], out2[:, cut:])


@pytest.mark.parametrize(
  "overrides",
  [
    dict(summary="mean"),
    dict(summary="bounds"),
    dict(summary="mean", fanout=2, beam=1, top_k=2),
    dict(summary="bounds", fanout=3, beam=3, top_k=5, sink_blocks=0, local_blocks=2),
    dict(summary="mean", query_tile=2, sink_blocks=2, local_blocks=0),
  ],
)
def test_selection_equals_brute_force_descent(overrides):
  config = SSAConfig(**{**SMALL, "block_size": 8, **overrides})
  t = 8 * 61 + 3  # 62 blocks: three or more tree levels for every fanout here
  q, k, _ = _qkv(41, 2, t, 4, 2, 16)
  got = jax.jit(select_blocks, static_argnames="config")(q, k, config)
  want = jax.jit(ssa_reference.select_blocks, static_argnames="config")(q, k, config)
  np.testing.assert_array_equal(got, want)
  assert config.num_levels(62) >= 3
  filled = np.asarray(got[..., -1] >= 0).mean()  # later tiles fill every slot
  assert filled > 0.5


def test_keys_per_query_do_not_grow_with_seq_len():
  config = SSAConfig(block_size=16, top_k=4, fanout=4, beam=2)
  t = 1024
  q, k, v = _qkv(51, 1, 2 * t, 2, 1, 32)
  _, info_t = _run(q[:, :t], k[:, :t], v[:, :t], config, "xla")
  _, info_2t = _run(q, k, v, config, "xla")
  # Selection is causal, so the first T queries attend exactly as before; each of the
  # T later ones fills every slot: (slots - 1) full blocks and its own block causally.
  added = float(info_2t.pairs_attended[0, 0] - info_t.pairs_attended[0, 0])
  bs = config.block_size
  assert added == t * (config.slots - 1) * bs + (t // bs) * bs * (bs + 1) // 2
  assert float(info_t.pairs_attended[0, 0]) <= t * config.keys_per_query


@pytest.mark.parametrize(
  "summary, depth", [("mean", 0.05), ("mean", 0.6), ("bounds", 0.1), ("bounds", 0.7)]
)
def test_needle_far_back_is_selected(summary, depth):
  """A block of keys aligned with what the last tile looks for, planted far back in a
  16K-token sequence of isotropic random keys, is chosen by that tile."""
  t, d, bs = 16384, 64, 64
  config = SSAConfig(block_size=bs, top_k=4, fanout=16, beam=4, summary=summary)
  key = jax.random.PRNGKey(int(depth * 100) + (summary == "bounds"))
  kq, kk, ku, kn = jax.random.split(key, 4)
  direction = jax.random.normal(ku, (d,))
  direction /= jnp.linalg.norm(direction)
  needle = int(depth * (t // bs))
  k = jax.random.normal(kk, (1, t, 1, d))
  k = k.at[:, needle * bs : (needle + 1) * bs].add(8.0 * direction[None, None, None])
  q = jax.random.normal(kq, (1, t, 2, d))
  looking = direction + 0.1 * jax.random.normal(kn, (2 * bs, 2, d))
  q = q.at[:, -2 * bs :].set(looking[None])  # the last tile's routing window
  selected = jax.jit(select_blocks, static_argnames="config")(q, k, config)
  assert needle in np.asarray(selected[0, 0, -1]).tolist()
  assert needle < t // bs - 1 - config.local_blocks  # found by routing, not the local window


def test_xla_memory_is_linear_in_seq_len():
  """The largest intermediate of the xla path grows like T, never like T^2 or (T/B)^2."""
  config = SSAConfig(block_size=16, top_k=4, fanout=4, beam=2)

  def largest(t):
    q = jax.ShapeDtypeStruct((1, t, 2, 32), jnp.float32)
    k = v = jax.ShapeDtypeStruct((1, t, 1, 32), jnp.float32)
    loss = lambda q, k, v: ssa_attention(q, k, v, config, implementation="xla").sum()
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    return max(_sizes(jaxpr.jaxpr))

  small, big = largest(2048), largest(8192)
  assert big <= 4.5 * small, (small, big)


def _sizes(jaxpr):
  """Element counts of every value a jaxpr computes, nested jaxprs (scan, remat) included."""
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield int(np.prod(getattr(var.aval, "shape", ())))
    for param in eqn.params.values():
      for inner in param if isinstance(param, tuple | list) else (param,):
        inner = getattr(inner, "jaxpr", inner)  # ClosedJaxpr -> Jaxpr
        if hasattr(inner, "eqns"):
          yield from _sizes(inner)


def test_xla_runs_at_64k_tokens():
  config = SSAConfig(block_size=64, top_k=4, fanout=16, beam=2)
  t = 65536
  q, k, v = _qkv(61, 1, t, 2, 1, 32)
  out, info = _run(q, k, v, config, "xla")
  chex.assert_shape(out, q.shape)
  chex.assert_tree_all_finite(out)
  assert float(info.pairs_attended[0, 0]) <= t * config.keys_per_query


def test_jit_and_defaults():
  q, k, v = _qkv(71, 1, 100, 4, 4, 16, jnp.bfloat16)
  out = jax.jit(ssa_attention, static_argnames="config")(q, k, v, SSAConfig(block_size=16))
  assert out.dtype == jnp.bfloat16 and out.shape == q.shape
  chex.assert_tree_all_finite(out)


def test_route_without_rope_uses_routing_inputs():
  config = SSAConfig(route_with_rope=False, **SMALL)
  q, k, v = _qkv(81, 1, 160, 2, 1, 16)
  rq, rk, _ = _qkv(82, 1, 160, 2, 1, 8)
  _, info = _run(q, k, v, config, "xla", routing_q=rq, routing_k=rk)
  _, ref = _run(q, k, v, config, "reference", routing_q=rq, routing_k=rk)
  np.testing.assert_array_equal(info.selected_blocks, ref.selected_blocks)
  select = jax.jit(select_blocks, static_argnames="config")
  want = select(rq, rk, SSAConfig(**SMALL))
  np.testing.assert_array_equal(info.selected_blocks, want)
  assert not np.array_equal(want, select(q, k, SSAConfig(**SMALL)))


def _far_inputs(seed, q, k):
  kq, kk = jax.random.split(jax.random.PRNGKey(seed))
  return dict(
    far_q=jax.random.normal(kq, q.shape, jnp.float32).astype(q.dtype),
    far_k=jax.random.normal(kk, k.shape, jnp.float32).astype(k.dtype),
  )


@pytest.mark.parametrize(
  "kind, summary, dtype",
  [
    ("ssa", "bounds", jnp.float32),
    ("block_topk", "mean", jnp.float32),
    ("sliding", "mean", jnp.bfloat16),
  ],
)
def test_far_blocks_match_reference(kind, summary, dtype):
  """far_distance > 0: sinks and chosen blocks scored far_q . far_k, local and own blocks
  q . k, in one softmax: the blockwise path's two merged calls equal the reference's
  dense softmax with the far pairs' logits swapped in, outputs and all five gradients."""
  config = SSAConfig(kind=kind, summary=summary, far_distance=20, **SMALL)
  t = 173
  q, k, v = _qkv(141, 1, t, 4, 2, 32, dtype)
  far = _far_inputs(142, q, k)
  out, info = _run(q, k, v, config, "xla", **far)
  ref, ref_info = _run(q, k, v, config, "reference", **far)
  np.testing.assert_array_equal(info.selected_blocks, ref_info.selected_blocks)
  assert int((info.selected_blocks >= 0).sum()) > 0
  chex.assert_trees_all_close(out, ref, **TOL[dtype])
  # Not the attention without them: the far pairs are scored differently.
  plain = _run(q, k, v, dataclasses.replace(config, far_distance=0), "xla")[0]
  assert float(jnp.abs(out.astype(jnp.float32) - plain.astype(jnp.float32)).max()) > 0.1
  if dtype != jnp.float32:
    return
  cotangent = jax.random.normal(jax.random.PRNGKey(143), q.shape)

  def loss(q, k, v, far_q, far_k, implementation):
    o = ssa_attention(q, k, v, config, far_q=far_q, far_k=far_k, implementation=implementation)
    return jnp.sum(o * cotangent)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), static_argnums=5)
  grads = grad(q, k, v, far["far_q"], far["far_k"], "xla")
  chex.assert_trees_all_close(
    grads, grad(q, k, v, far["far_q"], far["far_k"], "reference"), atol=5e-5, rtol=5e-5
  )
  assert all(float(jnp.abs(g).max()) > 0 for g in grads)


def test_far_inputs_equal_to_q_and_k_give_the_plain_attention():
  """The merge of the far and near calls is exact: with far_q = q and far_k = k the
  output is the one-call attention (routing reads the same inputs too)."""
  config = SSAConfig(summary="bounds", far_distance=20, **SMALL)
  q, k, v = _qkv(151, 1, 150, 4, 2, 32)
  out, info = _run(q, k, v, config, "xla", far_q=q, far_k=k)
  plain, plain_info = _run(q, k, v, dataclasses.replace(config, far_distance=0), "xla")
  np.testing.assert_array_equal(info.selected_blocks, plain_info.selected_blocks)
  chex.assert_trees_all_close(out, plain, atol=2e-6, rtol=2e-6)


def test_far_inputs_route_the_routed_kinds():
  """With route_with_rope, the routed kinds choose blocks by far_q . far_k summaries."""
  config = SSAConfig(far_distance=20, **SMALL)
  q, k, v = _qkv(161, 1, 160, 4, 2, 32)
  far = _far_inputs(162, q, k)
  info = _run(q, k, v, config, "xla", **far)[1]
  select = jax.jit(select_blocks, static_argnames="config")
  want = select(far["far_q"], far["far_k"], config)
  np.testing.assert_array_equal(info.selected_blocks, want)
  assert not np.array_equal(want, select(q, k, config))


@pytest.mark.parametrize("tile", [1, 16])
def test_pallas_far_blocks_match_xla(tile):
  """The far and near calls through the Pallas kernels (tiles of 1: repeated heads)."""
  config = SSAConfig(**{**SMALL, "query_tile": tile, "top_k": 2, "far_distance": 20})
  q, k, v = _qkv(171, 1, 64, 4, 2, 16)
  far = _far_inputs(172, q, k)
  out, info = _run(q, k, v, config, "pallas", **far)
  ref, ref_info = _run(q, k, v, config, "xla", **far)
  np.testing.assert_array_equal(info.selected_blocks, ref_info.selected_blocks)
  chex.assert_trees_all_close(out, ref, atol=2e-5, rtol=2e-5)

  def loss(q, k, v, far_q, far_k, impl):
    o = ssa_attention(q, k, v, config, far_q=far_q, far_k=far_k, implementation=impl)
    return jnp.sum(o**2)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), static_argnums=5)
  args = (q, k, v, far["far_q"], far["far_k"])
  chex.assert_trees_all_close(grad(*args, "pallas"), grad(*args, "xla"), atol=5e-5, rtol=5e-5)


def _bad(**changes):
  q, k, v = _qkv(91, 1, 64, 4, 2, 16)
  args = dict(q=q, k=k, v=v, config=SSAConfig(**SMALL))
  args.update(changes)
  return args


@pytest.mark.parametrize(
  "args, match",
  [
    (_bad(k=jnp.ones((1, 64, 3, 16)), v=jnp.ones((1, 64, 3, 16))), "q_heads=4 .* kv_heads=3"),
    (_bad(k=jnp.ones((1, 64, 2, 8)), v=jnp.ones((1, 64, 2, 8))), "head_dim differs"),
    (_bad(v=jnp.ones((1, 64, 2, 8))), r"k.shape=.* v.shape="),
    (_bad(q=jnp.ones((2, 64, 4, 16))), "batch differs"),
    (_bad(q=jnp.ones((1, 60, 4, 16))), "seq differs"),
    (_bad(q=jnp.ones((64, 4, 16))), "rank 4"),
    (_bad(q=jnp.ones((1, 64, 4, 16), jnp.int32)), "floating point.*int32"),
    (_bad(config="ssa"), "SSAConfig"),
    (_bad(implementation="cuda"), "implementation='cuda'"),
    (_bad(routing_q=jnp.ones((1, 64, 4, 8))), "together"),
    (
      _bad(routing_q=jnp.ones((1, 64, 4, 8)), routing_k=jnp.ones((1, 64, 2, 8))),
      "route_with_rope=False",
    ),
    (_bad(config=SSAConfig(route_with_rope=False)), "position-free"),
    (_bad(config=SSAConfig(kind="indexer")), "kind='indexer' needs routing_q"),
    (_bad(indexer_weights=jnp.ones((1, 64, 4))), "indexer_weights is for"),
    (_bad(far_q=jnp.ones((1, 64, 4, 16))), "far_q and far_k together"),
    (_bad(far_q=jnp.ones((1, 64, 4, 16)), far_k=jnp.ones((1, 64, 2, 16))), "far_distance=0"),
    (_bad(config=SSAConfig(far_distance=8)), "far_distance=8 needs far_q and far_k"),
    (
      _bad(
        config=SSAConfig(far_distance=8),
        far_q=jnp.ones((1, 64, 4, 16)),
        far_k=jnp.ones((1, 64, 2, 8)),
      ),
      r"far_k.shape=\(1, 64, 2, 8\)",
    ),
  ],
)
def test_bad_input_names_the_values(args, match):
  with pytest.raises(ValueError, match=match):
    ssa_attention(**args)


@pytest.mark.parametrize(
  "fields, match",
  [
    (dict(top_k=0), "top_k=0"),
    (dict(block_size=48), "block_size=48 must be a power of two"),
    (dict(block_size=16, query_tile=32), "query_tile=32 must divide block_size=16"),
    (dict(block_size=16, query_tile=6), "query_tile=6"),
    (dict(kind="moba"), "kind='moba'"),
    (dict(summary="max"), "summary='max'"),
    (dict(fanout=1), "fanout=1"),
    (dict(beam=0), "beam=0"),
    (dict(sink_blocks=-1), "sink_blocks=-1"),
    (dict(coarse_grad=-0.5), "coarse_grad=-0.5"),
    (dict(coarse_grad=float("inf")), "coarse_grad=inf"),
    (dict(coarse_grad="1"), "coarse_grad='1'"),
    (dict(kind="sliding", coarse_grad=1.0), "coarse_grad=1.0 .* kind='sliding'"),
    (dict(kind="dense", coarse_grad=0.5), "kind='dense' does not route"),
    (dict(far_distance=-4), "far_distance=-4"),
    (dict(far_distance=True), "far_distance=True"),
    (dict(kind="indexer", far_distance=8), "kind='indexer' attends no blocks"),
  ],
)
def test_bad_config_names_the_values(fields, match):
  with pytest.raises(ValueError, match=match):
    SSAConfig(**fields)


def test_pallas_path_matches_xla():
  """ssa_attention end to end through the Pallas kernels (interpreted on CPU)."""
  config = SSAConfig(**{**SMALL, "query_tile": 16, "top_k": 2})
  q, k, v = _qkv(101, 1, 60, 4, 2, 32)
  out, info = _run(q, k, v, config, "pallas")
  ref, ref_info = _run(q, k, v, config, "xla")
  np.testing.assert_array_equal(info.selected_blocks, ref_info.selected_blocks)
  chex.assert_trees_all_close(out, ref, atol=2e-5, rtol=2e-5)
  assert int((info.selected_blocks >= 0).sum()) > 0  # the routed part is exercised
  loss = lambda q, k, v, impl: jnp.sum(ssa_attention(q, k, v, config, implementation=impl) ** 2)
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  chex.assert_trees_all_close(grad(q, k, v, "pallas"), grad(q, k, v, "xla"), atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize(
  "kind,summary,tile", [("ssa", "mean", 1), ("ssa", "bounds", 2), ("block_topk", "mean", 1)]
)
def test_pallas_small_tiles_run_repeated_heads(kind, summary, tile):
  """query_tile * G < 16 rows: the kernels run each KV head's query heads repeated up to
  16 rows; output, selection and gradients equal the XLA path's."""
  config = SSAConfig(**{**SMALL, "kind": kind, "summary": summary, "query_tile": tile})
  q, k, v = _qkv(131 + tile, 1, 64, 4, 2, 16)  # G = 2: tile * G = 2 or 4 rows
  out, info = _run(q, k, v, config, "pallas")
  ref, ref_info = _run(q, k, v, config, "xla")
  np.testing.assert_array_equal(info.selected_blocks, ref_info.selected_blocks)
  assert int((info.selected_blocks >= 0).sum()) > 0
  chex.assert_trees_all_close(out, ref, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(
    select_blocks(q, k, config, implementation="pallas"), ref_info.selected_blocks
  )
  loss = lambda q, k, v, impl: jnp.sum(ssa_attention(q, k, v, config, implementation=impl) ** 2)
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  chex.assert_trees_all_close(grad(q, k, v, "pallas"), grad(q, k, v, "xla"), atol=5e-5, rtol=5e-5)


def test_partial_block_list_gives_empty_rows():
  """Rows that see no key (a shard's share of a block list) give out 0 and lse -inf."""
  from pallas_kernels.sparse_attention.reference import sparse_attention

  q, k, v = _qkv(111, 1, 32, 2, 1, 16)
  ids = jnp.array([[[[-1], [0]]]], jnp.int32)  # tile 0 lists nothing, tile 1 block 0
  fn = jax.jit(sparse_attention, static_argnames=("block_size", "query_tile", "scale"))
  out, lse = fn(q, k, v, ids, block_size=16, query_tile=16, scale=0.25)
  assert bool(jnp.all(out[:, :16] == 0)) and bool(jnp.all(jnp.isneginf(lse[..., :16])))
  chex.assert_tree_all_finite((out[:, 16:], lse[..., 16:]))


def test_pallas_rejects_shapes_the_kernels_cannot_take():
  q, k, v = _qkv(121, 1, 64, 3, 1, 16)  # GQA ratio 3
  with pytest.raises(ValueError, match="q_heads / kv_heads = 3 must be a power of two"):
    ssa_attention(q, k, v, SSAConfig(**SMALL), implementation="pallas")

"""Sequence parallelism: SSA and ring attention with the sequence sharded over a mesh axis.

    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, seq=4))
    perm = sharding.layout_permutation(seq_len, 4, config.block_size, "striped")
    out = sharded_attention(q[:, perm], k[:, perm], v[:, perm], config, mesh, layout="striped")
    # out is in layout order too: out[:, argsort(perm)] is the natural order.

Arrays come in *layout order* (`subq_jax.sharding`): the model permutes its tokens and
RoPE positions once at the input, so no layer reorders anything. Shard s holds the
blocks `block_owner_table(...)[s]` of every sequence, ascending.

Block kinds (`ssa`, `block_topk`, `sliding`), per shard under `shard_map`:
1. Level-1 summaries of the local blocks (T/(P B) rows per KV head) are all-gathered:
   every shard holds the global level-1 table, O(T/B), and builds the upper levels.
2. Routing window: a tile routes with the Q routing queries ending at its first
   position; the first tile of a block needs the end of the previous block, which may
   live on another shard. Those tails arrive by `ppermute` (one per distinct owner
   offset of the layout: one for striped and contiguous, two for zigzag) and take the
   place of each local block's own last Q - 1 positions (which only the next block's
   first tile reads) in one copy of the routing queries, so the one-device window rule
   and its Pallas kernel apply unchanged.
3. Each local tile descends the global tree (causal frontier from its global block).
4. Ring pass: the local K/V chunk travels P - 1 steps round the ring (`ppermute`,
   issued before the step's compute so that XLA overlaps them). At each step a tile
   attends to those of its listed blocks that the held chunk owns, and the partial
   outputs merge exactly by log-sum-exp. The backward pass (custom VJPs) sends K/V
   round again with dK/dV accumulators, which a last step returns to the owners.
   With Pallas (`pallas_ring`) the kernels merge in place: each step's forward goes on
   from the (out, lse) so far and each step's dq adds into dq; the gradients come from
   the merged out and lse (no forward recomputed), and the last step's dK/dV are
   written over the held K/V chunk, which is not needed any more.
Per device: K/V O(T/P) (own chunk + the one in flight), summaries O(T/B); nothing ever
gathers the sequence's K/V.

Dense baseline (`dense`, `dense_ring`): ring attention passing K/V the same way,
flash style in plain XLA: each step attends tile by tile (`DENSE_TILES` queries x keys,
wholly masked tiles skipped) to the held chunk, masked by global positions (so any
layout is exact), going on from the (out, lse) so far; the backward recomputes each
tile from the merged lse, adds into dq in place, and sends the held chunk's dK/dV on
with it in the inputs' dtype.

Partial attention reuses `sparse_attention` (reference or Pallas), whose causal mask
compares a tile's position in q with a block's position in k. For the own chunk local
indices are already right (a shard's blocks keep their global order). A tile lists only
blocks before its own, so a remote chunk's blocks are seen whole: `causal=False`, no
mask, no padded copies.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from pallas_kernels.sparse_attention import index as attention_index
from pallas_kernels.sparse_attention import pallas_gpu
from pallas_kernels.sparse_attention import reference as attention_reference
from subq_jax import sharding
from subq_jax import ssa as ssa_lib
from subq_jax.config import BLOCK_KINDS, SSAConfig

HIGHEST = jax.lax.Precision.HIGHEST
# (queries, keys) per tile of the dense ring's steps, by backend; a tile's f32 logits are
# batch x q_heads x queries x keys (on GPU with 32 heads: 256 MiB), one tile at a time.
DENSE_TILES = {"cpu": (256, 256)}
DEFAULT_DENSE_TILES = (1024, 2048)


# --------------------------------------------------------------------- public entry


def sharded_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  config: SSAConfig,
  mesh: jax.sharding.Mesh,
  *,
  layout: str = "striped",
  seq_axis: str = "seq",
  batch_axes: tuple[str, ...] = ("data", "fsdp"),
  routing_q: jax.Array | None = None,
  routing_k: jax.Array | None = None,
  scale: float | None = None,
  implementation: str | None = None,
  return_selected: bool = False,
):
  """Causal attention of `config.kind` with the sequence sharded over `seq_axis`.

  Args:
    q, k, v: [batch, seq, heads, head_dim] in layout order (see module docstring).
    config: `dense` or a block kind.
    mesh: a mesh with `seq_axis`; the batch is split over those of `batch_axes` it has.
    layout: the sequence layout q, k and v are in (`subq_jax.sharding.LAYOUTS`).
    routing_q, routing_k: position-free routing inputs (`route_with_rope=False`).
    scale: softmax scale; default 1 / sqrt(head_dim).
    implementation: `xla` (reference kernels) or `pallas`; None means `xla`.
    return_selected: also return the chosen blocks (block kinds), int32
      [batch, kv_heads, tiles, top_k] with tiles in layout order.

  Returns:
    out [batch, seq, q_heads, head_dim] in layout order (and the chosen blocks).
  """
  if config.kind not in (*BLOCK_KINDS, "dense"):
    raise ValueError(f"sequence parallelism supports {(*BLOCK_KINDS, 'dense')}, not {config.kind}")
  if config.kind == "dense" and return_selected:
    raise ValueError("kind='dense' selects no blocks")
  if (routing_q is None) != (routing_k is None):
    raise ValueError("pass routing_q and routing_k together, or neither")
  if config.kind in ("ssa", "block_topk") and routing_q is None and not config.route_with_rope:
    raise ValueError("route_with_rope=False: pass routing_q and routing_k")
  ssa_lib._check_qkv(q, k, v)
  p = mesh.shape[seq_axis]
  check_seq_len(q.shape[1], p, config.block_size, layout)
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
  batch = tuple(a for a in batch_axes if a in mesh.axis_names)
  spec = PartitionSpec(batch or None, seq_axis, None, None)
  common = dict(axis_name=seq_axis, num_shards=p, layout=layout, scale=scale)

  if config.kind == "dense":
    body = functools.partial(dense_ring_shard, block_size=config.block_size, **common)
    fn = sharding.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
    return fn(q, k, v)

  hkv, g = k.shape[2], q.shape[2] // k.shape[2]
  group = ssa_lib._kernel_group(g, config)
  if implementation == "pallas" and group > g:  # tiles of < 16 rows: repeated heads, as
    # ssa_attention runs them; the copies route alike and their outputs are dropped
    rq = None if routing_q is None else ssa_lib._repeat_group(routing_q, hkv, group)
    result = sharded_attention(
      ssa_lib._repeat_group(q, hkv, group),
      k,
      v,
      config,
      mesh,
      layout=layout,
      seq_axis=seq_axis,
      batch_axes=batch_axes,
      routing_q=rq,
      routing_k=routing_k,
      scale=scale,
      implementation=implementation,
      return_selected=return_selected,
    )
    out = result[0] if return_selected else result
    b, t, _, d = out.shape
    out = out.reshape(b, t, hkv, group, d)[:, :, :, :g].reshape(q.shape)
    return (out, result[1]) if return_selected else out
  routed = routing_q is not None and config.kind != "sliding"
  body = functools.partial(
    block_sparse_shard,
    config=config,
    implementation=implementation or "xla",
    return_selected=return_selected,
    **common,
  )
  if routed:
    wrapped = lambda q, k, v, rq, rk: body(q, k, v, routing_q=rq, routing_k=rk)
    args, in_specs = (q, k, v, routing_q, routing_k), (spec,) * 5
  else:
    wrapped, args, in_specs = body, (q, k, v), (spec,) * 3
  out_specs = (
    (spec, PartitionSpec(batch or None, None, seq_axis, None)) if return_selected else spec
  )
  return sharding.shard_map(wrapped, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(*args)


def check_seq_len(seq_len: int, num_shards: int, block_size: int, layout: str):
  chunks = num_shards * (2 if layout == "zigzag" else 1)
  if seq_len % (block_size * chunks):
    raise ValueError(
      f"{seq_len=} must be a multiple of block_size * {chunks} = {block_size * chunks} "
      f"(layout={layout!r}, {num_shards} shards): pad the sequence"
    )


# ------------------------------------------------------------ layout-derived tables


@functools.lru_cache(maxsize=64)
def _inverse_tables(num_blocks: int, num_shards: int, layout: str):
  """(owner, local index) of every global block, int32 [num_blocks] each."""
  table = sharding.block_owner_table(num_blocks, num_shards, layout)
  owner = np.empty(num_blocks, np.int32)
  local = np.empty(num_blocks, np.int32)
  owner[table] = np.arange(num_shards)[:, None]
  local[table] = np.arange(table.shape[1])[None, :]
  return owner, local


@functools.lru_cache(maxsize=64)
def _halo_plan(num_blocks: int, num_shards: int, layout: str):
  """Where each local block's predecessor tail comes from.

  Returns (shifts, sends, index): for each ring offset in `shifts`, the local blocks
  whose tails every shard sends that far (`sends`, the same on every shard; offset 0
  sends nothing); and for every (shard, local block) an index into the concatenation
  [own tails, tails received at each nonzero offset..., own first rows]. Global block 0
  has no predecessor: its routing window repeats position 0, as on one device.
  Striped sends every tail one step; contiguous and zigzag only chunk ends.
  """
  table = sharding.block_owner_table(num_blocks, num_shards, layout)
  owner, local = _inverse_tables(num_blocks, num_shards, layout)
  n_local = table.shape[1]
  prev = table - 1
  has_prev = prev >= 0
  src = local[np.maximum(prev, 0)]
  shift = (np.arange(num_shards)[:, None] - owner[np.maximum(prev, 0)]) % num_shards
  shifts = tuple(sorted({int(x) for x in shift[has_prev] if x != 0}))
  sends = tuple(np.unique(src[has_prev & (shift == s)]) for s in shifts)
  index = np.where(has_prev & (shift == 0), src, -1)
  offset = n_local
  for s, sent in zip(shifts, sends, strict=True):
    index = np.where(has_prev & (shift == s), offset + np.searchsorted(sent, src), index)
    offset += len(sent)
  index = np.where(has_prev, index, offset + np.arange(n_local))
  assert (index >= 0).all()
  return shifts, sends, index.astype(np.int32)


def _ring(p: int, offset: int = 1):
  return [(i, (i + offset) % p) for i in range(p)]


# ---------------------------------------------------------------- block-sparse kinds


def block_sparse_shard(
  q,
  k,
  v,
  *,
  config: SSAConfig,
  axis_name: str,
  num_shards: int,
  layout: str,
  scale: float,
  implementation: str = "xla",
  routing_q=None,
  routing_k=None,
  return_selected: bool = False,
):
  """One shard's SSA / block_topk / sliding; call inside `shard_map` over `axis_name`.

  q [b, T/P, q_heads, d], k and v [b, T/P, kv_heads, d]: this shard's blocks (layout
  order). Returns this shard's output (and its tiles' chosen blocks).
  """
  bs, qt = config.block_size, config.tile
  n_local = q.shape[1] // bs
  num_blocks = n_local * num_shards
  table = sharding.block_owner_table(num_blocks, num_shards, layout)
  me = jax.lax.axis_index(axis_name)
  block_gid = jnp.asarray(table)[me]  # global id of each local block
  tile_j0 = jnp.repeat(block_gid, bs // qt)  # global block of each local tile
  rq = q if routing_q is None else routing_q
  rk = k if routing_k is None else routing_k
  selected = _select_shard(rq, rk, config, tile_j0, implementation, axis_name, num_shards, layout)
  ids = _slot_list(selected, tile_j0, config)
  owner, local = (jnp.asarray(x) for x in _inverse_tables(num_blocks, num_shards, layout))
  safe = jnp.maximum(ids, 0)
  ids_owner = jnp.where(ids >= 0, owner[safe], -1)
  ids_local = local[safe]
  if implementation == "pallas":
    plan = PallasRing(bs, qt, scale, axis_name, num_shards, jax.default_backend() == "cpu")
    out = pallas_ring(plan, q, k, v, ids_owner, ids_local)
  else:
    out = _ring_block_attention(q, k, v, ids_owner, ids_local, config, scale, axis_name, num_shards)
  return (out, selected) if return_selected else out


def _select_shard(rq, rk, config, tile_j0, implementation, axis_name, p, layout):
  """Chosen global block ids [b, kv_heads, local tiles, top_k], ascending, -1 empty."""
  rq, rk = jax.lax.stop_gradient(rq), jax.lax.stop_gradient(rk)
  b, _, hkv, _ = rk.shape
  prefix = jnp.maximum(tile_j0 - config.local_blocks, 0)
  if config.kind == "sliding":
    ids = prefix[:, None] - config.top_k + jnp.arange(config.top_k)
    ids = jnp.where(ids >= config.sink_blocks, ids, -1).astype(jnp.int32)
    chosen = jnp.broadcast_to(ids, (b, hkv, tile_j0.shape[0], config.top_k))
    return ssa_lib._sorted_ids(chosen, config.top_k)
  n_local = rk.shape[1] // config.block_size
  table = sharding.block_owner_table(n_local * p, p, layout)
  local_level1 = ssa_lib._tree(rk, config)[0]  # [b, hkv, n_local, D]
  gathered = jax.lax.all_gather(local_level1, axis_name, axis=2, tiled=True)  # (shard, m) order
  level1 = gathered[:, :, np.argsort(table.reshape(-1))]  # global block order
  window = _routing_window(rq, config, axis_name, p, layout)
  # The window's leading block adds tiles in front, which route nowhere (prefix 0).
  lead = config.block_size // config.tile
  prefix = jnp.concatenate([jnp.zeros(lead, prefix.dtype), prefix])
  if config.kind == "block_topk":
    chosen = ssa_lib._flat_topk(ssa_lib._routing_rows(window, hkv, config), level1, prefix, config)
  elif implementation == "pallas":  # the kernel reads each tile's window from the queries
    score_fn = ssa_lib.pallas_score_fn(config, rq.dtype)
    tables = _tree_from_level1(level1, config)
    chosen = ssa_lib._beam_descent(window, tables, prefix, config, score_fn, whole_top_nodes=128)
  else:
    rows = ssa_lib._routing_rows(window, hkv, config)
    tables = _tree_from_level1(level1, config)
    score_fn = ssa_lib._ops(implementation)[0]
    chosen = ssa_lib._beam_descent(rows, tables, prefix, config, score_fn)
  return ssa_lib._sorted_ids(chosen[:, :, lead:], config.top_k)


def _tree_from_level1(level1, config: SSAConfig) -> list[jax.Array]:
  """Summary tables of levels 1..L built from the global level-1 table.

  Reuses `ssa._tree` by presenting the level-1 rows as keys of tiny blocks: a `mean`
  row as a block of one key; a `bounds` row [max, min] as a block of two keys, max and
  min, whose elementwise max and min are the row again. Upper levels are then exactly
  what one device builds.
  """
  b, hkv, n, dim = level1.shape
  if config.summary == "mean":
    keys, per_block = level1, 1
  else:
    dr = dim // 2
    keys = jnp.stack([level1[..., :dr], level1[..., dr:]], axis=3).reshape(b, hkv, 2 * n, dr)
    per_block = 2
  tiny = dataclasses.replace(config, block_size=per_block, query_tile=None)
  return ssa_lib._tree(keys.transpose(0, 2, 1, 3), tiny)


def _routing_window(rq, config: SSAConfig, axis_name, p, layout):
  """The local routing queries as one device's window rule wants them:
  [b, (T/P) + block_size, q_heads, d], one leading block, then the local blocks.

  Tile i of the result routes with its positions [i Q - Q + 1, i Q] (`ssa._routing_rows`,
  or the Pallas kernel that reads windows from the queries). The first tile of a block
  needs the last Q - 1 routing queries of the block's global predecessor, from whichever
  shard owns it (the halo); no other tile reads a block's last Q - 1 positions. So
  result block m holds local block m - 1's first positions and, in its last Q - 1
  positions, the halo of local block m. Global block 0 has no predecessor: its halo
  repeats its first position, as on one device.
  """
  b, tl, hq, dr = rq.shape
  bs, qt = config.block_size, config.tile
  n_local, h = tl // bs, qt - 1
  shifts, sends, index = _halo_plan(n_local * p, p, layout)
  if not h:  # tiles of one query route with it alone: no halo
    shifts, sends = (), ()
  index = jnp.asarray(index)[jax.lax.axis_index(axis_name)]  # [n_local]
  blocks = rq.reshape(b, n_local, bs, hq, dr)
  own = lambda x: x[:, :, bs - h :]
  halo = jnp.take(own(blocks), jnp.clip(index, 0, n_local - 1), axis=1)
  offset = n_local
  for s, sent in zip(shifts, sends, strict=True):
    # Tails that are most of their block go as whole blocks: no copy is made to send them.
    whole = len(sent) == n_local and 2 * h >= bs
    got = jax.lax.ppermute(blocks if whole else own(blocks[:, sent]), axis_name, _ring(p, s))
    got = own(got) if whole else got
    here = ((index >= offset) & (index < offset + len(sent)))[None, :, None, None, None]
    halo = jnp.where(here, jnp.take(got, jnp.clip(index - offset, 0, len(sent) - 1), 1), halo)
    offset += len(sent)
  first = jnp.broadcast_to(blocks[:, :, :1], halo.shape)
  halo = jnp.where((index >= offset)[None, :, None, None, None], first, halo)
  pad = lambda x, front: jnp.pad(x, ((0, 0), (front, 1 - front), (0, 0), (0, 0), (0, 0)))
  window = jnp.concatenate([pad(blocks[:, :, : bs - h], 1), pad(halo, 0)], axis=2)
  return window.reshape(b, tl + bs, hq, dr)


def _slot_list(selected, tile_j0, config: SSAConfig):
  """Block lists [b, kv, tiles, slots] of tiles whose global blocks are `tile_j0`:
  sinks, chosen, local, own; -1 empty (`ssa._slot_list` with explicit tile blocks)."""
  b, hkv, nt, _ = selected.shape
  prefix = jnp.maximum(tile_j0 - config.local_blocks, 0)
  sinks = jnp.arange(config.sink_blocks)
  sinks = jnp.where(sinks < prefix[:, None], sinks, -1)
  local = tile_j0[:, None] - config.local_blocks + jnp.arange(config.local_blocks)
  local = jnp.where(local >= 0, local, -1)
  after = jnp.concatenate([local, tile_j0[:, None]], axis=-1)
  return jnp.concatenate(
    [
      jnp.broadcast_to(sinks, (b, hkv, nt, config.sink_blocks)),
      selected,
      jnp.broadcast_to(after, (b, hkv, nt, config.local_blocks + 1)),
    ],
    axis=-1,
  ).astype(jnp.int32)


def _ring_block_attention(q, k, v, ids_owner, ids_local, config, scale, axis_name, p):
  """Tiles attend to their listed global blocks (reference kernels) as K/V chunks pass
  round the ring; `ring` differentiates each step."""
  kw = dict(block_size=config.block_size, query_tile=config.tile, scale=scale)

  def compute(step, q, kv, own, aux):
    ids_owner, ids_local = aux
    me = jax.lax.axis_index(axis_name)
    ids_step = jnp.where(ids_owner == (me - step) % p, ids_local, -1)
    return attention_reference.sparse_attention(q, kv[0], kv[1], ids_step, causal=own, **kw)

  return ring(compute, axis_name, p, q, (k, v), (ids_owner, ids_local))


@dataclasses.dataclass(frozen=True)
class PallasRing:
  """The static half of `pallas_ring`."""

  block_size: int
  query_tile: int
  scale: float
  axis_name: str
  num_shards: int
  interpret: bool = False

  def ids(self, step, ids_owner, ids_local, own=False):
    """Compacted lists of step `step`: the listed blocks of chunk (me - step) mod P,
    as local indices of that chunk; the own chunk's (step 0) causally."""
    me = jax.lax.axis_index(self.axis_name)
    ids = jnp.where(ids_owner == (me - step) % self.num_shards, ids_local, -1)
    return attention_index.compact_block_lists(
      ids, block_size=self.block_size, query_tile=self.query_tile, causal=own
    )

  def send(self, x):
    return jax.lax.ppermute(x, self.axis_name, _ring(self.num_shards))

  def kernel_args(self):
    sizes = pallas_gpu.BlockSizes.get_default()
    if getattr(sizes, "fwd_kernel", "triton") != "triton":  # the ring's steps need Triton's
      sizes = dataclasses.replace(sizes, fwd_kernel="triton")
    return self.block_size, self.query_tile, self.scale, sizes, self.interpret


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def pallas_ring(plan: PallasRing, q, k, v, ids_owner, ids_local):
  """Block-sparse ring attention with the Pallas kernels, merging in place.

  q [b, T/P, q_heads, d], k and v [b, T/P, kv_heads, d] of this shard; ids_owner and
  ids_local [b, kv_heads, tiles, slots]: owner shard and local index there of every
  listed block (-1 empty). Step s attends to chunk (me - s) mod P: the own chunk
  causally, then each remote chunk without a mask, the kernel going on from the (out,
  lse) so far (`pallas_gpu._forward(init=...)`): no partial outputs, no f32 merge.
  Returns out in q's dtype.

  Backward (ring-flash style, no forward recomputed): delta = rowsum(d_out * out) once,
  then out is dead; dq adds into itself in place at every step; the dK/dV of a held
  chunk travel on with it (the accumulator of chunk c starts on shard c + 1) and a last
  send returns them to the owner, who adds them to its own. At the last step the held
  K/V go nowhere else, so their buffers take the gradients (`overwrite_kv`): per device,
  besides inputs, gradients and d_out, the backward holds one chunk of K/V.
  """
  return _pallas_ring_fwd(plan, q, k, v, ids_owner, ids_local)[0]


def _pallas_ring_fwd(plan, q, k, v, ids_owner, ids_local):
  p = plan.num_shards
  ids = lambda step: plan.ids(step, ids_owner, ids_local)
  forward = lambda kv, ids, **kw: pallas_gpu._forward(q, *kv, ids, *plan.kernel_args(), **kw)
  held = plan.send((k, v)) if p > 1 else None  # issued first: it overlaps the own step
  out, lse = forward((k, v), plan.ids(0, ids_owner, ids_local, own=True))

  def step(carry, index):
    out, lse, held = carry
    held_next = plan.send(held)
    out, lse = forward(held, ids(index), causal=False, init=(out, lse))
    return (out, lse, held_next), None

  if p > 2:
    (out, lse, held), _ = jax.lax.scan(step, (out, lse, held), jnp.arange(1, p - 1))
  if p > 1:
    out, lse = forward(held, ids(p - 1), causal=False, init=(out, lse))
  return out, (q, k, v, ids_owner, ids_local, out, lse)


def _pallas_ring_bwd(plan, res, d_out):
  q, k, v, ids_owner, ids_local, out, lse = res
  p = plan.num_shards
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  shape5 = (b, t, hkv, hq // hkv, d)
  q5, do5 = q.reshape(shape5), d_out.astype(q.dtype).reshape(shape5)
  delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), -1).reshape(shape5[:4])
  lse4 = lse.transpose(0, 2, 1).reshape(shape5[:4])
  # K/V set off only once delta exists: `out` is dead before the held chunk arrives.
  delta, k, v = jax.lax.optimization_barrier((delta, k, v))
  ids = lambda step: plan.ids(step, ids_owner, ids_local)
  args = lambda kv, ids: (q5, *kv, ids, do5, lse4, delta, *plan.kernel_args())
  held = plan.send((k, v)) if p > 1 else None
  own = args((k, v), plan.ids(0, ids_owner, ids_local, own=True))
  dq, (dk, dv) = pallas_gpu._backward_dq(*own), pallas_gpu._backward_dkv(*own)

  def remote(index, held, dq, acc, last):
    step_args = functools.partial(args, ids=ids(index))
    dq = pallas_gpu._backward_dq(*step_args(held), causal=False, dq_init=dq)
    if last:  # the dq pass has read the held K/V before their buffers take dK/dV
      held, dq = jax.lax.optimization_barrier((held, dq))
    dkv = pallas_gpu._backward_dkv(*step_args(held), causal=False, overwrite_kv=last)
    if acc is not None:
      dkv = jax.tree.map(jnp.add, acc, dkv)
    return dq, plan.send(dkv)  # to the next holder of this chunk, or home after the last

  if p > 1:
    acc = None
    if p > 2:
      held_next = plan.send(held)
      dq, acc = remote(1, held, dq, None, False)
      held = held_next

      def body(carry, index):
        dq, held, acc = carry
        held_next = plan.send(held)
        dq, acc = remote(index, held, dq, acc, False)
        return (dq, held_next, acc), None

      (dq, held, acc), _ = jax.lax.scan(body, (dq, held, acc), jnp.arange(2, p - 1))
    dq, (dk_more, dv_more) = remote(p - 1, held, dq, acc, True)
    dk, dv = dk + dk_more, dv + dv_more
  return dq.reshape(q.shape), dk, dv, None, None


pallas_ring.defvjp(_pallas_ring_fwd, _pallas_ring_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def ring(compute, axis_name: str, p: int, q, kv, aux) -> jax.Array:
  """Ring attention: `compute(step, q, held_kv, own, aux)` -> (out, lse) per step.

  At step s a shard holds the K/V chunk of shard (me - s) mod P; partials merge by lse.
  Each step sends the held chunk on before computing with it, so that XLA can overlap
  the transfer with the step; steps 1 .. P-2 are one `lax.scan` (compile time does not
  grow with P) and the last step sends nothing.

  The backward pass (custom VJP) keeps only q, the local chunk, out and lse: it passes
  K/V round the ring again with dK/dV accumulators beside them (ring-flash-attention
  style), recomputing each step, and a last send returns every dK/dV to its owner. So
  per-device memory stays O(T/P): plain autodiff would keep every held chunk.
  `aux` (int arrays) gets no cotangent. Partials merge in float32; the output (and the
  residual kept for the backward pass) is in q's dtype, as a single-device kernel's.
  (`pallas_ring` and `dense_ring` are the Pallas and dense paths' own rings, which merge
  in place.) Used by the block kinds with the reference kernels.
  """
  return _ring_fwd(compute, axis_name, p, q, kv, aux)[0]


def _ring_fwd(compute, axis_name, p, q, kv, aux):
  send = functools.partial(jax.lax.ppermute, axis_name=axis_name, perm=_ring(p))
  held = send(kv) if p > 1 else None
  out, lse = merge_partials(None, None, *compute(0, q, kv, True, aux))
  if p > 1:

    def step(carry, index):
      out, lse, held = carry
      held_next = send(held)
      out, lse = merge_partials(out, lse, *compute(index, q, held, False, aux))
      return (out, lse, held_next), None

    if p > 2:
      (out, lse, held), _ = jax.lax.scan(step, (out, lse, held), jnp.arange(1, p - 1))
    out, lse = merge_partials(out, lse, *compute(p - 1, q, held, False, aux))
  out = out.astype(q.dtype)
  return out, (q, kv, aux, out, lse)


def _ring_bwd(compute, axis_name, p, res, d_out):
  q, kv, aux, out, lse = res
  send = functools.partial(jax.lax.ppermute, axis_name=axis_name, perm=_ring(p))
  # Row term of the softmax backward through the merge: out = sum_s w_s out_s with
  # w_s = exp(lse_s - lse), so d out_s = w_s d_out and d lse_s = w_s (d_out . (out_s - out)).
  # d_out and out stay in q's dtype; the products are float32 (fused, never stored).
  f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)

  def step_grads(index, held, own):
    (o_s, lse_s), vjp = jax.vjp(lambda q, kv: compute(index, q, kv, own, aux), q, held)
    w = jnp.exp(lse_s - lse)  # [b, h, t]; 0 where the step saw no key
    w_t = w.transpose(0, 2, 1)[..., None]
    delta = jnp.sum(f32(d_out) * (f32(o_s) - f32(out)), -1)
    d_lse = w * delta.transpose(0, 2, 1)
    return vjp(((w_t * f32(d_out)).astype(o_s.dtype), d_lse))

  d_q, d_held = f32(step_grads(0, kv, True))
  if p > 1:

    def step(carry, index):
      d_q, held, d_held = carry
      held, d_held = send((held, d_held))
      d_q_s, d_kv_s = f32(step_grads(index, held, False))
      return (d_q + d_q_s, held, jax.tree.map(jnp.add, d_held, d_kv_s)), None

    (d_q, _, d_held), _ = jax.lax.scan(step, (d_q, kv, d_held), jnp.arange(1, p))
    d_held = send(d_held)  # back to the owners
  d_kv = jax.tree.map(lambda g, x: g.astype(x.dtype), d_held, kv)
  return d_q.astype(q.dtype), d_kv, None


ring.defvjp(_ring_fwd, _ring_bwd)


def merge_partials(out_a, lse_a, out_b, lse_b):
  """Exact merge of two partial attentions over disjoint key sets.

  out [b, t, h, d], lse float32 [b, h, t]; a row that saw no key has lse = -inf and
  contributes nothing. `out_a` None starts the accumulation. Returns (float32 out, lse).
  """
  if out_a is None:
    return out_b.astype(jnp.float32), lse_b
  m = jax.lax.stop_gradient(jnp.maximum(lse_a, lse_b))
  m = jnp.where(m > -jnp.inf, m, 0.0)
  w_a, w_b = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
  total = w_a + w_b
  safe = jnp.where(total > 0, total, 1.0)
  lse = jnp.where(total > 0, m + jnp.log(safe), -jnp.inf)
  w_a, w_b = ((w / safe).transpose(0, 2, 1)[..., None] for w in (w_a, w_b))
  return out_a * w_a + out_b.astype(jnp.float32) * w_b, lse


# -------------------------------------------------------------------- dense ring


def dense_ring_shard(q, k, v, *, axis_name, num_shards, layout, scale, block_size):
  """One shard of ring attention (causal, dense); call inside `shard_map`.

  q [b, T/P, q_heads, d], k and v [b, T/P, kv_heads, d] in layout order; the layout's
  blocks (`block_size`) give every token's global position for the causal mask.
  """
  tiles = dense_tiles(q.shape[1], k.shape[1])
  return dense_ring(DenseRing(axis_name, num_shards, layout, block_size, scale, tiles), q, k, v)


def dense_tiles(t: int, tk: int) -> tuple[int, int]:
  """(queries, keys) of one tile of the dense ring's steps: `DENSE_TILES` or less,
  dividing the local sequence."""

  def divisor(n, at_most):
    c = max(1, min(n, at_most))
    while n % c:
      c -= 1
    return c

  cq, ck = DENSE_TILES.get(jax.default_backend(), DEFAULT_DENSE_TILES)
  return divisor(t, cq), divisor(tk, ck)


@dataclasses.dataclass(frozen=True)
class DenseRing:
  """The static half of `dense_ring`."""

  axis_name: str
  num_shards: int
  layout: str
  block_size: int
  scale: float
  tiles: tuple[int, int]  # (queries, keys) per tile: `dense_tiles`

  def positions(self, step, t):
    """Global positions [t] of the chunk held at `step`: that of shard (me - step) mod P."""
    table = sharding.block_owner_table(
      t // self.block_size * self.num_shards, self.num_shards, self.layout
    )
    shard = (jax.lax.axis_index(self.axis_name) - step) % self.num_shards
    bs = self.block_size
    return (jnp.asarray(table)[shard][:, None] * bs + jnp.arange(bs)).reshape(-1)

  def send(self, x):
    return jax.lax.ppermute(x, self.axis_name, _ring(self.num_shards))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def dense_ring(plan: DenseRing, q, k, v):
  """Causal dense ring attention, flash style: out [b, T/P, q_heads, d] in q's dtype.

  Step s attends to the chunk of shard (me - s) mod P tile by tile (`plan.tiles`), the
  online softmax going on from the (out, lse) so far (`dense_step_forward`): no partial
  outputs, no merge buffers; a tile no query of which sees a key of is skipped. Global
  positions make every step's mask exact, so any layout works.

  Backward (ring-flash style, no forward kept per step): delta = rowsum(d_out * out)
  once, then out is dead; each step recomputes its tiles from the merged lse: dq adds
  into itself in place (`dense_step_dq`), and the dK/dV of a chunk (in the inputs'
  dtype, f32 inside a tile's loop only) travel with it: the owner starts them at its own
  step, each holder adds its step's, and the last send brings them home complete (no
  separate own dK/dV, no final add).
  """
  return _dense_ring_fwd(plan, q, k, v)[0]


def _dense_ring_fwd(plan, q, k, v):
  p, (b, t, hq, _) = plan.num_shards, q.shape
  hkv = k.shape[2]
  tile = functools.partial(
    dense_step_forward, q=q, q_pos=plan.positions(0, t), scale=plan.scale, tiles=plan.tiles
  )
  held = plan.send((k, v)) if p > 1 else None  # issued first: it overlaps the own step
  lse = jnp.full((b, hkv, hq // hkv, t), -jnp.inf, jnp.float32)
  out, lse = tile(k=k, v=v, k_pos=plan.positions(0, t), out=jnp.zeros_like(q), lse=lse)

  def step(carry, index):
    out, lse, held = carry
    held_next = plan.send(held)
    out, lse = tile(k=held[0], v=held[1], k_pos=plan.positions(index, t), out=out, lse=lse)
    return (out, lse, held_next), None

  if p > 2:
    (out, lse, held), _ = jax.lax.scan(step, (out, lse, held), jnp.arange(1, p - 1))
  if p > 1:
    out, lse = tile(k=held[0], v=held[1], k_pos=plan.positions(p - 1, t), out=out, lse=lse)
  return out, (q, k, v, out, lse)


def _dense_ring_bwd(plan, res, d_out):
  q, k, v, out, lse = res
  p, (b, t, hq, _) = plan.num_shards, q.shape
  hkv = k.shape[2]
  d_out = d_out.astype(q.dtype)
  delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), -1)  # [b, t, hq]
  delta = delta.reshape(b, t, hkv, hq // hkv).transpose(0, 2, 3, 1)
  # K/V set off only once delta exists: `out` is dead before the held chunk arrives.
  delta, k, v = jax.lax.optimization_barrier((delta, k, v))
  common = dict(
    q=q,
    d_out=d_out,
    lse=lse,
    delta=delta,
    q_pos=plan.positions(0, t),
    scale=plan.scale,
    tiles=plan.tiles,
  )
  held = plan.send((k, v)) if p > 1 else None  # issued first: it overlaps the own step

  def step(dq, kv, dkv, index, held_next=None):
    """Adds step `index`'s gradients into dq and into the dK/dV that travel with the
    held chunk, then sends those on to the chunk's next holder (home after the last)."""
    k_pos = plan.positions(index, t)
    dq = dense_step_dq(k=kv[0], v=kv[1], k_pos=k_pos, dq=dq, **common)
    dkv = dense_step_dkv(k=kv[0], v=kv[1], k_pos=k_pos, dk=dkv[0], dv=dkv[1], **common)
    return dq, held_next, plan.send(dkv) if p > 1 else dkv

  carry = step(jnp.zeros_like(q), (k, v), (jnp.zeros_like(k), jnp.zeros_like(v)), 0, held)
  if p > 2:
    body = lambda c, i: (step(c[0], c[1], c[2], i, plan.send(c[1])), None)
    carry, _ = jax.lax.scan(body, carry, jnp.arange(1, p - 1))
  if p > 1:
    carry = step(*carry, p - 1)
  dq, _, (dk, dv) = carry
  return dq, dk, dv


dense_ring.defvjp(_dense_ring_fwd, _dense_ring_bwd)


def _split(q, kv_heads):
  b, t, hq, d = q.shape
  return q.reshape(b, t, kv_heads, hq // kv_heads, d)


def _slice(x, start, size, axis):
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _precision(dtype):
  return HIGHEST if dtype == jnp.float32 else None


def _tile_logits(q_c, k_b, q_pos_c, k_pos_b, scale):
  """Scaled logits [b, kv, g, queries, keys] (f32) of a tile, -inf where masked."""
  s = jnp.einsum(
    "bckgd,bskd->bkgcs",
    q_c,
    k_b,
    precision=_precision(q_c.dtype),
    preferred_element_type=jnp.float32,
  )
  visible = k_pos_b[None, :] <= q_pos_c[:, None]
  return jnp.where(visible, s * scale, -jnp.inf)


def _visible(q_pos_c, k_pos_b):
  """Whether any query of the tile sees any of its keys."""
  return jnp.min(k_pos_b) <= jnp.max(q_pos_c)


def _dot(spec, a, b):
  return jnp.einsum(spec, a, b, precision=_precision(b.dtype), preferred_element_type=jnp.float32)


def dense_step_forward(q, k, v, q_pos, k_pos, out, lse, *, scale, tiles):
  """Attention of q to k, v where k_pos <= q_pos, going on from (out, lse).

  q, out [b, t, q_heads, d]; k, v [b, tk, kv_heads, d]; lse f32 [b, kv_heads, g, t]
  (g = q_heads / kv_heads), -inf (and out 0) where no key was seen yet. Returns the
  (out, lse) of all keys seen so far, out in its dtype, updated tile row by tile row.
  """
  hkv = k.shape[2]
  q5, out5 = _split(q, hkv), _split(out, hkv)
  cq, ck = tiles

  def row(i, carry):
    out5, lse = carry
    q_c, q_pos_c = _slice(q5, i * cq, cq, 1), _slice(q_pos, i * cq, cq, 0)
    lse_c = _slice(lse, i * cq, cq, 3)
    seen = lse_c > -jnp.inf
    o_c = _slice(out5, i * cq, cq, 1).astype(jnp.float32).transpose(0, 2, 3, 1, 4)
    state = (jnp.where(seen[..., None], o_c, 0.0), lse_c, seen.astype(jnp.float32))

    def column(j, state):
      k_b, v_b, k_pos_b = (
        _slice(k, j * ck, ck, 1),
        _slice(v, j * ck, ck, 1),
        _slice(k_pos, j * ck, ck, 0),
      )

      def visit(state):
        acc, m, norm = state
        s = _tile_logits(q_c, k_b, q_pos_c, k_pos_b, scale)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)
        e = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        acc = alpha[..., None] * acc + _dot("bkgcs,bskd->bkgcd", e.astype(v.dtype), v_b)
        return acc, m_new, alpha * norm + e.sum(-1)

      return jax.lax.cond(_visible(q_pos_c, k_pos_b), visit, lambda s: s, state)

    acc, m, norm = jax.lax.fori_loop(0, k.shape[1] // ck, column, state)
    safe = jnp.where(norm > 0, norm, 1.0)
    o_c = (acc / safe[..., None]).transpose(0, 3, 1, 2, 4).astype(out.dtype)
    lse_c = jnp.where(norm > 0, m + jnp.log(safe), -jnp.inf)
    out5 = jax.lax.dynamic_update_slice_in_dim(out5, o_c, i * cq, 1)
    return out5, jax.lax.dynamic_update_slice_in_dim(lse, lse_c, i * cq, 3)

  out5, lse = jax.lax.fori_loop(0, q.shape[1] // cq, row, (out5, lse))
  return out5.reshape(out.shape), lse


def _tile_grads(q_c, do_c, k_b, v_b, q_pos_c, k_pos_b, lse_c, delta_c, scale):
  """Probabilities and logit gradients [b, kv, g, queries, keys] (f32) of a tile."""
  s = _tile_logits(q_c, k_b, q_pos_c, k_pos_b, scale)
  probs = jnp.exp(s - jnp.where(lse_c > -jnp.inf, lse_c, jnp.inf)[..., None])
  dp = _dot("bckgd,bskd->bkgcs", do_c, v_b)
  return probs, probs * (dp - delta_c[..., None])


def dense_step_dq(q, k, v, q_pos, k_pos, d_out, lse, delta, dq, *, scale, tiles):
  """dq + the gradient of q through attention to (k, v), given the final lse and
  delta = rowsum(d_out * out) ([b, kv_heads, g, t] f32); dq in its dtype, in place."""
  hkv = k.shape[2]
  q5, do5, dq5 = _split(q, hkv), _split(d_out, hkv), _split(dq, hkv)
  cq, ck = tiles

  def row(i, dq5):
    q_c, do_c = _slice(q5, i * cq, cq, 1), _slice(do5, i * cq, cq, 1)
    q_pos_c, lse_c, delta_c = (
      _slice(q_pos, i * cq, cq, 0),
      _slice(lse, i * cq, cq, 3),
      _slice(delta, i * cq, cq, 3),
    )

    def column(j, acc):
      k_b, v_b, k_pos_b = (
        _slice(k, j * ck, ck, 1),
        _slice(v, j * ck, ck, 1),
        _slice(k_pos, j * ck, ck, 0),
      )

      def visit(acc):
        _, ds = _tile_grads(q_c, do_c, k_b, v_b, q_pos_c, k_pos_b, lse_c, delta_c, scale)
        return acc + scale * _dot("bkgcs,bskd->bckgd", ds.astype(k.dtype), k_b)

      return jax.lax.cond(_visible(q_pos_c, k_pos_b), visit, lambda a: a, acc)

    acc = _slice(dq5, i * cq, cq, 1).astype(jnp.float32)
    acc = jax.lax.fori_loop(0, k.shape[1] // ck, column, acc)
    return jax.lax.dynamic_update_slice_in_dim(dq5, acc.astype(dq.dtype), i * cq, 1)

  return jax.lax.fori_loop(0, q.shape[1] // cq, row, dq5).reshape(dq.shape)


def dense_step_dkv(q, k, v, q_pos, k_pos, d_out, lse, delta, dk, dv, *, scale, tiles):
  """(dk, dv) + the gradients of (k, v) through q's attention to them (see
  `dense_step_dq`); in their dtype, in place, f32 within a key tile's loop."""
  hkv = k.shape[2]
  q5, do5 = _split(q, hkv), _split(d_out, hkv)
  cq, ck = tiles

  def column(j, grads):
    dk, dv = grads
    k_b, v_b, k_pos_b = (
      _slice(k, j * ck, ck, 1),
      _slice(v, j * ck, ck, 1),
      _slice(k_pos, j * ck, ck, 0),
    )

    def row(i, acc):
      q_c, do_c = _slice(q5, i * cq, cq, 1), _slice(do5, i * cq, cq, 1)
      q_pos_c, lse_c, delta_c = (
        _slice(q_pos, i * cq, cq, 0),
        _slice(lse, i * cq, cq, 3),
        _slice(delta, i * cq, cq, 3),
      )

      def visit(acc):
        probs, ds = _tile_grads(q_c, do_c, k_b, v_b, q_pos_c, k_pos_b, lse_c, delta_c, scale)
        d_k = scale * _dot("bkgcs,bckgd->bskd", ds.astype(q.dtype), q_c)
        return acc[0] + d_k, acc[1] + _dot("bkgcs,bckgd->bskd", probs.astype(q.dtype), do_c)

      return jax.lax.cond(_visible(q_pos_c, k_pos_b), visit, lambda a: a, acc)

    acc = tuple(_slice(x, j * ck, ck, 1).astype(jnp.float32) for x in (dk, dv))
    acc = jax.lax.fori_loop(0, q.shape[1] // cq, row, acc)
    return tuple(
      jax.lax.dynamic_update_slice_in_dim(x, a.astype(x.dtype), j * ck, 1)
      for x, a in zip(grads, acc, strict=True)
    )

  return jax.lax.fori_loop(0, k.shape[1] // ck, column, (dk, dv))

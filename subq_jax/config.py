"""`SSAConfig`: one frozen config for every attention mechanism the project compares.

`kind` picks the mechanism; the other fields are the knobs, shared where they mean
the same thing, so that an ablation changes `kind` and nothing else:

- `ssa`: routing tree + beam descent picks `top_k` blocks per query tile (DESIGN.md §1).
- `block_topk`: NSA/MoBA-style flat top-k: every earlier block is scored by its mean
  key (a quadratic selector), the best `top_k` are attended.
- `sliding`: the `top_k + local_blocks` blocks right before the query's own block.
- `indexer`: DeepSeek-DSA-style lightning indexer: small ReLU-scored indexer heads score
  every earlier token; the best `keys_per_query` tokens are attended.
- `dense`: causal attention to every earlier key (cuDNN on GPU, XLA elsewhere).

Every sparse kind attends to the same number of keys per query,
`(sink_blocks + top_k + local_blocks + 1) * block_size` (`SSAConfig.keys_per_query`):
the block kinds attend to the sink blocks, `top_k` chosen blocks, the `local_blocks`
blocks before the query's own block, and its own block causally.
"""

from __future__ import annotations

import dataclasses

KINDS = ("ssa", "block_topk", "sliding", "indexer", "dense")
BLOCK_KINDS = ("ssa", "block_topk", "sliding")  # kinds that attend whole KV blocks
ROUTED_KINDS = ("ssa", "block_topk")  # kinds that choose blocks by their key summaries
SUMMARIES = ("mean", "bounds")
COARSE_NODES = ("blocks", "frontier")  # what the coarse branch attends to


@dataclasses.dataclass(frozen=True)
class SSAConfig:
  """Mechanism and knobs of one attention layer.

  Attributes:
    kind: one of `KINDS`.
    block_size: keys per KV block (B); a power of two.
    query_tile: queries that share one selection (Q); divides `block_size`, so a tile
      lies inside one block. None means `block_size`.
    top_k: blocks chosen per query tile (`ssa`, `block_topk`), or the size of the
      window in blocks beyond `local_blocks` (`sliding`).
    fanout: children per routing-tree node (F).
    beam: nodes kept per tree level during the descent. A level keeps at least
      ceil(top_k / F**(level-1)) nodes, so that the level below can still fill `top_k`.
    sink_blocks: leading blocks every query attends to.
    local_blocks: blocks right before the query's own block, always attended (W).
    summary: `mean` (mean routing key of a node) or `bounds` (elementwise min and max:
      an upper bound of q.k over the node, Quest-style).
    route_with_rope: True routes with the attention's own q and k (RoPE applied);
      False means the caller passes position-free `routing_q` / `routing_k`.
    indexer_heads, indexer_dim: shape of the `indexer` kind's scoring heads (the
      weights come from the caller; the model owns them).
    coarse_grad: `ssa`, `block_topk`: weight of the coarse branch's gradient (0 = off).
      The coarse branch attends from every query to the level-1 summaries of all its
      routable blocks (scored as routing scores them, values the blocks' mean values,
      DESIGN.md section 1.7); it changes no output, only adds its gradient to the
      routing q and k, so that keys routing never selects still learn to be selected.
      Quadratic in T / block_size, and computed only under differentiation.
    coarse_nodes: what the coarse branch attends to. `blocks`: every routable block, as
      above. `frontier` (`ssa` only): the nodes the beam descent scores for the query's
      tile, at every level of the tree (each level's frontier and the children of the
      nodes kept above; summaries as routing scores them, values the mean values under
      each node), so the branch costs O(T log T) like the descent. Keys under a node
      pruned high in the tree then learn only through that node's summary.
    far_distance: block kinds: 0 scores every key at its true RoPE distance. D > 0 scores
      the far blocks (sinks and chosen blocks; `sliding`: its window beyond the local
      blocks) at bounded distances whatever T: key offset o of a far block at distance
      D + B - 1 - o from every query (the caller passes `far_q`, q rotated at position
      D + B - 1, and `far_k`, k rotated at its offset in its block, as
      `Attention.project` does). Near blocks (local and own) keep
      true distances, all < (W + 1) B; so no query meets a distance unseen in training at
      any length (InfLLM's bounded remote positions, with in-block order kept). Routed
      kinds with `route_with_rope` route with `far_q` and `far_k`: the score of a block
      then depends on its content alone, not on how far back it lies.
  """

  kind: str = "ssa"
  block_size: int = 64
  query_tile: int | None = None
  top_k: int = 16
  fanout: int = 16
  beam: int = 4
  sink_blocks: int = 1
  local_blocks: int = 1
  summary: str = "mean"
  route_with_rope: bool = True
  indexer_heads: int = 4
  indexer_dim: int = 32
  coarse_grad: float = 0.0
  coarse_nodes: str = "blocks"
  far_distance: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"kind={self.kind!r} is not one of {KINDS}")
    if self.summary not in SUMMARIES:
      raise ValueError(f"summary={self.summary!r} is not one of {SUMMARIES}")
    for name in ("block_size", "top_k", "beam", "indexer_heads", "indexer_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")
    for name in ("sink_blocks", "local_blocks"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} must be an integer >= 0")
    if not isinstance(self.fanout, int) or self.fanout < 2:
      raise ValueError(f"fanout={self.fanout!r} must be an integer >= 2")
    w = self.coarse_grad
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf"):
      raise ValueError(f"coarse_grad={w!r} must be a finite number >= 0")
    if w and self.kind not in ROUTED_KINDS:
      raise ValueError(
        f"coarse_grad={w} trains routing by key summaries; kind={self.kind!r} does not route "
        f"by them (only {ROUTED_KINDS})"
      )
    if self.coarse_nodes not in COARSE_NODES:
      raise ValueError(f"coarse_nodes={self.coarse_nodes!r} is not one of {COARSE_NODES}")
    if self.coarse_nodes == "frontier" and self.kind != "ssa":
      raise ValueError(
        f"coarse_nodes='frontier' follows the routing tree's descent; kind={self.kind!r} has "
        "no tree (use coarse_nodes='blocks')"
      )
    far = self.far_distance
    if isinstance(far, bool) or not isinstance(far, int) or far < 0:
      raise ValueError(f"far_distance={far!r} must be an integer >= 0")
    if far and self.kind not in BLOCK_KINDS:
      raise ValueError(
        f"far_distance={far} places far blocks; kind={self.kind!r} attends no blocks "
        f"(only {BLOCK_KINDS})"
      )
    if self.block_size & (self.block_size - 1):
      raise ValueError(f"block_size={self.block_size} must be a power of two")
    tile = self.tile
    if not isinstance(tile, int) or tile < 1 or self.block_size % tile:
      raise ValueError(
        f"query_tile={self.query_tile!r} must divide block_size={self.block_size} "
        "(a query tile lies inside one KV block)"
      )

  @property
  def tile(self) -> int:
    """Queries per tile (Q): `query_tile`, or `block_size` when that is None."""
    return self.block_size if self.query_tile is None else self.query_tile

  @property
  def slots(self) -> int:
    """Blocks listed per query tile by the block kinds: sinks, chosen, local, own."""
    return self.sink_blocks + self.top_k + self.local_blocks + 1

  @property
  def keys_per_query(self) -> int:
    """Most keys any query attends to under every sparse kind (`dense` is unbounded)."""
    return self.slots * self.block_size

  def num_levels(self, num_blocks: int) -> int:
    """Routing-tree levels L: the least L >= 1 with fanout**L >= num_blocks."""
    levels = 1
    while self.fanout**levels < num_blocks:
      levels += 1
    return levels

  def beam_at(self, level: int) -> int:
    """Nodes kept at `level` (>= 2) during the descent."""
    cover = self.fanout ** (level - 1)
    return max(self.beam, -(-self.top_k // cover))

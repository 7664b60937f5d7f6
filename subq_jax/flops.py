"""Cost accounting for every attention mechanism: attended pairs, attention and selector FLOPs.

Pure Python on ints, so a 16M-token count is exact and instant; no jax needed.

Conventions:
- `pairs` counts attended (query, key) pairs of one sequence and one query head.
- Attention FLOPs are the QK^T and PV matmuls, 4 * head_dim per pair per query head
  (softmax, masking and rescaling are not counted, as in FlashAttention's accounting).
  Forward by default; `*_train` adds a backward of 2.5x the forward (FlashAttention-2's
  convention: 5 matmuls backward against 2 forward), 3.5x the forward in all.
- Selector FLOPs are forward only: the selection is under stop_gradient and has no
  backward. Top-k and comparisons are not counted. Projections that produce the queries,
  keys or indexer inputs belong to the model and are not counted either.

The block kinds (`ssa`, `block_topk`, `sliding`) attend, per query at position p in block
j0 = p // B: sink blocks s < min(sink_blocks, j0 - W), up to `top_k` chosen blocks among
[sink_blocks, j0 - W) (all of them if fewer), the local blocks [max(0, j0 - W), j0), and
its own block causally. `indexer` attends to min(p + 1, keys_per_query) tokens, `dense`
to p + 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from subq_jax.config import KINDS, SSAConfig

BACKWARD_FACTOR = 2.5  # backward FLOPs of attention per forward FLOP
BENCHMARK_KEYS_PER_QUERY = 8192  # DESIGN.md §6: SubQ's published budget


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """Head configuration of one attention layer; the default is Llama-3-8B's."""

  q_heads: int = 32
  kv_heads: int = 8
  head_dim: int = 128
  batch: int = 1

  def __post_init__(self):
    for name in ("q_heads", "kv_heads", "head_dim", "batch"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if self.q_heads % self.kv_heads:
      raise ValueError(f"q_heads={self.q_heads} must be a multiple of kv_heads={self.kv_heads}")

  @property
  def group(self) -> int:
    """Query heads per KV head (G)."""
    return self.q_heads // self.kv_heads


@dataclasses.dataclass(frozen=True)
class Cost:
  """Cost of one attention layer over `seq_len` tokens (see the module docstring)."""

  kind: str
  seq_len: int
  pairs: int  # per sequence and query head
  max_keys_per_query: int
  attention_flops: int  # forward, whole layer (all heads, whole batch)
  selector_flops: int  # forward only; there is no backward

  @property
  def mean_keys_per_query(self) -> float:
    return self.pairs / self.seq_len

  @property
  def attention_flops_train(self) -> int:
    """Forward + backward attention FLOPs (backward = 2.5x forward)."""
    # Exact in ints: attention_flops is a multiple of 4.
    return self.attention_flops * int(2 * (1 + BACKWARD_FACTOR)) // 2

  @property
  def total_flops(self) -> int:
    """Forward: attention + selector."""
    return self.attention_flops + self.selector_flops

  @property
  def total_flops_train(self) -> int:
    """Forward + backward: the selector runs forward only."""
    return self.attention_flops_train + self.selector_flops

  @property
  def selector_share(self) -> float:
    """Selector's fraction of the forward FLOPs."""
    return self.selector_flops / self.total_flops


def benchmark_config(kind: str = "ssa") -> SSAConfig:
  """DESIGN.md §6 budget: 8,192 keys per query (1 sink + 125 chosen + 1 local + own, x 64)."""
  config = SSAConfig(kind=kind, block_size=64, sink_blocks=1, local_blocks=1, top_k=125)
  assert config.keys_per_query == BENCHMARK_KEYS_PER_QUERY
  return config


def benchmark_configs() -> dict[str, SSAConfig]:
  """The benchmark budget for every kind, in `KINDS` order."""
  return {kind: benchmark_config(kind) for kind in KINDS}


def _ramp_sum(n: int, offset: int, cap: int | None = None) -> int:
  """sum over j in [0, n) of min(cap, max(0, j - offset)); cap None means no cap."""
  top = n - 1 - offset  # the largest j - offset
  if top <= 0:
    return 0
  if cap is None or top <= cap:
    return top * (top + 1) // 2
  return cap * (cap + 1) // 2 + cap * (top - cap)


def _full_blocks(j0: int, config: SSAConfig) -> int:
  """Whole blocks before its own that a query of block j0 attends to (block kinds)."""
  s, w = config.sink_blocks, config.local_blocks
  sinks = min(s, max(0, j0 - w))
  chosen = min(config.top_k, max(0, j0 - w - s))
  return sinks + chosen + min(w, j0)


def _full_blocks_sum(n: int, config: SSAConfig) -> int:
  """sum over j0 in [0, n) of `_full_blocks(j0, config)`, in closed form."""
  s, w = config.sink_blocks, config.local_blocks
  return _ramp_sum(n, w, s) + _ramp_sum(n, w + s, config.top_k) + _ramp_sum(n, 0, w)


def _check_seq_len(seq_len: int):
  if not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"seq_len={seq_len!r} must be an integer >= 1")


def num_blocks(seq_len: int, config: SSAConfig) -> int:
  return -(-seq_len // config.block_size)


def pairs(seq_len: int, config: SSAConfig) -> int:
  """Attended (query, key) pairs of one sequence and one query head."""
  _check_seq_len(seq_len)
  t = seq_len
  if config.kind == "dense":
    return t * (t + 1) // 2
  if config.kind == "indexer":
    return _ramp_sum(t + 1, 0, config.keys_per_query)  # sum of min(p + 1, keys_per_query)
  b = config.block_size
  n = num_blocks(t, config)
  last = t - (n - 1) * b  # queries (and keys) in the last, maybe partial, block
  whole = b * b * _full_blocks_sum(n - 1, config) + last * b * _full_blocks(n - 1, config)
  own = (n - 1) * b * (b + 1) // 2 + last * (last + 1) // 2
  return whole + own


def max_keys_per_query(seq_len: int, config: SSAConfig) -> int:
  """Most keys any query of a `seq_len`-token sequence attends to."""
  _check_seq_len(seq_len)
  if config.kind == "dense":
    return seq_len
  if config.kind == "indexer":
    return min(seq_len, config.keys_per_query)
  b = config.block_size
  n = num_blocks(seq_len, config)
  last = seq_len - (n - 1) * b
  # `_full_blocks` never decreases with the block, so the max is in one of the last two.
  best = b * _full_blocks(n - 1, config) + last
  if n >= 2:
    best = max(best, b * _full_blocks(n - 2, config) + b)
  return best


def ssa_candidates_per_level(num_blocks_: int, config: SSAConfig) -> list[int]:
  """Upper bound of the nodes one tile scores at levels 1..L (index 0 is level 1).

  The causal frontier has at most F-1 complete nodes per level; below the top level the
  `beam_at(l + 1)` nodes kept at level l + 1 (at most as many as were scored there) add F
  children each. A fixed-shape implementation scores exactly this many slots per tile,
  padded ones included; tiles with a short prefix have fewer real candidates.
  """
  f = config.fanout
  levels = config.num_levels(num_blocks_)
  scored = [f - 1]  # the top level
  for level in range(levels - 1, 0, -1):
    kept = min(config.beam_at(level + 1), scored[-1])
    scored.append(f - 1 + f * kept)
  return scored[::-1]


def _summary_build_flops(seq_len: int, config: SSAConfig, levels: int) -> int:
  """FLOPs per KV head (and sequence) to build the routing summaries up to `levels`.

  Level 1 sums every key element once (the division by the count is negligible); each
  higher level sums its children. `bounds` keeps a min and a max: twice the work.
  """
  n = num_blocks(seq_len, config)
  elements = seq_len
  for level in range(2, levels + 1):
    elements += -(-n // config.fanout ** (level - 2))  # level-(level-1) nodes
  return elements * (2 if config.summary == "bounds" else 1)


def selector_flops(seq_len: int, heads: HeadConfig, config: SSAConfig) -> int:
  """Forward FLOPs of the selection, whole layer (all heads, whole batch).

  - `ssa`: each tile of Q queries scores `ssa_candidates_per_level` nodes (an upper
    bound) with its Q x G query rows: 2 Q G d per node per KV head, twice that for
    `bounds`; plus building the tree (O(T d) per KV head). O(T log T) overall.
  - `block_topk`: each tile scores every earlier candidate block [sink, j0 - W) by its
    mean key, 2 Q G d per block per KV head, plus the block means. O(T^2 / B).
  - `indexer`: every query scores every key p' <= p with `indexer_heads` ReLU heads of
    `indexer_dim`: 2 H_I d_I FLOPs of dots plus 2 H_I for the head-weighted sum per pair,
    independent of the attention heads. O(T^2).
  - `sliding`, `dense`: no selector.
  """
  _check_seq_len(seq_len)
  t, d = seq_len, heads.head_dim
  if config.kind in ("sliding", "dense"):
    return 0
  if config.kind == "indexer":
    per_pair = 2 * config.indexer_heads * config.indexer_dim + 2 * config.indexer_heads
    return heads.batch * per_pair * (t * (t + 1) // 2)
  q, b = config.tile, config.block_size
  n = num_blocks(t, config)
  row_flops = 2 * q * heads.group * d  # one node scored by one tile, one KV head
  if config.kind == "ssa":
    per_node = row_flops * (2 if config.summary == "bounds" else 1)
    tiles = -(-t // q)  # tiles holding at least one query
    levels = config.num_levels(n)
    scoring = tiles * sum(ssa_candidates_per_level(n, config)) * per_node
    build = _summary_build_flops(t, config, levels) * d
    return heads.batch * heads.kv_heads * (scoring + build)
  assert config.kind == "block_topk", config.kind
  # Candidates of block j0: max(0, j0 - W - sink); B / Q tiles per whole block.
  offset = config.local_blocks + config.sink_blocks
  last_tiles = -(-(t - (n - 1) * b) // q)
  tile_blocks = (b // q) * _ramp_sum(n - 1, offset) + last_tiles * max(0, n - 1 - offset)
  build = t * d  # block means
  return heads.batch * heads.kv_heads * (tile_blocks * row_flops + build)


def cost(seq_len: int, heads: HeadConfig, config: SSAConfig) -> Cost:
  """Pairs, attention FLOPs and selector FLOPs of one layer over `seq_len` tokens."""
  n_pairs = pairs(seq_len, config)
  return Cost(
    kind=config.kind,
    seq_len=seq_len,
    pairs=n_pairs,
    max_keys_per_query=max_keys_per_query(seq_len, config),
    attention_flops=4 * heads.head_dim * n_pairs * heads.q_heads * heads.batch,
    selector_flops=selector_flops(seq_len, heads, config),
  )


def crossover_seq_len(
  heads: HeadConfig, config: SSAConfig, train: bool = False, max_seq_len: int = 2**40
) -> int | None:
  """Least T at which the selector's FLOPs exceed the attention's it feeds (forward, or
  forward + backward attention if `train`); None if not up to `max_seq_len`.

  The search starts at T = keys_per_query, where sparse attention starts to attend fewer
  keys than dense; below it there is no sparse attention to overtake, and a fixed-shape
  selector's padding can outweigh a handful of pairs. It doubles T until the selector
  wins, then bisects; this assumes, as holds for every kind here, that once the selector
  wins it keeps winning. Returns keys_per_query itself if the selector wins there already.
  """

  def selector_wins(t: int) -> bool:
    c = cost(t, heads, config)
    return c.selector_flops > (c.attention_flops_train if train else c.attention_flops)

  lo = hi = config.keys_per_query
  while not selector_wins(hi):
    if hi >= max_seq_len:
      return None
    lo, hi = hi, hi * 2
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if selector_wins(mid) else (mid, hi)
  return hi


def cost_table(
  seq_lens: Sequence[int], heads: HeadConfig, configs: dict[str, SSAConfig]
) -> list[dict]:
  """One row (a JSON-ready dict) per (seq_len, kind); `configs` must include `dense`."""
  rows = []
  for t in seq_lens:
    dense = cost(t, heads, configs["dense"])
    for kind, config in configs.items():
      c = cost(t, heads, config)
      rows.append(
        {
          "seq_len": t,
          "kind": kind,
          "pairs": c.pairs,
          "mean_keys_per_query": c.mean_keys_per_query,
          "max_keys_per_query": c.max_keys_per_query,
          "attention_flops": c.attention_flops,
          "attention_flops_train": c.attention_flops_train,
          "selector_flops": c.selector_flops,
          "total_flops": c.total_flops,
          "total_flops_train": c.total_flops_train,
          "attention_reduction": dense.attention_flops / c.attention_flops,
          "total_reduction": dense.total_flops / c.total_flops,
          "selector_share": c.selector_share,
        }
      )
  return rows


def parse_tokens(s: str | int) -> int:
  """'8K' -> 8192, '1M' -> 1048576, '5000' -> 5000."""
  s = str(s).strip().upper()
  for unit, size in (("M", 2**20), ("K", 2**10)):
    if s.endswith(unit):
      return int(float(s[:-1]) * size)
  return int(s)


def format_tokens(t: int) -> str:
  """4096 -> '4K', 1048576 -> '1M'."""
  for unit, size in (("M", 2**20), ("K", 2**10)):
    if t >= size and t % size == 0:
      return f"{t // size}{unit}"
  return str(t)


def format_table(rows: list[dict]) -> str:
  """Fixed-width text of `cost_table` rows (FLOPs are forward, whole layer)."""
  header = (
    f"{'T':>5} {'kind':<10} {'keys/query':>10} {'pairs/head':>10} {'attn FLOPs':>10} "
    f"{'sel FLOPs':>10} {'total':>10} {'attn red.':>9} {'total red.':>10} {'sel share':>9}"
  )
  lines = [header, "-" * len(header)]
  previous = None
  for r in rows:
    if previous is not None and r["seq_len"] != previous:
      lines.append("")
    previous = r["seq_len"]
    lines.append(
      f"{format_tokens(r['seq_len']):>5} {r['kind']:<10} {r['mean_keys_per_query']:>10.0f} "
      f"{r['pairs']:>10.3e} {r['attention_flops']:>10.3e} {r['selector_flops']:>10.3e} "
      f"{r['total_flops']:>10.3e} {r['attention_reduction']:>8.1f}x "
      f"{r['total_reduction']:>9.1f}x {r['selector_share']:>9.1%}"
    )
  return "\n".join(lines)

"""Cost accounting (`subq_jax.flops`) against brute-force per-token counts."""

import dataclasses
import itertools

import pytest

from subq_jax import flops
from subq_jax.config import SSAConfig

HEADS = flops.HeadConfig()  # Llama-3-8B: 32 query heads, 8 KV heads, head_dim 128


def _attended_keys(p: int, config: SSAConfig) -> set[int]:
  """Key positions query p attends to, straight from the rule in the module docstring."""
  if config.kind == "dense":
    return set(range(p + 1))
  if config.kind == "indexer":
    return set(range(max(0, p + 1 - config.keys_per_query), p + 1))  # any that many
  b, s, w = config.block_size, config.sink_blocks, config.local_blocks
  j0 = p // b
  blocks = set(range(min(s, j0 - w)))
  candidates = list(range(s, j0 - w))
  if config.kind == "sliding":
    blocks |= set(candidates[-config.top_k :])
  else:  # which blocks win does not change the count
    blocks |= set(candidates[: config.top_k])
  blocks |= set(range(max(0, j0 - w), j0))
  keys = {blk * b + i for blk in blocks for i in range(b)}
  return keys | set(range(j0 * b, p + 1))


def _brute_force_pairs(seq_len: int, config: SSAConfig) -> tuple[int, int]:
  counts = [len(_attended_keys(p, config)) for p in range(seq_len)]
  return sum(counts), max(counts)


CONFIGS = [
  SSAConfig(block_size=8, top_k=2, sink_blocks=1, local_blocks=1),
  SSAConfig(block_size=8, query_tile=2, top_k=3, sink_blocks=2, local_blocks=0),
  SSAConfig(block_size=4, top_k=50, sink_blocks=1, local_blocks=2),  # top_k > candidates
  SSAConfig(block_size=16, query_tile=4, top_k=1, sink_blocks=0, local_blocks=3),
  SSAConfig(block_size=2, top_k=5, sink_blocks=3, local_blocks=1),
]


@pytest.mark.parametrize(
  "config,kind", list(itertools.product(CONFIGS, ("ssa", "block_topk", "sliding", "indexer")))
)
@pytest.mark.parametrize("seq_len", [1, 7, 8, 9, 31, 64, 100, 203])
def test_pairs_match_brute_force(config, kind, seq_len):
  config = dataclasses.replace(config, kind=kind)
  want_pairs, want_max = _brute_force_pairs(seq_len, config)
  assert flops.pairs(seq_len, config) == want_pairs
  assert flops.max_keys_per_query(seq_len, config) == want_max
  assert want_max <= config.keys_per_query


@pytest.mark.parametrize("seq_len", [1, 2, 63, 64, 65, 1000, 2**24])
def test_dense_pairs_are_causal_triangle(seq_len):
  config = SSAConfig(kind="dense")
  assert flops.pairs(seq_len, config) == seq_len * (seq_len + 1) // 2
  assert flops.max_keys_per_query(seq_len, config) == seq_len


@pytest.mark.parametrize("kind", ["ssa", "block_topk", "sliding", "indexer"])
def test_keys_per_query_bounded_and_saturated(kind):
  config = flops.benchmark_config(kind)
  assert config.keys_per_query == 8192
  for log2 in range(10, 25):
    t = 2**log2
    assert flops.max_keys_per_query(t, config) <= config.keys_per_query
    assert flops.max_keys_per_query(t, config) == min(t, config.keys_per_query)
  # Per query the count saturates: a long sequence averages close to the budget (block
  # kinds attend half their own block on average, so they average B / 2 below it).
  mean = flops.cost(2**24, HEADS, config).mean_keys_per_query
  assert config.keys_per_query - config.block_size / 2 - 40 < mean <= config.keys_per_query


@pytest.mark.parametrize("seq_len,published", [(2**15, 2), (2**17, 8), (2**19, 32), (2**20, 64)])
def test_subq_reductions(seq_len, published):
  """DESIGN.md §6: SubQ's attention-FLOP reductions at 8,192 keys per query."""
  dense = flops.cost(seq_len, HEADS, flops.benchmark_config("dense"))
  for kind in ("ssa", "block_topk", "sliding", "indexer"):
    sparse = flops.cost(seq_len, HEADS, flops.benchmark_config(kind))
    assert dense.attention_flops / sparse.attention_flops == pytest.approx(published, rel=0.15)


def test_hand_computed_values():
  """Numbers worked out by hand, so a broken formula cannot agree with itself."""
  config = flops.benchmark_config("ssa")
  # 16M tokens: 262,144 blocks, 5 levels; levels 2-4 keep beam 4, level 2 keeps
  # ceil(125 / 16) = 8: 143 + 79 + 79 + 79 + 15 candidates.
  assert flops.ssa_candidates_per_level(2**18, config) == [143, 79, 79, 79, 15]
  # 262,144 tiles of 64 queries x 4 heads; the tree sums 2^24 keys, then every node of
  # levels 1-4 into its parent.
  tree = 2**24 + 2**18 + 2**14 + 2**10 + 2**6
  want = 8 * (2**18 * 395 * (2 * 64 * 4 * 128) + tree * 128)
  assert flops.selector_flops(2**24, HEADS, config) == want
  assert flops.ssa_candidates_per_level(256, config) == [143, 15]
  assert flops.ssa_candidates_per_level(16, config) == [15]
  # 1M tokens dense: 4 * 128 * 32 * T (T + 1) / 2 = 9.0e15 FLOPs (18.3 s at 492 TFLOP/s).
  t = 2**20
  assert flops.cost(t, HEADS, flops.benchmark_config("dense")).attention_flops == (
    4 * 128 * 32 * t * (t + 1) // 2
  )
  # block kinds at 1M: the first 128 blocks attend all earlier keys, then 127 whole blocks
  # plus their own block causally.
  want = 128 * 64 * (128 * 64 + 1) // 2 + (2**14 - 128) * (127 * 64 * 64 + 64 * 65 // 2)
  assert flops.pairs(t, config) == want
  # indexer selector at T = 10: 55 pairs x (2 * 4 * 32 + 2 * 4).
  heads = dataclasses.replace(HEADS, batch=3)
  assert flops.selector_flops(10, heads, flops.benchmark_config("indexer")) == 3 * 55 * 264
  # ssa at T = 37 with 8-token blocks and 2-query tiles: 5 blocks, 2 levels of fanout 4;
  # level 2 keeps max(beam 2, ceil(3 / 4)) = 2 nodes: 3 + 4 * 2 = 11 and 3 candidates.
  # 19 tiles x 14 nodes x (2 Q G d = 2 * 2 * 3 * 16), plus (37 keys + 5 blocks) x d to
  # build the tree; per KV head and sequence, x 2 x 2 of them; `bounds` doubles it all.
  small = flops.HeadConfig(q_heads=6, kv_heads=2, head_dim=16, batch=2)
  tiny = SSAConfig(block_size=8, query_tile=2, fanout=4, beam=2, top_k=3)
  assert flops.ssa_candidates_per_level(5, tiny) == [11, 3]
  want = 2 * 2 * (19 * 14 * (2 * 2 * 3 * 16) + (37 + 5) * 16)
  assert flops.selector_flops(37, small, tiny) == want
  assert flops.selector_flops(37, small, dataclasses.replace(tiny, summary="bounds")) == 2 * want
  # Train = forward + 2.5x forward backward.
  c = flops.cost(t, HEADS, config)
  assert c.attention_flops_train == 3.5 * c.attention_flops
  assert c.total_flops_train == c.attention_flops_train + c.selector_flops


def test_block_topk_selector_matches_brute_force():
  heads = flops.HeadConfig(q_heads=6, kv_heads=2, head_dim=16, batch=2)
  for config in CONFIGS:
    config = dataclasses.replace(config, kind="block_topk")
    b, q = config.block_size, config.tile
    for t in (1, 9, 64, 203):
      tile_blocks = sum(
        max(0, (start // b) - config.local_blocks - config.sink_blocks) for start in range(0, t, q)
      )
      want = heads.batch * heads.kv_heads * (tile_blocks * 2 * q * 3 * 16 + t * 16)
      assert flops.selector_flops(t, heads, config) == want


def _exact_ssa_candidates(prefix_blocks: int, config: SSAConfig, levels: int) -> list[int]:
  """Nodes scored per level by a descent over the complete nodes of a real prefix."""
  f = config.fanout
  scored = []
  kept_above = 0
  for level in range(levels, 0, -1):
    frontier = (prefix_blocks // f ** (level - 1)) % f  # complete nodes not under a parent
    n = frontier + f * kept_above
    scored.append(n)
    kept_above = min(config.beam_at(level), n) if level > 1 else 0
  return scored[::-1]


@pytest.mark.parametrize("fanout,beam,top_k", [(16, 4, 125), (4, 2, 3), (2, 1, 5), (8, 3, 40)])
def test_ssa_candidates_bound_the_real_descent(fanout, beam, top_k):
  config = SSAConfig(fanout=fanout, beam=beam, top_k=top_k)
  for num_blocks in (1, 2, 5, 17, 300, fanout**3):
    bound = flops.ssa_candidates_per_level(num_blocks, config)
    levels = config.num_levels(num_blocks)
    assert len(bound) == levels
    worst = [0] * levels
    for prefix in range(num_blocks):
      exact = _exact_ssa_candidates(prefix, config, levels)
      worst = [max(a, e) for a, e in zip(worst, exact, strict=True)]
    assert all(w <= u for w, u in zip(worst, bound, strict=True))
    if num_blocks == fanout**levels:  # prefix F^L - 1 fills every level: bound reached
      assert worst == bound


def test_selector_growth():
  """Doubling T: quadratic selectors grow ~4x, ssa's ~2x (O(T log T))."""
  configs = flops.benchmark_configs()
  for t in (2**22, 2**23):
    ratio = {
      kind: flops.selector_flops(2 * t, HEADS, configs[kind])
      / flops.selector_flops(t, HEADS, configs[kind])
      for kind in ("ssa", "block_topk", "indexer")
    }
    assert 3.9 < ratio["block_topk"] < 4.1
    assert 3.9 < ratio["indexer"] < 4.1
    assert 1.9 < ratio["ssa"] < 2.6  # 2x within a tree level, up to ~2.5x adding one
  for kind in ("sliding", "dense"):
    assert flops.selector_flops(2**20, HEADS, configs[kind]) == 0


def test_selector_independent_of_attention_heads_for_indexer():
  config = flops.benchmark_config("indexer")
  small = flops.HeadConfig(q_heads=4, kv_heads=1, head_dim=64)
  assert flops.selector_flops(4096, small, config) == flops.selector_flops(4096, HEADS, config)


def test_bounds_summary_doubles_ssa_scoring():
  mean = flops.benchmark_config("ssa")
  bounds = dataclasses.replace(mean, summary="bounds")
  t = 2**20
  assert 1.95 < flops.selector_flops(t, HEADS, bounds) / flops.selector_flops(t, HEADS, mean) <= 2


def test_crossovers():
  configs = flops.benchmark_configs()
  for kind in ("block_topk", "indexer"):
    t = flops.crossover_seq_len(HEADS, configs[kind])
    assert 2**19 < t < 2**22
    before, after = (flops.cost(x, HEADS, configs[kind]) for x in (t - 1, t))
    assert before.selector_flops <= before.attention_flops
    assert after.selector_flops > after.attention_flops
    assert flops.crossover_seq_len(HEADS, configs[kind], train=True) > t
  for kind in ("ssa", "sliding"):
    assert flops.crossover_seq_len(HEADS, configs[kind]) is None


def test_bad_input():
  with pytest.raises(ValueError, match="kv_heads=3"):
    flops.HeadConfig(q_heads=32, kv_heads=3)
  with pytest.raises(ValueError, match="seq_len=0"):
    flops.pairs(0, SSAConfig())

"""Communication and memory accounting of sequence-parallel attention, per device, per layer.

Pure Python on ints, like `subq_jax.flops`, whose `HeadConfig` and benchmark configs it
takes. It counts what `subq_jax.seq_parallel` does with the sequence split over P `seq`
shards (T/P tokens each):

- Ring (SSA's block kinds and dense ring attention alike): the K/V chunk of a shard,
  2 b (T/P) H_kv d bytes-per-element, travels P - 1 steps forward. The backward pass
  (custom VJP) sends K/V round again (P - 1 steps) with dK/dV beside it (P steps: the
  last returns them to their owners).
- SSA extra, forward only (selection is under stop_gradient): the all-gather of level-1
  summaries (T/B rows per KV head, f32, d or 2d wide for `bounds`; a device sends its
  T/(P B) rows to each of the P - 1 others), and the routing halo: the last Q routing
  queries of a block go to the shard holding the next block when that is another shard:
  every block for striped (as much as the local q: the price of striped balance), one
  or two chunk ends for contiguous and zigzag.
- Held: the local q, k, v, the chunk in flight (two buffers: held and arriving), the
  global summary tree, the halo and the block lists. Per-device K/V is O(T/P), the
  summaries O(T/B); nothing is O(T) in K/V.

An all-to-all of requested blocks instead of the ring would move only the remote blocks
that some local tile selected. `requested_fraction` estimates that share for uniform
choices: with (T/(P Q)) tiles per shard each choosing `top_k` of the T/B blocks, the
union covers all but exp(-top_k B / (P Q)) of them, which at the benchmark budget
(top_k = 125, B = Q = 64) is everything for any P <= 125: the all-to-all saves nothing
in training, and the ring (which overlaps with compute) is the better choice.
"""

from __future__ import annotations

import dataclasses
import math

from subq_jax import flops
from subq_jax.config import BLOCK_KINDS, SSAConfig

F32 = 4


@dataclasses.dataclass(frozen=True)
class CommCost:
  """Bytes per device for one layer (see the module docstring)."""

  kind: str
  seq_len: int
  shards: int
  kv_chunk: int  # one shard's K and V
  sent_forward: int
  sent_backward: int
  held: int  # activations of the layer held at once (forward)
  summaries_held: int  # SSA: the global routing tree
  attention_flops_per_device: int  # forward, from `flops.cost` / P (balanced layout)

  @property
  def sent_train(self) -> int:
    return self.sent_forward + self.sent_backward

  @property
  def flops_per_byte(self) -> float | None:
    """Forward attention FLOPs per byte sent (None if nothing is sent): above the
    device's FLOP/s over link bytes/s, the ring's transfers hide behind compute."""
    return self.attention_flops_per_device / self.sent_forward if self.sent_forward else None


def summary_rows(seq_len: int, config: SSAConfig) -> int:
  """Rows of every routing-tree level together (per KV head)."""
  n = -(-seq_len // config.block_size)
  rows, level_rows = 0, n
  for _ in range(config.num_levels(n)):
    rows += level_rows
    level_rows = -(-level_rows // config.fanout)
  return rows


def halo_blocks_sent(layout: str, shards: int, local_blocks: int) -> int:
  """Blocks whose routing tails a device sends per layer (`seq_parallel._halo_plan`):
  every block's for striped (each predecessor lives one shard back), one chunk end for
  contiguous, two for zigzag."""
  if shards == 1:
    return 0
  return {"striped": local_blocks, "contiguous": 1, "zigzag": 2}[layout]


def requested_fraction(seq_len: int, shards: int, config: SSAConfig) -> float:
  """Expected share of remote blocks some local tile selects, for uniform choices."""
  n = seq_len // config.block_size
  tiles = seq_len // (shards * config.tile)
  if config.kind == "dense":
    return 1.0
  return 1.0 - math.exp(-tiles * min(config.top_k, n) / max(1, n))


def comm_cost(
  seq_len: int,
  shards: int,
  heads: flops.HeadConfig,
  config: SSAConfig,
  *,
  dtype_bytes: int = 2,
  layout: str = "striped",
) -> CommCost:
  """Per-device bytes of one layer with the sequence over `shards` devices."""
  if seq_len % (shards * config.block_size):
    raise ValueError(f"{seq_len=} must be a multiple of shards x block_size")
  b, d, e = heads.batch, heads.head_dim, dtype_bytes
  t_local = seq_len // shards
  q_local = b * t_local * heads.q_heads * d * e
  kv_chunk = 2 * b * t_local * heads.kv_heads * d * e
  p = shards
  sent_fwd = (p - 1) * kv_chunk
  sent_bwd = (p - 1) * kv_chunk + (p if p > 1 else 0) * kv_chunk
  held = q_local + kv_chunk * (3 if p > 1 else 1)  # local + held + arriving
  summaries = 0
  if config.kind in BLOCK_KINDS:
    width = d * (2 if config.summary == "bounds" else 1)
    if config.kind in ("ssa", "block_topk"):
      level1_local = b * heads.kv_heads * (seq_len // config.block_size // p) * width * F32
      sent_fwd += (p - 1) * level1_local
      summaries = b * heads.kv_heads * summary_rows(seq_len, config) * width * F32
      n_local = t_local // config.block_size
      tail = b * config.tile * heads.q_heads * d * e  # one block's last Q routing queries
      sent_halo = halo_blocks_sent(layout, p, n_local)
      sent_fwd += sent_halo * tail
      held += summaries + (2 * n_local + sent_halo) * tail  # own tails, received, halo
    tiles = t_local // config.tile
    held += b * heads.kv_heads * tiles * config.slots * 4  # int32 block lists
  attention = flops.cost(seq_len, heads, config).attention_flops // p
  return CommCost(
    kind=config.kind,
    seq_len=seq_len,
    shards=p,
    kv_chunk=kv_chunk,
    sent_forward=sent_fwd,
    sent_backward=sent_bwd,
    held=held,
    summaries_held=summaries,
    attention_flops_per_device=attention,
  )


def comm_table(
  seq_lens, shard_counts, heads: flops.HeadConfig, configs: dict[str, SSAConfig], **kw
) -> list[dict]:
  """One JSON-ready row per (T, P, kind)."""
  rows = []
  for t in seq_lens:
    for p in shard_counts:
      for config in configs.values():
        c = comm_cost(t, p, heads, config, **kw)
        row = dataclasses.asdict(c)
        row.update(
          sent_train=c.sent_train,
          flops_per_byte=c.flops_per_byte,
          requested_fraction=requested_fraction(t, p, config),
        )
        rows.append(row)
  return rows


def _bytes(n: float) -> str:
  for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n:.0f} B"


def format_table(rows: list[dict]) -> str:
  header = (
    f"{'T':>5} {'P':>3} {'kind':<6} {'K/V chunk':>10} {'sent fwd':>10} {'sent fwd+bwd':>12} "
    f"{'held':>10} {'summaries':>10} {'attn FLOPs/dev':>14} {'FLOP/byte':>9} {'a2a share':>9}"
  )
  lines = [header, "-" * len(header)]
  previous = None
  for r in rows:
    if previous is not None and r["seq_len"] != previous:
      lines.append("")
    previous = r["seq_len"]
    fpb = "-" if r["flops_per_byte"] is None else f"{r['flops_per_byte']:.0f}"
    lines.append(
      f"{flops.format_tokens(r['seq_len']):>5} {r['shards']:>3} {r['kind']:<6} "
      f"{_bytes(r['kv_chunk']):>10} {_bytes(r['sent_forward']):>10} "
      f"{_bytes(r['sent_train']):>12} {_bytes(r['held']):>10} "
      f"{_bytes(r['summaries_held']):>10} {r['attention_flops_per_device']:>14.3e} "
      f"{fpb:>9} {r['requested_fraction']:>9.1%}"
    )
  return "\n".join(lines)

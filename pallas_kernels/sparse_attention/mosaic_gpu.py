"""Block-sparse attention forward as a Pallas Mosaic GPU kernel (Hopper: TMA, wgmma).

Same semantics as the Triton forward in `pallas_gpu.py` and `reference.sparse_attention`:
every query tile attends, with one online softmax, to the KV blocks of its compacted
list (valid blocks ascending, the tile's own block last and the only one masked
causally, then -1s), and the G query heads of a KV head share that list.

One program per (query tile, group of `compute_wgs` heads of a KV head, KV head,
batch), with `compute_wgs` consumer warpgroups and one producer warpgroup:
- the producer reads the tile's block list (scalar loads from global memory) and
  copies each listed K and V block into a ring of `stages` shared-memory slots by TMA,
  refilling a slot once every consumer has released it;
- each consumer owns one head's 64 queries of the tile (a 64-row wgmma): S = Q K^T,
  online softmax in registers, acc += P V with P from registers; with two consumers a
  schedule barrier alternates them, so that one's softmax overlaps the other's matmuls.
The heads of a KV head that share a program share its K/V copies; the programs of one
tile run close together, so the other groups' copies mostly hit L2.

Limits (`unsupported` says which applies): 16-bit inputs, query_tile == 64 (one wgmma
row block per head), block_size and head_dim multiples of 64.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2E = math.log2(math.e)
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
ROWS = 64  # queries per consumer warpgroup: one wgmma row block of one head
REGISTERS = 65536  # per multiprocessor
MAX_GRID_Z = 65535  # programs along CUDA's z, where Mosaic puts the first grid axis


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Warpgroup and pipeline shape of the Mosaic GPU forward.

  Attributes:
    compute_wgs: consumer warpgroups (heads) per program; a KV head's G heads take
      G / compute_wgs programs per tile (fewer consumers when G is smaller).
    stages: K/V blocks in flight (shared-memory ring slots).
    schedule_barrier: with two consumers, alternate their matmuls and softmax.
  """

  compute_wgs: int = 2
  stages: int = 2
  schedule_barrier: bool = True

  @classmethod
  def get_default(cls) -> BlockSizes:
    return cls()

  @classmethod
  def from_spec(cls, spec: str) -> BlockSizes:
    """`w<compute_wgs>/s<stages>[/nosched]`, as the tuning script takes it."""
    parts = spec.split("/")
    get = lambda p, default: next((int(x[1:]) for x in parts if x[:1] == p), default)
    return cls(get("w", 2), get("s", 2), "nosched" not in parts)


def unsupported(q, k, block_size: int, query_tile: int) -> str:
  """Why the kernel cannot run these operands ("" when it can)."""
  d = q.shape[-1]
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
    return f"dtype {q.dtype} (16-bit only)"
  if query_tile != ROWS:
    return f"{query_tile=} (must be {ROWS})"
  if block_size % 64 or d % 64:
    return f"{block_size=} and head_dim={d} must be multiples of 64"
  return ""


def _registers(compute_wgs: int) -> tuple[int, int]:
  """setmaxnreg counts (consumer, producer) that fit the registers the program holds.

  A program holds what it was launched with (registers per thread, a multiple of 8,
  times its threads), and a warpgroup's increase waits until others have released
  enough: asking for more than the launch allocation hangs. (120 per consumer with
  four consumers did, on an H100: 640 threads launch with at most 96 each.)
  """
  threads = 128 * (compute_wgs + 1)
  pool = min(REGISTERS // threads // 8 * 8, 248) * threads
  producer = 40 if compute_wgs <= 2 else 24
  consumer = (pool - 128 * producer) // (128 * compute_wgs) // 8 * 8
  return min(consumer, 232), producer


def _matmul(a, b, shape, acc=None, *, interpret):
  """acc + a @ b on the tensor cores (b in shared memory), f32.

  Compiled, a may live in registers and acc is accumulated in place. The interpreter
  has neither (no `run_state`, wgmma operands only from shared memory): there a is
  a shared-memory ref and the product of a fresh accumulator is added.
  """
  if acc is not None and not interpret:
    return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, a, b))(plgpu.ACC.init(acc))

  def product(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]

  out = pl.run_scoped(product, plgpu.ACC(shape, jnp.float32))
  return out if acc is None else acc + out


def _forward_kernel(
  counts_ref,
  ids_ref,
  q_ref,
  k_ref,
  v_ref,
  out_ref,
  lse_ref,
  smem,
  loaded,
  released,
  schedule,
  *,
  block_size,
  g,
  wgs,
  groups,
  stages,
  scale,
  use_schedule,
  interpret,
):
  q_smem, k_smem, v_smem, lse_smem, p_smem = smem
  q_loaded, k_loaded, v_loaded = loaded
  k_released, v_released = released
  tile_group = lax.axis_index("tile_group")
  hi = lax.axis_index("kv_head")
  bi = lax.axis_index("batch")
  wg = lax.axis_index("wg")
  tile = lax.div(tile_group, groups)
  group = lax.rem(tile_group, groups)
  q_first = tile * ROWS
  num_valid = counts_ref[bi, hi, tile]
  d = q_ref.shape[-1]
  c = scale * LOG2E

  def sync():
    plgpu.barrier_arrive(schedule)
    plgpu.barrier_wait(schedule)

  @pl.when(wg < wgs)
  def _consumer():
    plgpu.set_max_registers(_registers(wgs)[0], action="increase")
    head = hi * g + group * wgs + wg
    q_w = q_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q_first, ROWS), head], q_w, q_loaded.at[wg])
    plgpu.barrier_wait(q_loaded.at[wg])

    # m and l (see the FlashAttention paper): running max of the raw logits and sum of
    # the row's exponentials; acc: the unnormalised output. The scale (and log2 e)
    # enters each exponent through one fused multiply-add, s * c - m * c.
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    m = plgpu.layout_cast(jnp.full((ROWS,), MASK_VALUE, jnp.float32), row_layout)
    l_sum = plgpu.layout_cast(jnp.full((ROWS,), 0.0, jnp.float32), row_layout)
    acc = plgpu.layout_cast(jnp.full((ROWS, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)
    if use_schedule:
      pl.when(wg == 1)(sync)  # consumer 1 starts half a step behind consumer 0

    def step(i, carry, masked):
      acc, m, l_sum = carry
      slot = lax.rem(i, stages)
      plgpu.barrier_wait(k_loaded.at[slot])
      s = _matmul(q_w, k_smem.at[slot].transpose((1, 0)), (ROWS, block_size), interpret=interpret)
      if use_schedule:
        sync()
      plgpu.barrier_arrive(k_released.at[slot])
      if masked:  # the tile's own block: key position <= query position
        k_first = ids_ref[bi, hi, tile, i] * block_size
        shape = (ROWS, block_size)
        q_pos = q_first + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
        k_pos = k_first + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
        s = jnp.where(k_pos <= q_pos, s, MASK_VALUE)
      m_new = jnp.maximum(m, s.max(axis=1))
      m_scaled = m_new * c
      alpha = jnp.exp2(m * c - m_scaled)
      p = jnp.exp2(s * c - lax.broadcast_in_dim(m_scaled, s.shape, [0]))
      l_sum = l_sum * alpha + p.sum(axis=1)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      p16 = p.astype(v_smem.dtype)
      if use_schedule:
        plgpu.barrier_arrive(schedule)  # softmax done: the other consumer may multiply
      plgpu.barrier_wait(v_loaded.at[slot])
      if use_schedule:
        plgpu.barrier_wait(schedule)
      if interpret:
        p_smem.at[wg][...] = p16
        p16 = p_smem.at[wg]
      acc = _matmul(p16, v_smem.at[slot], (ROWS, d), acc, interpret=interpret)
      plgpu.barrier_arrive(v_released.at[slot])
      return acc, m_new, l_sum

    # Blocks before the tile's own block are fully visible; the own block comes last.
    last = jnp.maximum(num_valid - 1, 0)
    carry = (acc, m, l_sum)
    carry = lax.fori_loop(0, last, functools.partial(step, masked=False), carry)
    acc, m, l_sum = lax.fori_loop(last, num_valid, functools.partial(step, masked=True), carry)
    if use_schedule:
      pl.when(wg == 0)(sync)  # balances consumer 1's first arrival

    # A tile with no valid block (a partial list) sees no key: out = 0, lse = -inf
    # (l = 0 only then: the row's maximum contributes exp(0) = 1 to l).
    empty = l_sum == 0.0
    l_safe = jnp.where(empty, 1.0, l_sum)
    q_w[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(q_w.dtype)
    lse_smem.at[wg][...] = jnp.where(empty, -jnp.inf, m * scale + jnp.log(l_safe))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_w, out_ref.at[bi, pl.ds(q_first, ROWS), head])
    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bi, head, pl.ds(q_first, ROWS)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == wgs)
  def _producer():
    plgpu.set_max_registers(_registers(wgs)[1], action="decrease")

    def load(i, slot, wait):
      rows = pl.ds(ids_ref[bi, hi, tile, i] * block_size, block_size)
      if wait:  # the slot's previous block: every consumer is done with it
        plgpu.barrier_wait(k_released.at[slot])
      plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hi], k_smem.at[slot], k_loaded.at[slot])
      if wait:
        plgpu.barrier_wait(v_released.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hi], v_smem.at[slot], v_loaded.at[slot])

    for i in range(stages):
      pl.when(i < num_valid)(functools.partial(load, i, i, False))

    @pl.loop(stages, jnp.maximum(num_valid, stages))
    def _(i):
      load(i, lax.rem(i, stages), True)


def forward(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  ids: jax.Array,
  block_size: int,
  query_tile: int,
  scale: float,
  block_sizes: BlockSizes | None = None,
  interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Forward of `pallas_gpu`'s sparse attention on compacted lists (as its `_forward`).

  q [batch, T, q_heads, head_dim], k and v [batch, T, kv_heads, head_dim], ids int32
  [batch, kv_heads, T // query_tile, slots] compacted (`index.compact_block_lists` or
  `index.pack_runs`). Returns out [batch, T, q_heads, head_dim] in q's dtype and the
  log-sum-exp, float32 [batch, q_heads, T] (-inf and out = 0 where no key is seen).
  `interpret=True` runs the Mosaic GPU interpreter (CPU tests).
  """
  if problem := unsupported(q, k, block_size, query_tile):
    raise ValueError(f"the Mosaic GPU forward cannot run this: {problem}")
  cfg = block_sizes or BlockSizes.get_default()
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  wgs = math.gcd(cfg.compute_wgs, g)
  groups = g // wgs
  num_tiles = t // query_tile
  counts = jnp.sum(ids >= 0, axis=-1, dtype=jnp.int32)
  # 16-bit rows of 128 bytes are one swizzle span; the tiling matches it.
  transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  smem = (
    plgpu.SMEM((wgs, ROWS, d), q.dtype, transforms=transforms),
    plgpu.SMEM((cfg.stages, block_size, d), k.dtype, transforms=transforms),
    plgpu.SMEM((cfg.stages, block_size, d), v.dtype, transforms=transforms),
    plgpu.SMEM((wgs, ROWS), jnp.float32),
    plgpu.SMEM((wgs, ROWS, block_size), v.dtype, transforms=transforms) if interpret else None,
  )
  loaded = (
    plgpu.Barrier(num_barriers=wgs),
    plgpu.Barrier(num_barriers=cfg.stages),
    plgpu.Barrier(num_barriers=cfg.stages),
  )
  released = (plgpu.Barrier(num_arrivals=wgs, num_barriers=cfg.stages),) * 2
  kernel = functools.partial(
    _forward_kernel,
    block_size=block_size,
    g=g,
    wgs=wgs,
    groups=groups,
    stages=cfg.stages,
    scale=scale,
    use_schedule=cfg.schedule_barrier and wgs == 2,
    interpret=bool(interpret),
  )

  # Mosaic launches the last grid axis as CUDA's x (fastest, up to 2^31 - 1 programs),
  # the first as z (at most 65,535). Up to 65,535 tile groups (1M tokens with G = 4):
  # tile groups outermost, so the programs running together are the KV heads and head
  # groups of a few neighbouring tiles (the order measured at 128K); beyond, tile groups
  # innermost (not measured).
  n = num_tiles * groups
  grid, names = (n, hkv, b), ("tile_group", "kv_head", "batch")
  if n > MAX_GRID_Z:
    grid, names = grid[::-1], names[::-1]

  def body(*refs):
    pl.run_scoped(
      lambda *scratch: kernel(*refs, *scratch),
      smem,
      loaded,
      released,
      plgpu.Barrier(num_arrivals=wgs),
      collective_axes="wg",
    )

  out, lse = plgpu.kernel(
    body,
    out_type=(
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((b, hq, t), jnp.float32),
    ),
    grid=grid,
    grid_names=names,
    num_threads=wgs + 1,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(approx_math=True),
    interpret=plgpu.InterpretGPUParams() if interpret is True else (interpret or None),
  )(counts, ids, q, k, v)
  return out, lse

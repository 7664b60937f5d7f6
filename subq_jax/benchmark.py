"""Timing of one attention layer for `experiments/bench_attention.py` (and notebooks).

Everything here takes plain arguments and returns JSON-ready dicts: `run_jax_rows`
times the JAX rows, `add_flops` attaches each row's FLOPs and TFLOP/s from
`subq_jax.flops`, `format_table` and `plot` render the result.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.sparse_attention import index as attention_index
from pallas_kernels.sparse_attention import pallas_gpu as attention_pallas
from pallas_kernels.sparse_attention import reference as attention_reference
from subq_jax import flops, ssa
from subq_jax.config import SSAConfig
from subq_jax.flops import format_tokens

HEADS = flops.HeadConfig()  # Llama-3-8B: 32 query heads, 8 KV heads, head_dim 128
DTYPE = jnp.bfloat16


# ------------------------------------------------------------------------------ timing


def time_fn(fn: Callable, args: tuple, *, repeats: int, warmup: int, long_s: float) -> dict:
  """Compile, warm up, time: median seconds of device-synchronised runs, and memory.

  A first run longer than 5 * long_s is taken as the only sample (a dense row at 1M
  takes tens of seconds); a first run longer than long_s is followed by one sample.
  """
  start = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  peak = None
  try:
    mem = compiled.memory_analysis()
    peak = (
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      + mem.temp_size_in_bytes
      - mem.alias_size_in_bytes
    ) / 2**30
  except Exception:  # noqa: BLE001 (not every backend reports it)
    pass

  def once():
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - start

  first = once()
  times = []
  if first > 5 * long_s:
    times = [first]
  elif first > long_s:
    times = [once()]
  else:
    for _ in range(max(0, warmup - 1)):
      once()
    times = [once() for _ in range(repeats)]
  return dict(
    time_s=float(np.median(times)),
    samples=len(times),
    spread=float(max(times) / min(times) - 1) if times else None,
    compile_s=compile_s,
    peak_gib=peak,
  )


def matmul_rate(n: int = 8192, repeats: int = 10) -> float:
  """Measured dense bf16 matmul rate (TFLOP/s) of an n x n x n product, random data."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (n, n), DTYPE)
  b = jax.random.normal(key_b, (n, n), DTYPE)
  timing = time_fn(lambda a, b: a @ b, (a, b), repeats=repeats, warmup=3, long_s=10.0)
  return 2 * n**3 / timing["time_s"] / 1e12


# ------------------------------------------------------------------------------ inputs


def make_qkv(t: int, seed: int = 0):
  kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
  b, hq, hkv, d = HEADS.batch, HEADS.q_heads, HEADS.kv_heads, HEADS.head_dim
  q = jax.random.normal(kq, (b, t, hq, d), DTYPE)
  k = jax.random.normal(kk, (b, t, hkv, d), DTYPE)
  v = jax.random.normal(kv, (b, t, hkv, d), DTYPE)
  do = jax.random.normal(kd, (b, t, hq, d), DTYPE)
  return q, k, v, do


def synthetic_selection(t: int, config: SSAConfig, seed: int = 0) -> jax.Array:
  """`top_k` distinct blocks per tile, one uniformly random block in each of `top_k`
  equal strata of the routable range [sink, j0 - W) (all of it when shorter)."""
  num_tiles = t // config.tile
  b, hkv, k = HEADS.batch, HEADS.kv_heads, config.top_k
  j0 = jnp.arange(num_tiles) * config.tile // config.block_size
  lo = config.sink_blocks
  n = jnp.maximum(j0 - config.local_blocks - lo, 0)[:, None]  # routable blocks
  i = jnp.arange(k)[None, :]
  width_lo = lo + (i * n) // k
  width_hi = lo + ((i + 1) * n) // k
  u = jax.random.uniform(jax.random.key(seed), (b, hkv, num_tiles, k))
  strat = width_lo + jnp.floor(u * (width_hi - width_lo)).astype(jnp.int32)
  few = jnp.where(i < n, lo + i, -1)
  chosen = jnp.where(n > k, strat, few)
  return jnp.broadcast_to(chosen, (b, hkv, num_tiles, k)).astype(jnp.int32)


# -------------------------------------------------------------------------------- rows


def _rel_err(x, ref) -> float:
  return float(_rel_err_jit(x, ref))


@jax.jit
def _rel_err_jit(x, ref):  # jitted: the f32 casts fuse into the reductions (no f32 copies)
  x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
  return jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref)


def _vjp_fn(fn):
  def fwdbwd(q, k, v, do, *rest):
    out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, *rest), q, k, v)
    return pull(do)

  return fwdbwd


def check_ssa(t: int) -> dict:
  """Pallas against xla/reference on the benchmark config at T=t (bf16, real routing)."""
  config = flops.benchmark_config("ssa")
  q, k, v, do = make_qkv(t, seed=1)
  scale = HEADS.head_dim**-0.5
  sel_p = jax.jit(lambda q, k: ssa.select_blocks(q, k, config, implementation="pallas"))(q, k)
  sel_x = jax.jit(lambda q, k: ssa.select_blocks(q, k, config, implementation="xla"))(q, k)
  same = float(jnp.mean(jnp.sort(sel_p, -1) == jnp.sort(sel_x, -1)))
  ids = ssa._slot_list(sel_x, config)
  kw = dict(block_size=config.block_size, query_tile=config.tile, scale=scale)
  pal = lambda q, k, v: attention_pallas.sparse_attention_pallas(q, k, v, ids, **kw)
  f32 = lambda x: x.astype(jnp.float32)
  ref = lambda q, k, v: attention_reference.sparse_attention(f32(q), f32(k), f32(v), ids, **kw)
  (o_p, l_p), g_p = jax.jit(
    lambda *a: (pal(*a[:3]), jax.vjp(lambda *x: pal(*x)[0], *a[:3])[1](a[3]))
  )(q, k, v, do)
  (o_r, l_r), g_r = jax.jit(
    lambda *a: (ref(*a[:3]), jax.vjp(lambda *x: ref(*x)[0], *a[:3])[1](f32(a[3])))
  )(q, k, v, do)
  result = dict(
    seq_len=t,
    selection_agreement=same,
    out_rel_err=_rel_err(o_p, o_r),
    lse_max_abs_err=float(jnp.max(jnp.abs(l_p - l_r))),
    all_finite=bool(all(jnp.all(jnp.isfinite(x)) for x in (o_p, l_p, *g_p))),
  )
  for name, a, b in zip(("dq", "dk", "dv"), g_p, g_r, strict=True):
    result[f"{name}_rel_err"] = _rel_err(a, b)
  return result


def run_jax_rows(
  *,
  seq_lens,
  rows,
  modes,
  repeats,
  warmup,
  long_s,
  max_dense,
  max_dense_fwdbwd,
  max_quadratic,
  variants=(),
  check=True,
  check_len=None,
  log=print,
  on_row: Callable[[dict], None] | None = None,
) -> dict:
  """Times every requested JAX row at every T; returns {"rows": [...], ...}."""
  results = dict(rows=[])
  results["matmul_tflops"] = matmul_rate()
  log(f"dense bf16 matmul: {results['matmul_tflops']:.0f} TFLOP/s")
  if check:
    try:
      results["check"] = check_ssa(check_len or min(seq_lens))
    except Exception as e:  # noqa: BLE001
      results["check"] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    log(f"check: {results['check']}")
  scale = HEADS.head_dim**-0.5
  cfg = {kind: flops.benchmark_config(kind) for kind in ("ssa", "block_topk", "indexer")}
  ssa_cfg = cfg["ssa"]
  variant_sizes = {"default": attention_pallas.BlockSizes.get_default()}
  for spec in variants:
    name, value = spec.split("=")
    variant_sizes[name] = attention_pallas.BlockSizes.from_spec(value)

  for t in seq_lens:
    q, k, v, do = make_qkv(t)
    lists = {}
    if "ssa_attention" in rows:
      selected = jax.jit(lambda q, k: ssa.select_blocks(q, k, ssa_cfg, implementation="pallas"))(
        q, k
      )
      # As ssa_attention passes them: packed without a sort (compacted=True below).
      lists["ssa_attention"] = attention_index.pack_runs(ssa._slot_runs(selected, ssa_cfg))
    if "ssa_synthetic" in rows or variants:
      lists["ssa_synthetic"] = ssa._slot_list(synthetic_selection(t, ssa_cfg), ssa_cfg)
    for mode in modes:
      todo = _row_functions(
        t, mode, rows, (q, k, v, do), lists, variant_sizes, cfg, scale, max_dense,
        max_dense_fwdbwd, max_quadratic,
      )  # fmt: skip
      for name, fn, args in todo:
        row = dict(row=name, seq_len=t, mode=mode)
        try:
          row.update(time_fn(fn, args, repeats=repeats, warmup=warmup, long_s=long_s))
        except Exception as e:  # noqa: BLE001 (recorded: out of memory, unsupported, ...)
          row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        log(
          f"{format_tokens(t):>5} {mode:<6} {name:<28} "
          + (f"{row['time_s'] * 1e3:10.2f} ms" if "time_s" in row else row["error"][:120])
        )
        results["rows"].append(row)
        if on_row is not None:
          on_row(results)
    del q, k, v, do, lists
  return results


def _row_functions(
  t, mode, rows, qkvdo, lists, variant_sizes, cfg, scale, max_dense, max_dense_fwdbwd,
  max_quadratic,
) -> list[tuple[str, Callable, tuple]]:  # fmt: skip
  """(name, function, arguments) of every row to time at (t, mode)."""
  q, k, v, do = qkvdo
  ssa_cfg = cfg["ssa"]
  todo: list[tuple[str, Callable, tuple]] = []

  def add(name, fn, args):
    if mode == "fwd":
      todo.append((name, fn, args))
    else:
      todo.append((name, _vjp_fn(fn), (args[0], args[1], args[2], do, *args[3:])))

  if "ssa_selector" in rows and mode == "fwd":
    select = lambda q, k: ssa.select_blocks(q, k, ssa_cfg, implementation="pallas")
    todo.append(("ssa_selector", select, (q, k)))
  full = lambda q, k, v: ssa.ssa_attention(q, k, v, ssa_cfg, implementation="pallas")
  if "ssa" in rows:
    add("ssa", full, (q, k, v))
  if "ssa_coarse" in rows and mode == "fwdbwd" and t <= max_quadratic:  # fwd is ssa's
    coarse_cfg = dataclasses.replace(ssa_cfg, coarse_grad=1.0)
    coarse = lambda q, k, v: ssa.ssa_attention(q, k, v, coarse_cfg, implementation="pallas")
    add("ssa_coarse", coarse, (q, k, v))
  if "ssa_frontier" in rows and mode == "fwdbwd":
    frontier_cfg = dataclasses.replace(ssa_cfg, coarse_grad=1.0, coarse_nodes="frontier")
    frontier = lambda q, k, v: ssa.ssa_attention(q, k, v, frontier_cfg, implementation="pallas")
    add("ssa_frontier", frontier, (q, k, v))
  if "ssa_far" in rows:
    # far blocks right past the local and own blocks (session 19's far=80 with 16-token
    # blocks and 4 local blocks); far_q / far_k stand in for the rotated copies, made from
    # q and k inside the timed function so that their gradients reach q and k
    far_cfg = dataclasses.replace(
      ssa_cfg, far_distance=(ssa_cfg.local_blocks + 1) * ssa_cfg.block_size
    )
    far = lambda q, k, v: ssa.ssa_attention(
      q, k, v, far_cfg, far_q=q[..., ::-1], far_k=k[..., ::-1], implementation="pallas"
    )
    add("ssa_far", far, (q, k, v))
  attn_kw = dict(block_size=ssa_cfg.block_size, query_tile=ssa_cfg.tile, scale=scale)
  for row, ids in lists.items():
    for vname, sizes in variant_sizes.items():
      if vname != "default" and row != "ssa_synthetic":
        continue
      fn = lambda q, k, v, ids, sizes=sizes, packed=row == "ssa_attention": (
        attention_pallas.sparse_attention_pallas(
          q, k, v, ids, block_sizes=sizes, compacted=packed, **attn_kw
        )[0]
      )
      add(row if vname == "default" else f"{row}[{vname}]", fn, (q, k, v, ids))
  if "dense_cudnn" in rows and t <= (max_dense if mode == "fwd" else max_dense_fwdbwd):
    dense = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=True, implementation="cudnn"
    )
    add("dense_cudnn", dense, (q, k, v))
  if "block_topk" in rows and t <= max_quadratic:
    topk = lambda q, k, v: ssa.ssa_attention(q, k, v, cfg["block_topk"], implementation="xla")
    add("block_topk", topk, (q, k, v))
  if "indexer" in rows and t <= max_quadratic:
    ic = cfg["indexer"]
    ki, kk, kw = jax.random.split(jax.random.key(t), 3)
    iq = jax.random.normal(ki, (1, t, ic.indexer_heads, ic.indexer_dim), DTYPE)
    ik = jax.random.normal(kk, (1, t, 1, ic.indexer_dim), DTYPE)
    iw = jax.random.normal(kw, (1, t, ic.indexer_heads), DTYPE)
    indexer = lambda q, k, v, iq, ik, iw: ssa.ssa_attention(
      q, k, v, ic, routing_q=iq, routing_k=ik, indexer_weights=iw, implementation="xla"
    )
    add("indexer", indexer, (q, k, v, iq, ik, iw))
  return todo


# ------------------------------------------------------------------------ FLOPs, table


def add_flops(rows: list[dict]) -> None:
  """Each row's own FLOPs (subq_jax.flops) and achieved TFLOP/s, in place."""
  for r in rows:
    t, name, mode = r.get("seq_len"), r["row"], r.get("mode")
    if t is None or "time_s" not in r:
      continue
    base = name.split("[")[0]
    if base in ("ssa_coarse", "ssa_frontier"):  # coarse branches: no FLOP model
      continue
    kind = {"dense_cudnn": "dense", "fa2_torch": "dense"}.get(base, base)
    kind = "ssa" if base.startswith("ssa") else kind
    cost = flops.cost(t, HEADS, flops.benchmark_config(kind))
    train = mode == "fwdbwd"
    if base == "ssa_selector":
      n = cost.selector_flops
    elif base in ("ssa_attention", "ssa_synthetic", "dense_cudnn", "fa2_torch"):
      n = cost.attention_flops_train if train else cost.attention_flops
    else:
      n = cost.total_flops_train if train else cost.total_flops
    r["flops"] = n
    r["tflops"] = n / r["time_s"] / 1e12


def _find(rows, name, t, mode):
  for r in rows:
    if r["row"] == name and r.get("seq_len") == t and r.get("mode") == mode and "time_s" in r:
      return r
  return None


def format_table(results: dict) -> str:
  rows = results["rows"]
  lines = [
    f"dense bf16 matmul (ceiling): {results.get('matmul_tflops', float('nan')):.0f} TFLOP/s",
    f"{'T':>5} {'mode':<6} {'row':<28} {'time ms':>11} {'vs cuDNN':>9} {'vs FA2':>8} "
    f"{'TFLOP/s':>8} {'peak GiB':>9}",
  ]
  seq_lens = sorted({r["seq_len"] for r in rows if r.get("seq_len")})
  for mode in ("fwd", "fwdbwd"):
    for t in seq_lens:
      dense = _find(rows, "dense_cudnn", t, mode)
      fa2 = _find(rows, "fa2_torch", t, mode)
      for r in rows:
        if r.get("seq_len") != t or r.get("mode") != mode:
          continue
        if "time_s" not in r:
          lines.append(f"{format_tokens(t):>5} {mode:<6} {r['row']:<28} {r['error'][:60]}")
          continue
        vs_d = f"{dense['time_s'] / r['time_s']:8.1f}x" if dense else f"{'':>9}"
        vs_f = f"{fa2['time_s'] / r['time_s']:7.1f}x" if fa2 else f"{'':>8}"
        peak = f"{r['peak_gib']:9.1f}" if r.get("peak_gib") is not None else f"{'':>9}"
        rate = f"{r['tflops']:8.1f}" if "tflops" in r else f"{'':>8}"  # no FLOP model: blank
        name = r["row"] + ("*" if r.get("added_from") else "")
        lines.append(
          f"{format_tokens(t):>5} {mode:<6} {name:<28} {r['time_s'] * 1e3:11.2f} {vs_d} {vs_f} "
          f"{rate} {peak}"
        )
  added = sorted({r["added_from"] for r in rows if r.get("added_from")})
  if added:
    lines.append(f"* measured in a separate run on the same device: {', '.join(added)}")
  lines += ["", "targets (at 1M if measured, else the largest T with an ssa row):"]
  lines += _targets(results)
  costs = (
    ("ssa_coarse", "fwdbwd", "the coarse branch's cost"),
    ("ssa_frontier", "fwdbwd", "the coarse branch's cost"),
    ("ssa_far", "fwd", "far and near blocks in two calls"),
    ("ssa_far", "fwdbwd", "far and near blocks in two calls"),
  )
  for name, mode, what in costs:
    ratios = [
      (t, c["time_s"] / s["time_s"])
      for t in seq_lens
      if (c := _find(rows, name, t, mode)) and (s := _find(rows, "ssa", t, mode))
    ]
    if ratios:
      text = ", ".join(f"{format_tokens(t)} {x:.2f}x" for t, x in ratios)
      lines += ["", f"{name} / ssa, {mode} ({what}): {text}"]
  return "\n".join(lines)


def _extrapolate_dense(rows, name, t, mode):
  """A dense row at T=t scaled from its longest measured T by the dense FLOP ratio."""
  known = [r for r in rows if r["row"] == name and r.get("mode") == mode and "time_s" in r]
  known = [r for r in known if r["seq_len"] < t]
  if not known:
    return None, ""
  r = max(known, key=lambda r: r["seq_len"])
  dense = flops.benchmark_config("dense")
  ratio = flops.pairs(t, dense) / flops.pairs(r["seq_len"], dense)
  note = f" [{name} extrapolated from {format_tokens(r['seq_len'])} x{ratio:.2f}]"
  return dict(r, seq_len=t, time_s=r["time_s"] * ratio), note


TARGET_LEN = 1024 * 1024


def _targets(results: dict) -> list[str]:
  rows = results["rows"]
  out = []
  ts = sorted({r["seq_len"] for r in rows if _find(rows, "ssa", r.get("seq_len"), "fwd")})
  if not ts:
    return ["  none: the targets compare ssa's forward, and no ssa fwd row was measured"]
  t = TARGET_LEN if TARGET_LEN in ts else ts[-1]  # the targets are stated at 1M
  ssa_f, ssa_b = _find(rows, "ssa", t, "fwd"), _find(rows, "ssa", t, "fwdbwd")
  for name, target, mode, ref in (
    ("fa2_torch", 60, "fwd", ssa_f),
    ("dense_cudnn", 40, "fwd", ssa_f),
    ("dense_cudnn", 30, "fwdbwd", ssa_b),
  ):
    other, note = _find(rows, name, t, mode), ""
    if other is None:  # dense at 1M takes a minute: scale the longest measured run
      other, note = _extrapolate_dense(rows, name, t, mode)
    if other and ref:
      x = other["time_s"] / ref["time_s"]
      out.append(f"  {format_tokens(t)} {mode} ssa vs {name}: {x:.1f}x (target >= {target}x){note}")
  sel = _find(rows, "ssa_selector", t, "fwd")
  if sel and ssa_f:
    share = sel["time_s"] / ssa_f["time_s"]
    out.append(f"  {format_tokens(t)} selector share of ssa fwd: {share:.1%} (target <= 15%)")
  lo = _find(rows, "ssa", 128 * 1024, "fwd")
  hi = _find(rows, "ssa", 1024 * 1024, "fwd")
  if lo and hi:
    out.append(f"  ssa fwd 128K -> 1M: {hi['time_s'] / lo['time_s']:.2f}x (target <= 9x)")
  att = _find(rows, "ssa_attention", t, "fwd")
  if att and results.get("matmul_tflops"):
    share = att["tflops"] / results["matmul_tflops"]
    rate = f"{share:.0%} of matmul rate"
    out.append(f"  {format_tokens(t)} sparse kernel fwd: {rate} (target >= 50%)")
  wins = [
    format_tokens(s)
    for s in ts
    if _find(rows, "dense_cudnn", s, "fwd")
    and _find(rows, "dense_cudnn", s, "fwd")["time_s"] > _find(rows, "ssa", s, "fwd")["time_s"]
  ]
  out.append(f"  ssa fwd faster than cuDNN at: {', '.join(wins) or 'none'} (target: from 32K)")
  return out


def plot(results: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [r for r in results["rows"] if "time_s" in r]
  fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
  for ax, mode in zip(axes, ("fwd", "fwdbwd"), strict=True):
    for name in sorted({r["row"] for r in rows if r["mode"] == mode}):
      pts = sorted(
        (r["seq_len"], r["time_s"]) for r in rows if r["row"] == name and r["mode"] == mode
      )
      ax.loglog([p[0] for p in pts], [p[1] for p in pts], "o-", label=name, base=2)
    ax.set_title(f"one layer, Llama-3-8B heads, bf16: {mode}")
    ax.set_xlabel("sequence length T")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_lines():
      ax.legend(fontsize=7)
    else:
      ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
  axes[0].set_ylabel("seconds")
  fig.suptitle(results.get("meta", {}).get("device", ""))
  fig.tight_layout()
  fig.savefig(path, dpi=120)

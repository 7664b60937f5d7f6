r"""Per-kernel timings of the Pallas sparse attention (forward, dq, dk/dv, index) over tilings.

Llama-3-8B heads, bf16, the benchmark budget of 8,192 keys per query on a synthetic
block list (`subq_jax.benchmark.synthetic_selection`). Prints one line per
(kernel, tiling); pick the defaults of `pallas_gpu.BlockSizes` from it.

  python -m experiments.tune_sparse_attention --seq_len=1M \
      --fwd=64/4/2,128/8/2 --dq=64/4/2 --dkv=64/4/2/u0,64/4/2,64/4/2/c1024/h

Tiling specs: `block_m/num_warps/num_stages[/c<dkv_chunk>][/u<dkv_unroll>][/h][/s0]`
(`pallas_gpu.BlockSizes.from_spec`); `--fwd_mosaic` specs `w<consumer warpgroups>/s<stages>
[/nosched]` (`mosaic_gpu.BlockSizes.from_spec`) time the Mosaic GPU forward on the same
inputs, with its output's relative difference from the first Triton forward, and
`--matmul` the dense bf16 matmul rate in the same run. It also prints the lengths of the
dk/dv pass's CSR rows (tiles listing each block), whose spread decides how much
segmenting can gain.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("seq_len", "1M", "T")
flags.DEFINE_list("fwd", ["64/4/2", "128/8/2"], "forward tilings: block_m/num_warps/num_stages")
flags.DEFINE_list("fwd_mosaic", [], "Mosaic GPU forward specs: w<wgs>/s<stages>[/nosched]")
flags.DEFINE_bool("matmul", False, "measure the dense bf16 matmul rate first")
flags.DEFINE_list("dq", ["64/4/2", "128/8/2"], "dq tilings")
flags.DEFINE_list(
  "dkv", ["64/4/2/u0", "64/4/2", "64/4/2/c1024/h"], "dk/dv tilings (see the docstring)"
)
flags.DEFINE_integer("repeats", 3, "timed repeats (median)")
flags.DEFINE_string("out", "", "JSON file for the results")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from pallas_kernels.sparse_attention import index
  from pallas_kernels.sparse_attention import mosaic_gpu as am
  from pallas_kernels.sparse_attention import pallas_gpu as ap
  from subq_jax import benchmark, flops, ssa

  results = []
  if FLAGS.matmul:
    rate = benchmark.matmul_rate()
    print(f"dense bf16 matmul: {rate:.0f} TFLOP/s", flush=True)
    results.append(dict(kernel="matmul", tflops=rate))
  t = flops.parse_tokens(FLAGS.seq_len)
  config = flops.benchmark_config("ssa")
  bs, qt, scale = config.block_size, config.tile, benchmark.HEADS.head_dim**-0.5
  q, k, v, do = benchmark.make_qkv(t)
  ids = ssa._slot_list(benchmark.synthetic_selection(t, config), config)
  ids = jax.jit(lambda x: index.compact_block_lists(x, block_size=bs, query_tile=qt))(ids)
  b, _, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  q5, do5 = q.reshape(b, t, hkv, g, d), do.reshape(b, t, hkv, g, d)
  out, lse = jax.jit(
    lambda q, k, v, ids: ap._forward(q, k, v, ids, bs, qt, scale, ap.BlockSizes(), False)
  )(q, k, v, ids)
  delta, lse4 = jax.jit(
    lambda out, do, lse: (
      jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), -1).reshape(b, t, hkv, g),
      lse.transpose(0, 2, 1).reshape(b, t, hkv, g),
    )
  )(out, do, lse)
  del out, lse
  cost = flops.cost(t, benchmark.HEADS, config)
  _, meta = jax.jit(
    lambda ids: index.transpose_block_lists(ids, num_blocks=t // bs, block_size=bs, query_tile=qt)
  )(ids)
  lengths = np.asarray(meta[..., 2] - meta[..., 0]).reshape(-1)
  stats = dict(
    kernel="csr_rows",
    seq_len=t,
    entries=int(lengths.sum()),
    mean=float(lengths.mean()),
    p50=float(np.percentile(lengths, 50)),
    p99=float(np.percentile(lengths, 99)),
    max=int(lengths.max()),
    sink_share=float(lengths[:: t // bs].sum() / lengths.sum()),
  )
  print(f"csr rows: {stats}", flush=True)
  results.append(stats)
  del meta

  first_out = []

  def save():  # after every line too: a step that hangs or times out keeps the others
    if FLAGS.out:
      os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
      with open(FLAGS.out, "w") as f:
        json.dump(results, f, indent=1)

  def report(kernel, spec, fn, args, n_flops, compare=False):
    try:
      r = benchmark.time_fn(fn, args, repeats=FLAGS.repeats, warmup=1, long_s=5.0)
      r["tflops"] = n_flops / r["time_s"] / 1e12 if n_flops else None
      line = f"{kernel:<6} {spec:<10} {r['time_s'] * 1e3:9.2f} ms  " + (
        f"{r['tflops']:6.1f} TFLOP/s" if n_flops else ""
      )
      line += f"  spread {r['spread']:.0%}" if r.get("spread") is not None else ""
      if compare:  # forward outputs: relative difference from the first Triton forward
        out = jax.jit(fn)(*args)[0]
        if first_out:
          r["out_rel_diff"] = benchmark._rel_err(out, first_out[0])
          line += f"  out rel. diff {r['out_rel_diff']:.1e}"
        else:
          first_out.append(out)
        del out
    except Exception as e:  # noqa: BLE001
      r = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
      line = f"{kernel:<6} {spec:<10} {r['error'][:100]}"
    print(line, flush=True)
    results.append(dict(kernel=kernel, tiling=spec, seq_len=t, **r))
    save()

  # Forward 2 matmuls, dq 3, dk/dv 4 per (query, key) pair (2 FLOPs each, per d).
  unit = cost.attention_flops // 2
  for spec in FLAGS.fwd:
    s = ap.BlockSizes.from_spec(spec)
    fn = lambda q, k, v, ids, s=s: ap._forward(q, k, v, ids, bs, qt, scale, s, False)
    report("fwd", spec, fn, (q, k, v, ids), 2 * unit, compare=True)
  for spec in FLAGS.fwd_mosaic:
    s = am.BlockSizes.from_spec(spec)
    fn = lambda q, k, v, ids, s=s: am.forward(q, k, v, ids, bs, qt, scale, s)
    report("mosaic", spec, fn, (q, k, v, ids), 2 * unit, compare=True)
  first_out.clear()
  common = (q5, k, v, ids, do5, lse4, delta)
  for spec in FLAGS.dq:
    s = ap.BlockSizes.from_spec(spec)
    fn = lambda *a, s=s: ap._backward_dq(*a, bs, qt, scale, s, False)
    report("dq", spec, fn, common, 3 * unit)
  for spec in FLAGS.dkv:
    s = ap.BlockSizes.from_spec(spec)
    fn = lambda *a, s=s: ap._backward_dkv(*a, bs, qt, scale, s, False)
    report("dkv", spec, fn, common, 4 * unit)
  build = lambda ids: index.transpose_block_lists(
    ids, num_blocks=t // bs, block_size=bs, query_tile=qt
  )
  report("index", "csr", build, (ids,), 0)
  # The forward's list layout: sorted compaction of the slot lists against packing the
  # runs they are made of (what ssa_attention does since the sort was dropped).
  runs = ssa._slot_runs(benchmark.synthetic_selection(t, config), config)
  lists = jnp.concatenate(runs, axis=-1)
  compact = lambda x: index.compact_block_lists(x, block_size=bs, query_tile=qt)
  report("index", "sort", compact, (lists,), 0)
  report("index", "pack", lambda *r: index.pack_runs(list(r)), tuple(runs), 0)
  save()


if __name__ == "__main__":
  app.run(main)

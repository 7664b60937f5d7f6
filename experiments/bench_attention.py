r"""One attention layer, SSA against dense and the other sparse mechanisms (issue 3).

Llama-3-8B heads (32 query heads, 8 KV heads, head_dim 128), bf16, causal, batch 1;
every sparse mechanism attends to 8,192 keys per query (DESIGN.md §6).

Rows:
  ssa_selector   routing tree + beam descent (Pallas selector kernel), forward only
  ssa_attention  Pallas block-sparse attention on the selected blocks
  ssa            both, through `ssa_attention(..., implementation="pallas")`
  ssa_coarse     ssa with `coarse_grad=1` (fwdbwd only: its forward is ssa's; the coarse
                 branch is quadratic in T / block_size, so up to --max_quadratic)
  ssa_frontier   ssa with `coarse_grad=1, coarse_nodes="frontier"` (fwdbwd only): the
                 coarse branch over the descent's scored nodes, O(T log T)
  ssa_far        ssa with `far_distance` = (local_blocks + 1) x block_size: the far blocks
                 (sinks, chosen) and the near ones in two sparse calls merged by their
                 log-sum-exp (far_q / far_k: q and k with the head dimension reversed)
  ssa_synthetic  the attention kernel on a synthetic list of the same budget
                 (stratified random blocks), independent of what routing picks
  dense_cudnn    jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)
  fa2_torch      FlashAttention-2 (torch SDPA flash backend), in a child process
  block_topk, indexer  the quadratic-selector baselines (xla paths), small T only
Modes: fwd, fwdbwd (forward + backward of q, k, v). Timing: device-synchronised wall
clock after compilation and warm-up, median of repeats (long rows stop early: a first
run over 5 x --long_s is the only sample, one over --long_s is followed by a single
timed run). Memory: the compiled executable's
arguments + outputs + temporaries. TFLOP/s over each row's own FLOPs (subq_jax.flops).

  python -m experiments.bench_attention --seq_lens=8K,128K,1M --out_dir=experiments/results
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

from absl import app, flags  # noqa: E402

from subq_jax import flops  # noqa: E402  (pure Python: no jax import)

FLAGS = flags.FLAGS
flags.DEFINE_list("seq_lens", ["8K", "16K", "32K", "64K", "128K", "256K", "512K", "1M"], "T")
flags.DEFINE_list(
  "rows",
  [
    "ssa",
    "ssa_selector",
    "ssa_attention",
    "dense_cudnn",
    "fa2_torch",
    "block_topk",
    "indexer",
  ],
  "rows to run (see the module docstring)",
)
flags.DEFINE_list("modes", ["fwd", "fwdbwd"], "fwd and/or fwdbwd")
flags.DEFINE_integer("repeats", 5, "timed repeats (median)")
flags.DEFINE_integer("warmup", 1, "untimed runs after compilation")
flags.DEFINE_float("long_s", 2.0, "a first sample longer than this is taken alone")
flags.DEFINE_string("max_dense", "1M", "longest T for dense_cudnn and fa2_torch forward")
flags.DEFINE_string("max_dense_fwdbwd", "512K", "longest T for dense fwdbwd rows")
flags.DEFINE_string("max_fa2", "", "longest T for fa2_torch rows (default: as dense)")
flags.DEFINE_string("max_fa2_fwdbwd", "", "longest T for fa2_torch fwdbwd (default: as fwd)")
flags.DEFINE_list(
  "add_rows",
  [],
  "JSON files of earlier runs (same device) whose rows join this run's table and targets "
  "(e.g. dense rows at 1M measured on their own); each such row records its file",
)
flags.DEFINE_string(
  "max_quadratic", "32K", "longest T for block_topk, indexer (xla paths) and ssa_coarse"
)
flags.DEFINE_list(
  "variants",
  [],
  "extra ssa_synthetic rows with other kernel tilings: name=block_m/warps/stages,...",
)
flags.DEFINE_string("out_dir", "experiments/results", "where JSON, table and PNG go")
flags.DEFINE_string("tag", "", "file name tag (default: device and date)")
flags.DEFINE_bool("fa2_worker", False, "internal: run the torch rows and print JSON")
flags.DEFINE_bool("check", True, "check SSA pallas against the xla path at the smallest T")
flags.DEFINE_string("check_len", "", "T of that check (default: the smallest T)")


HEADS = dict(q_heads=32, kv_heads=8, head_dim=128, batch=1)


# ------------------------------------------------------------------------- torch (FA2)


def _fa2_one(t: int, mode: str, repeats: int, long_s: float) -> dict:
  """One FlashAttention-2 timing (torch SDPA flash backend)."""
  import torch
  from torch.nn.attention import SDPBackend, sdpa_kernel

  b, hq, hkv, d = HEADS["batch"], HEADS["q_heads"], HEADS["kv_heads"], HEADS["head_dim"]
  torch.cuda.empty_cache()
  torch.cuda.reset_peak_memory_stats()
  gen = torch.Generator(device="cuda").manual_seed(t)
  grad = mode == "fwdbwd"
  q = torch.randn(b, hq, t, d, device="cuda", dtype=torch.bfloat16, generator=gen)
  k = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.bfloat16, generator=gen)
  v = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.bfloat16, generator=gen)
  # The flash backend wants equal heads: KV heads repeated (same FLOPs as GQA).
  k, v = (x.repeat_interleave(hq // hkv, dim=1) for x in (k, v))
  q, k, v = (x.requires_grad_(grad) for x in (q, k, v))
  do = torch.randn_like(q) if grad else None

  def step():
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
      out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    if grad:
      torch.autograd.grad(out, (q, k, v), do)

  def once():
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    return time.perf_counter() - start

  first = once()  # warm-up; a long one is the sample (as subq_jax.benchmark.time_fn)
  if first > 5 * long_s:
    times = [first]
  elif first > long_s:
    times = [once()]
  else:
    times = [once() for _ in range(repeats)]
  return dict(
    time_s=sorted(times)[len(times) // 2],
    samples=len(times),
    peak_gib=torch.cuda.max_memory_allocated() / 2**30,
  )


def fa2_worker(seq_lens, modes, max_dense, max_dense_fwdbwd, repeats, long_s):
  """Prints the FlashAttention-2 rows as one JSON line."""
  import torch

  results = []
  for t in seq_lens:
    for mode in modes:
      if t > (max_dense if mode == "fwd" else max_dense_fwdbwd):
        continue
      row = dict(row="fa2_torch", seq_len=t, mode=mode)
      try:
        row.update(_fa2_one(t, mode, repeats, long_s))
      except Exception as e:  # noqa: BLE001 (recorded, e.g. out of memory)
        row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
      print(json.dumps(row), file=sys.stderr, flush=True)
      results.append(row)
  results.append(dict(torch=torch.__version__, device=torch.cuda.get_device_name()))
  print("FA2JSON" + json.dumps(results), flush=True)


def run_fa2_child(seq_lens, modes, max_dense, max_dense_fwdbwd):
  try:
    import torch  # noqa: F401
  except ImportError:
    return [], None
  args = [
    sys.executable,
    "-m",
    "experiments.bench_attention",
    "--fa2_worker",
    "--seq_lens=" + ",".join(map(str, seq_lens)),
    "--modes=" + ",".join(modes),
    f"--max_dense={max_dense}",
    f"--max_dense_fwdbwd={max_dense_fwdbwd}",
    f"--repeats={FLAGS.repeats}",
    f"--long_s={FLAGS.long_s}",
  ]
  proc = subprocess.run(args, capture_output=True, text=True, check=False)
  sys.stderr.write(proc.stderr[-4000:])
  for line in proc.stdout.splitlines():
    if line.startswith("FA2JSON"):
      rows = json.loads(line[len("FA2JSON") :])
      return rows[:-1], rows[-1]
  return [dict(row="fa2_torch", error=f"child exited {proc.returncode}")], None


# ---------------------------------------------------------------------------- JAX rows


def main(argv):
  del argv
  seq_lens = [flops.parse_tokens(s) for s in FLAGS.seq_lens]
  max_dense = flops.parse_tokens(FLAGS.max_dense)
  max_dense_fwdbwd = flops.parse_tokens(FLAGS.max_dense_fwdbwd)
  if FLAGS.fa2_worker:
    fa2_worker(seq_lens, FLAGS.modes, max_dense, max_dense_fwdbwd, FLAGS.repeats, FLAGS.long_s)
    return
  # Torch first, in its own process, before JAX takes the GPU memory.
  fa2_rows, torch_info = [], None
  if "fa2_torch" in FLAGS.rows:
    cap = flops.parse_tokens(FLAGS.max_fa2) if FLAGS.max_fa2 else max_dense
    cap_bwd = flops.parse_tokens(FLAGS.max_fa2_fwdbwd) if FLAGS.max_fa2_fwdbwd else cap
    fa2_rows, torch_info = run_fa2_child(
      seq_lens, FLAGS.modes, min(max_dense, cap), min(max_dense_fwdbwd, cap_bwd)
    )

  import jax

  from subq_jax import benchmark as bench_lib

  os.makedirs(FLAGS.out_dir, exist_ok=True)
  partial = os.path.join(FLAGS.out_dir, f"bench_attention_{FLAGS.tag or 'run'}.partial.json")

  def checkpoint(results):  # survives a run cut short
    with open(partial, "w") as f:
      json.dump(dict(results, fa2_rows=fa2_rows, torch=torch_info), f)

  results = bench_lib.run_jax_rows(
    on_row=checkpoint,
    seq_lens=seq_lens,
    rows=FLAGS.rows,
    modes=FLAGS.modes,
    repeats=FLAGS.repeats,
    warmup=FLAGS.warmup,
    long_s=FLAGS.long_s,
    max_dense=max_dense,
    max_dense_fwdbwd=max_dense_fwdbwd,
    max_quadratic=flops.parse_tokens(FLAGS.max_quadratic),
    variants=FLAGS.variants,
    check=FLAGS.check,
    check_len=flops.parse_tokens(FLAGS.check_len) if FLAGS.check_len else None,
  )
  results["rows"] += [dict(r, seq_len=r.get("seq_len")) for r in fa2_rows]
  for path in FLAGS.add_rows:
    with open(path) as f:
      earlier = json.load(f)
    have = {(r["row"], r.get("seq_len"), r.get("mode")) for r in results["rows"] if "time_s" in r}
    results["rows"] += [
      dict(r, added_from=r.get("added_from") or path)
      for r in earlier["rows"]
      if "time_s" in r and (r["row"], r.get("seq_len"), r.get("mode")) not in have
    ]
  bench_lib.add_flops(results["rows"])
  device = jax.devices()[0]
  results["meta"] = dict(
    device=getattr(device, "device_kind", str(device)),
    platform=device.platform,
    jax=jax.__version__,
    python=platform.python_version(),
    torch=torch_info,
    heads=HEADS,
    flags={
      f: getattr(FLAGS, f)
      for f in (
        "seq_lens",
        "rows",
        "modes",
        "repeats",
        "warmup",
        "long_s",
        "max_dense",
        "max_dense_fwdbwd",
        "max_fa2",
        "max_fa2_fwdbwd",
        "max_quadratic",
        "add_rows",
        "check_len",
      )
    },  # fmt: skip
    date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
  )
  table = bench_lib.format_table(results)
  print(table, flush=True)
  tag = FLAGS.tag or "{}_{}".format(
    results["meta"]["device"].replace(" ", "_"), time.strftime("%Y%m%d_%H%M", time.gmtime())
  )
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  base = os.path.join(FLAGS.out_dir, f"bench_attention_{tag}")
  with open(base + ".json", "w") as f:
    json.dump(results, f, indent=1)
  with open(base + ".txt", "w") as f:
    f.write(table + "\n")
  bench_lib.plot(results, base + ".png")
  print(f"wrote {base}.json .txt .png")


if __name__ == "__main__":
  app.run(main)

"""Times one sequence-parallel attention layer, forward + backward, on 1..P devices.

  python -m experiments.seq_parallel_bench --out=experiments/results/seq_parallel/h200x2.json

For every kind (SSA at DESIGN.md §6's 8,192-key budget, dense ring attention) and every
device count, T doubles from --min_log2 until the step fails (out of memory) or passes
--max_log2: the longest context that fits. Then every (kind, devices) is timed at
--fixed_log2. Llama-3-8B heads (32 q, 8 kv, d 128), batch 1, bf16; inputs are created
already sharded, so no device ever holds the whole sequence. Prints a table and writes
JSON with the device and versions. Needs no grain (runs on the bare GPU image).
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec

from subq_jax import flops, seq_parallel, sharding

_OUT = flags.DEFINE_string("out", "", "JSON output path (none if empty).")
_KINDS = flags.DEFINE_list("kinds", ["ssa", "dense"], "Attention kinds.")
_DEVICES = flags.DEFINE_list("devices", ["1", "2"], "Device counts (seq shards).")
_MIN_LOG2 = flags.DEFINE_integer("min_log2", 15, "Shortest T tried: 2**min_log2.")
_MAX_LOG2 = flags.DEFINE_integer("max_log2", 21, "Longest T tried: 2**max_log2.")
_FIXED_LOG2 = flags.DEFINE_integer("fixed_log2", 17, "T of the 1-vs-P timing.")
_LAYOUT = flags.DEFINE_string("layout", "striped", "Sequence layout.")
_IMPL = flags.DEFINE_string("implementation", "pallas", "Sparse attention: pallas or xla.")
_ITERS = flags.DEFINE_integer("iters", 3, "Timed iterations (after one warm-up).")
_HEADS = flags.DEFINE_list("heads", ["32", "8", "128"], "q heads, kv heads, head dim.")
_BUDGET_S = flags.DEFINE_float("budget_s", 420.0, "Stop starting new runs after this.")


def step_fn(kind: str, devices: int, seq_len: int):
  """A jitted forward + backward of one layer on `devices` seq shards, and its inputs."""
  heads = flops.HeadConfig(*(int(x) for x in _HEADS.value))
  config = flops.benchmark_config(kind)
  mesh = sharding.make_mesh(sharding.MeshConfig(seq=devices), jax.devices()[:devices])
  spec = NamedSharding(mesh, PartitionSpec(None, "seq", None, None))
  impl = _IMPL.value if jax.default_backend() == "gpu" else "xla"

  def loss(q, k, v):
    out = seq_parallel.sharded_attention(
      q, k, v, config, mesh, layout=_LAYOUT.value, implementation=impl
    )
    return jnp.sum(out.astype(jnp.float32))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

  @jax.jit
  def make(key):
    keys = jax.random.split(key, 3)
    shapes = [
      (1, seq_len, h, heads.head_dim) for h in (heads.q_heads, heads.kv_heads, heads.kv_heads)
    ]
    return tuple(
      jax.lax.with_sharding_constraint(jax.random.normal(kk, s, jnp.bfloat16), spec)
      for kk, s in zip(keys, shapes, strict=True)
    )

  return grad, make(jax.random.PRNGKey(0))


def time_step(kind: str, devices: int, seq_len: int) -> dict:
  row = {"kind": kind, "devices": devices, "seq_len": seq_len}
  try:
    grad, args = step_fn(kind, devices, seq_len)
    t0 = time.perf_counter()
    jax.block_until_ready(grad(*args))
    row["compile_and_first_s"] = time.perf_counter() - t0
    times = []
    for _ in range(_ITERS.value):
      t0 = time.perf_counter()
      jax.block_until_ready(grad(*args))
      times.append(time.perf_counter() - t0)
    row["fwd_bwd_ms"] = 1e3 * float(np.median(times))
    row["ok"] = True
  except Exception as e:  # out of memory (or a compile failure): record and move on
    row["ok"] = False
    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
  print(json.dumps(row), flush=True)
  return row


def main(argv):
  del argv
  start = time.perf_counter()
  info = {
    "devices": [str(d) for d in jax.devices()],
    "device_kind": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "python": platform.python_version(),
    "layout": _LAYOUT.value,
    "implementation": _IMPL.value,
    "heads": dict(zip(("q_heads", "kv_heads", "head_dim"), map(int, _HEADS.value), strict=True)),
    "dtype": "bfloat16",
  }
  print(json.dumps(info), flush=True)
  counts = [int(d) for d in _DEVICES.value if int(d) <= jax.device_count()]
  rows = []
  fixed = 2**_FIXED_LOG2.value
  for kind in _KINDS.value:
    for devices in counts:
      if time.perf_counter() - start < _BUDGET_S.value:
        rows.append(dict(time_step(kind, devices, fixed), phase="fixed"))
  longest = {}
  for kind in _KINDS.value:
    for devices in counts:
      for e in range(_MIN_LOG2.value, _MAX_LOG2.value + 1):
        if time.perf_counter() - start > _BUDGET_S.value:
          break
        row = dict(time_step(kind, devices, 2**e), phase="longest")
        rows.append(row)
        if not row["ok"]:
          break
        longest[f"{kind}/{devices}"] = 2**e
  lines = [f"{'kind':<6} {'devices':>7} {'T':>8} {'fwd+bwd ms':>11}"]
  for r in rows:
    if r["phase"] == "fixed" and r["ok"]:
      lines.append(f"{r['kind']:<6} {r['devices']:>7} {r['seq_len']:>8} {r['fwd_bwd_ms']:>11.1f}")
  lines.append("longest T that ran (within --max_log2): " + json.dumps(longest))
  print("\n".join(lines))
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump({"info": info, "rows": rows, "longest": longest}, f, indent=1)


if __name__ == "__main__":
  app.run(main)

"""Sequence parallelism on real devices: one attention layer and training steps.

  python -m experiments.seq_parallel_bench --out_dir=$OUT --deadline_s=390

One call does the whole measurement of issue 6 on a two-GPU machine, each job in its own
process (an out-of-memory attempt cannot take the rest down), within --deadline_s:
- SSA (DESIGN.md §6 budget: 8,192 keys per query) and dense ring attention, Llama-3-8B
  heads (32 q / 8 kv, head_dim 128), bf16, batch 1, forward + backward: time at a fixed
  long T on 1 and 2 devices, peak memory per device, the collectives of the 2-device
  program, and the longest T that fits (SSA: executed; dense: by the compiled program's
  memory analysis, its fwd+bwd at millions of tokens would run for many minutes);
- a few training steps of configs/gpu.py's model with the sequence sharded.
Writes seq_parallel.json (rows as they come) and seq_parallel.log to --out_dir and
prints a summary. `--small` runs the same plan at toy sizes (CPU dry run with
XLA_FLAGS=--xla_force_host_platform_device_count=2).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

from absl import app, flags

_OUT_DIR = flags.DEFINE_string("out_dir", "", "Where the JSON and the log go.")
_DEADLINE = flags.DEFINE_float("deadline_s", 390.0, "No job starts or runs past this.")
_SMALL = flags.DEFINE_bool("small", False, "Toy sizes (a CPU dry run of the plan).")
_ONLY = flags.DEFINE_list("only", [], "Run only these job names.")
_JOB = flags.DEFINE_string("job", "", "Internal: run one job (JSON) in this process.")
_REPORT = flags.DEFINE_string("report", "", "Write a markdown report of this JSON (.md beside).")

M = 1 << 20


def gpu_plan() -> list[dict]:
  def layer(name, kind, devices, time_at, iters, fit, cap, path="sharded"):
    spec = {"kind": kind, "devices": devices, "path": path, "layout": "striped"}
    return dict(name=name, type="layer", spec=spec, time_at=time_at, iters=iters, fit=fit, cap=cap)

  train = dict(type="train", config="configs.gpu", steps=5, layout="striped")
  return [
    # One GPU: plain ssa_attention (the best single-device path); two: sequence-parallel.
    layer("ssa_1", "ssa", 1, M, 3, {"step": M // 4, "max_attempts": 4}, 110, path="single"),
    layer("ssa_2", "ssa", 2, M, 3, {"step": M // 4, "max_attempts": 5}, 130),
    dict(train, name="train_2", devices=2, cap=75),
    # Dense: the ring (flash-style tiled XLA attention) on one and on two GPUs, timed at
    # 128K. Fits are judged by compiled footprints (a fwd+bwd at millions of tokens runs
    # for minutes): two probes give bytes per token, then compiles step from the estimate.
    *(
      layer(
        name,
        "dense",
        devices,
        M // 8,
        2,
        {"step": M // 4, "compile_only": True, "probes": [M // 4, M], "max_attempts": 3},
        150,
      )
      for name, devices in (("dense_1", 1), ("dense_2", 2))
    ),
    dict(train, name="train_1", devices=1, cap=60),
  ]


def small_plan() -> list[dict]:
  """The GPU plan's shape at toy sizes, with a fake 24 MiB device so the fit search
  meets its limit."""
  k, heads, limit = 1 << 10, (4, 2, 16), 24 << 20

  def layer(name, kind, devices, fit, path="sharded"):
    spec = {"kind": kind, "devices": devices, "heads": heads, "small": True, "path": path}
    spec["layout"] = "striped"
    return dict(
      name=name, type="layer", spec=spec, time_at=2 * k, iters=1, fit=fit, cap=120,
      limit_bytes=limit,
    )  # fmt: skip

  train = dict(type="train", config="configs.gpu", arg="smoke", steps=2, cap=120)
  train.update(seq_len=256, batch=1, layout="striped")
  return [
    layer("ssa_1", "ssa", 1, {"step": 2 * k, "max_attempts": 3}, path="single"),
    layer("ssa_2", "ssa", 2, {"step": 2 * k, "max_attempts": 3}),
    dict(train, name="train_2", devices=2),
    layer("dense_1", "dense", 1, {"step": 4 * k, "compile_only": True, "probe": 8 * k}),
    layer("dense_2", "dense", 2, {"step": 4 * k, "compile_only": True, "probe": 8 * k}),
  ]


def environment() -> dict:
  import jax

  info = {
    "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    "python": platform.python_version(),
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "device_kind": jax.devices()[0].device_kind,
    "env": {k: os.environ.get(k) for k in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_FLAGS")},
  }
  for name in ("jax", "jaxlib", "flax", "optax", "triton", "numpy"):
    try:
      info[name] = __import__(name).__version__
    except Exception:  # noqa: BLE001
      info[name] = None
  try:
    smi = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    info["nvidia_smi"] = subprocess.run(smi, capture_output=True, text=True, timeout=20).stdout
  except Exception:  # noqa: BLE001
    info["nvidia_smi"] = None
  return info


def run_child(job: dict, timeout: float, log) -> list[dict]:
  """Runs one job in a fresh process; returns its RESULT rows (and an error row if it
  died or ran out of time)."""
  cmd = [sys.executable, "-m", "experiments.seq_parallel_bench", "--job", json.dumps(job)]
  rows, t0 = [], time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    for line in proc.stdout:
      if time.perf_counter() - t0 > timeout:
        break
      log(line.rstrip("\n"))
      if line.startswith("RESULT "):
        rows.append(dict(json.loads(line[7:]), name=job["name"]))
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()
  if proc.returncode != 0:
    why = "timed out" if time.perf_counter() - t0 > timeout else f"exit {proc.returncode}"
    rows.append({"job": "error", "name": job["name"], "error": why})
  return rows


def summary(rows: list[dict]) -> str:
  head = f"{'kind':<6} {'dev':>3} {'T':>9} {'phase':<6} {'fwd+bwd s':>9} {'peak GiB':>9}"
  lines = [head + " path   note"]
  for r in rows:
    if r.get("job") == "layer":
      peak = r.get("peak_bytes_per_device")
      peak = f"{max(peak) / 2**30:9.2f}" if peak and r.get("executed") else f"{'-':>9}"
      t = r.get("fwd_bwd_s")
      note = "ok" if r.get("ok") else r.get("error", "")[:60]
      if r.get("ok") and not r.get("executed"):
        note = (
          f"fits by compiled footprint {r['compiled_bytes_per_device']['total'] / 2**30:.1f} GiB"
        )
      coll = r.get("collectives")
      if coll and r.get("phase") == "time":  # does any collective move a whole K?
        biggest = max(c["max_elements"] for c in coll.values())
        note += f"; largest collective {biggest / r['full_k_elements']:.2f} x the elements of K"
      lines.append(
        f"{r['kind']:<6} {r['devices']:>3} {r['seq_len']:>9} {r.get('phase', ''):<6} "
        f"{(f'{t:9.3f}' if t else '-'):>9} {peak} {r.get('path', '')[:6]:<6} {note}"
      )
    elif r.get("job") == "fit_result":
      lines.append(
        f"longest {r['kind']} on {r['devices']}: {r['longest_fit']} (first fail "
        f"{r['first_fail']}, step {r['step']}, executed={r['executed']})"
      )
    elif r.get("job") == "train":
      lines.append(
        f"train {r['config']} on {r['devices']}: T={r['seq_len']} x {r['batch']}, "
        f"{r.get('step_s', float('nan')):.3f} s/step, {r.get('tokens_per_s', 0):,.0f} tok/s, "
        f"ok={r['ok']} {r.get('error', '')[:80]}"
      )
    elif r.get("job") == "error":
      lines.append(f"job {r['name']}: {r['error']}")
  return "\n".join(lines)


def report(result: dict) -> str:
  """Markdown of a run: device and versions, the layer and training rows, the targets."""
  info, rows = result["info"], result["rows"]
  gib = lambda x: f"{x / 2**30:.1f}"
  out = ["# Sequence parallelism on two GPUs", ""]
  out.append(
    f"{info['date']}; {(info.get('nvidia_smi') or '').strip() or info['device_kind']}; "
    f"jax {info['jax']}, jaxlib {info['jaxlib']}, flax {info['flax']}, "
    f"triton {info['triton']}, Python {info['python']}; "
    f"XLA_PYTHON_CLIENT_MEM_FRACTION={info['env'].get('XLA_PYTHON_CLIENT_MEM_FRACTION')}."
  )
  out += ["", "## One layer, forward + backward", ""]
  out.append(
    "| kind | path | GPUs | T | phase | fwd+bwd s | peak GiB/GPU | compiled GiB/GPU | note |"
  )
  out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    if r.get("job") != "layer":
      continue
    peak = r.get("peak_bytes_per_device")
    peak = gib(max(peak)) if peak and r.get("executed") and r.get("ok") else "-"
    comp = r.get("compiled_bytes_per_device", {}).get("total")
    t = r.get("fwd_bwd_s") or (r.get("first_s") if r.get("executed") and r.get("ok") else None)
    note = "" if r.get("ok") else r.get("error", "")[:90].replace("|", "/")
    if r.get("ok") and not r.get("executed"):
      note = "fits by compiled footprint (not run)"
    elif r.get("ok") and not r.get("fwd_bwd_s"):
      note = "ran once (time of that run)"
    out.append(
      f"| {r['kind']} | {r.get('path', '')} | {r['devices']} | {r['seq_len']:,} | "
      f"{r.get('phase', '')} | {f'{t:.3f}' if t else '-'} | {peak} | "
      f"{gib(comp) if comp else '-'} | {note} |"
    )
  out += ["", "## Longest context", ""]
  for r in rows:
    if r.get("job") == "fit_result":
      how = "executed" if r["executed"] else "compiled footprint"
      out.append(
        f"- {r['kind']} on {r['devices']} GPU(s): {r['longest_fit']} tokens fit, "
        f"{r['first_fail']} did not ({how}; step {r['step']:,})."
      )
    elif r.get("job") == "fit_estimate":
      out.append(
        f"- {r['kind']} on {r['devices']} GPU(s), linear in two compiled footprints: "
        f"{r['bytes_per_token'] / 1024:.1f} KiB per token + {r['base_bytes'] / 2**30:.1f} GiB, "
        f"longest about {r['longest_estimate']:,} tokens."
      )
  out += ["", "## Collectives of the two-GPU programs (largest array each moves)", ""]
  for r in rows:
    if r.get("job") == "layer" and r.get("collectives") and r.get("phase") == "time":
      parts = [
        f"{op} x{c['count']} ({', '.join(c.get('shapes', []))})"
        for op, c in r["collectives"].items()
      ]
      out.append(f"- {r['kind']} at T={r['seq_len']:,}: " + "; ".join(parts))
  out += ["", "## Training steps", ""]
  for r in rows:
    if r.get("job") == "train":
      out.append(
        f"- {r['config']} stage {r['stage']} on {r['devices']} GPU(s), T={r['seq_len']:,} x "
        f"batch {r['batch']}, {r.get('params', 0):,} params: "
        + (
          f"{r['step_s']:.3f} s/step, {r['tokens_per_s']:,.0f} tokens/s, first step "
          f"(compile) {r['compile_and_first_s']} s, losses {r['losses']}, peak "
          f"{gib(max(r['peak_bytes_per_device'] or [0]))} GiB/GPU"
          if r.get("ok")
          else f"failed: {r.get('error', '')[:200]}"
        )
      )
  for r in rows:
    if r.get("job") == "error":
      out.append(f"- job {r['name']}: {r['error']}")
  return "\n".join(out) + "\n"


def main(argv):
  del argv
  if _REPORT.value:
    with open(_REPORT.value) as f:
      text = report(json.load(f))
    with open(os.path.splitext(_REPORT.value)[0] + ".md", "w") as f:
      f.write(text)
    print(text)
    return
  if _JOB.value:
    job = json.loads(_JOB.value)
    from subq_jax import seq_parallel_benchmark as bench

    (bench.run_train_job if job["type"] == "train" else bench.run_layer_job)(job)
    return
  start = time.perf_counter()
  out_dir = _OUT_DIR.value or "."
  os.makedirs(out_dir, exist_ok=True)
  log_file = open(os.path.join(out_dir, "seq_parallel.log"), "a")

  def log(line: str):
    stamped = f"[{time.perf_counter() - start:6.1f}s] {line}"
    print(stamped, flush=True)
    log_file.write(stamped + "\n")
    log_file.flush()

  info = environment()
  log(json.dumps(info))
  plan = small_plan() if _SMALL.value else gpu_plan()
  if _ONLY.value:
    plan = [j for j in plan if j["name"] in _ONLY.value]
  result = {"info": info, "plan": plan, "rows": []}
  for job in plan:
    left = _DEADLINE.value - (time.perf_counter() - start)
    if left < 30:
      log(f"skip {job['name']}: {left:.0f} s left")
      result["rows"].append({"job": "error", "name": job["name"], "error": "skipped: deadline"})
      continue
    timeout = min(job["cap"], left - 5)
    job = dict(job, budget_s=timeout - 25)  # the fit search stops starting attempts then
    log(f"start {job['name']} (timeout {timeout:.0f} s)")
    result["rows"] += run_child(job, timeout, log)
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(out_dir, "seq_parallel.json"), "w") as f:
      json.dump(result, f, indent=1)
  table = summary(result["rows"])
  log("\n" + table)
  log_file.close()


if __name__ == "__main__":
  app.run(main)

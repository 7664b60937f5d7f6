"""Sequence-parallel measurements: one attention layer's fwd+bwd on 1..P devices (time,
longest context that fits, peak memory, the collectives of the compiled program) and
training steps of a config's model with the sequence sharded.

Each `run_*_job` runs in its own process (`experiments/seq_parallel_bench.py` starts
them), prints one `RESULT {json}` line per measurement and never lets an out-of-memory
attempt take the process down: the compiled program's memory analysis is checked first
(no allocation when it cannot fit), and an allocation failure is caught and recorded.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from subq_jax import flops, seq_parallel, sharding
from subq_jax.config import SSAConfig
from subq_jax.ssa import ssa_attention

_DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}
_COLLECTIVES = ("all-gather", "collective-permute", "all-reduce", "all-to-all", "reduce-scatter")


def emit(row: dict):
  print("RESULT " + json.dumps(row), flush=True)


def device_limit_bytes(devices) -> int | None:
  stats = devices[0].memory_stats()
  return None if not stats else int(stats.get("bytes_limit", 0)) or None


def peak_bytes(devices) -> list[int] | None:
  """Peak bytes in use on each device since the process started (None off-GPU)."""
  stats = [d.memory_stats() for d in devices]
  if not all(stats):
    return None
  return [int(s.get("peak_bytes_in_use", 0)) for s in stats]


def collectives(hlo_text: str) -> dict:
  """{op: {"count", "max_bytes", "max_elements"}} of the collectives in compiled HLO
  text, each over a result's arrays (async starts return (operand, result) tuples)."""
  out = {}
  for line in hlo_text.splitlines():
    if "=" not in line:
      continue
    lhs, _, rhs = line.partition("=")
    for op in _COLLECTIVES:
      m = re.search(rf"\s{op}(-start)?\(", rhs)
      if not m:
        continue
      arrays = [
        (int(np.prod([int(x) for x in dims.split(",") if x] or [1])), _DTYPE_BYTES.get(dt, 4))
        for dt, dims in re.findall(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]", rhs[: m.start()])
      ]
      entry = out.setdefault(op, {"count": 0, "max_bytes": 0, "max_elements": 0, "shapes": []})
      entry["count"] += 1
      shapes = re.findall(r"\b[a-z]+[0-9]*\[[0-9,]*\]", rhs[: m.start()])
      entry["shapes"] = sorted(set(entry["shapes"]) | set(shapes))[:12]
      entry["max_bytes"] = max([entry["max_bytes"]] + [n * b for n, b in arrays])
      entry["max_elements"] = max([entry["max_elements"]] + [n for n, _ in arrays])
  return out


def _memory(compiled) -> dict:
  """Per-device bytes of the compiled program: arguments, outputs, temporaries."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # some backends have none
    return {}
  if m is None:
    return {}
  d = {
    k: int(getattr(m, f"{k}_size_in_bytes", 0))
    for k in ("argument", "output", "temp", "alias", "generated_code")
  }
  d["total"] = d["argument"] + d["output"] + d["temp"] - d["alias"]
  return d


# ------------------------------------------------------------------ one attention layer


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  kind: str = "ssa"
  devices: int = 1
  heads: tuple[int, int, int] = (32, 8, 128)  # q heads, kv heads, head_dim (Llama-3-8B)
  layout: str = "striped"
  implementation: str | None = None  # None: Pallas on GPU for block kinds, else xla
  small: bool = False  # a tiny attention config for CPU dry runs
  # "sharded": seq_parallel.sharded_attention over `devices` seq shards; "single": plain
  # ssa_attention on one device (the best single-device path, for the one-GPU baseline).
  path: str = "sharded"
  dtype: str = "bfloat16"  # of q, k, v

  def config(self) -> SSAConfig:
    if self.small:
      return SSAConfig(kind=self.kind, block_size=16, top_k=4, fanout=4, beam=2)
    return flops.benchmark_config(self.kind)


def layer_program(spec: LayerSpec, seq_len: int):
  """(compiled fwd+bwd of one layer on spec.devices seq shards, input maker, mesh devices)."""
  config = spec.config()
  devices = jax.devices()[: spec.devices]
  mesh = sharding.make_mesh(sharding.MeshConfig(seq=spec.devices), devices)
  named = NamedSharding(mesh, PartitionSpec(None, "seq", None, None))
  impl = spec.implementation
  if impl is None:
    impl = "pallas" if jax.default_backend() == "gpu" and config.kind != "dense" else "xla"
  hq, hkv, d = spec.heads
  shapes = [(1, seq_len, h, d) for h in (hq, hkv, hkv)]

  def loss(q, k, v):
    out = seq_parallel.sharded_attention(
      q, k, v, config, mesh, layout=spec.layout, implementation=impl
    )
    return jnp.sum(out.astype(jnp.float32))

  grad = jax.jit(
    jax.grad(loss, argnums=(0, 1, 2)), in_shardings=(named,) * 3, out_shardings=(named,) * 3
  )
  abstract = [jax.ShapeDtypeStruct(s, spec.dtype, sharding=named) for s in shapes]
  if spec.path == "single":
    if spec.devices != 1:
      raise ValueError(f"path='single' runs on one device, not {spec.devices}")
    named = jax.sharding.SingleDeviceSharding(devices[0])
    single_impl = spec.implementation  # None: ssa_attention's default (Pallas / cuDNN)

    def loss(q, k, v):
      out = ssa_attention(q, k, v, config, implementation=single_impl)
      return jnp.sum(out.astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    abstract = [jax.ShapeDtypeStruct(s, spec.dtype, sharding=named) for s in shapes]
  compiled = grad.lower(*abstract).compile()

  @jax.jit
  def make(key):
    keys = jax.random.split(key, 3)
    return tuple(
      jax.lax.with_sharding_constraint(jax.random.normal(kk, s, spec.dtype), named)
      for kk, s in zip(keys, shapes, strict=True)
    )

  return compiled, make, devices


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def layer_attempt(spec: LayerSpec, seq_len: int, *, iters: int, execute: bool, limit) -> dict:
  """Compiles (and, if it can fit and `execute`, runs) fwd+bwd at seq_len; one row."""
  row = {"job": "layer", "kind": spec.kind, "devices": spec.devices, "seq_len": seq_len}
  row.update(path=spec.path, layout=spec.layout, heads=list(spec.heads))
  t0 = time.perf_counter()
  try:
    compiled, make, devices = layer_program(spec, seq_len)
  except Exception as e:  # noqa: BLE001  (compile-time OOM or an unsupported shape)
    row.update(ok=False, executed=False, error=f"compile: {type(e).__name__}: {str(e)[:400]}")
    return row
  row["compile_s"] = round(time.perf_counter() - t0, 2)
  mem = _memory(compiled)
  row["compiled_bytes_per_device"] = mem
  if spec.devices > 1:
    row["collectives"] = collectives(compiled.as_text())
    hq, hkv, d = spec.heads
    row["full_k_elements"] = seq_len * hkv * d  # K (or V) of the whole sequence
  fits = not (limit and mem and mem["total"] > limit)
  row["predicted_fit"] = fits
  if not fits or not execute:
    row.update(ok=fits, executed=False)
    if not fits:
      row["error"] = f"compiled footprint {mem['total'] / 2**30:.2f} GiB > limit"
    return row
  args = out = None
  try:
    args = jax.block_until_ready(make(jax.random.PRNGKey(seq_len)))
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    row["first_s"] = round(time.perf_counter() - t0, 4)
    row["finite"] = bool(_all_finite(out))  # fused reductions: no copy of the gradients
    times = []
    for _ in range(iters):
      out = None  # the previous gradients go before the next call allocates its own
      t0 = time.perf_counter()
      out = jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - t0)
    if times:
      row["fwd_bwd_s"] = float(np.median(times))
      row["fwd_bwd_s_all"] = [round(t, 4) for t in times]
    row.update(ok=True, executed=True)
  except Exception as e:  # noqa: BLE001  (RESOURCE_EXHAUSTED at run time)
    row.update(ok=False, executed=True, error=f"run: {type(e).__name__}: {str(e)[:400]}")
  finally:
    del args, out
    gc.collect()
  row["peak_bytes_per_device"] = peak_bytes(jax.devices()[: spec.devices])
  return row


def run_layer_job(job: dict):
  """Time at `time_at` (if given), then search the longest T that fits.

  The search starts from a linear estimate: bytes per token of the executed `time_at`
  run (peak) or, with `compile_only`, of two compiled footprints; then it steps by
  `step` up while attempts fit, or down until one does. `compile_only` attempts are
  judged by the compiled program's memory analysis alone (for dense attention, whose
  fwd+bwd at millions of tokens would run for many minutes).
  """
  spec = LayerSpec(**job["spec"])
  limit = job.get("limit_bytes") or device_limit_bytes(jax.devices())
  emit({"job": "layer_limit", "kind": spec.kind, "devices": spec.devices, "limit_bytes": limit})
  deadline = time.perf_counter() + job.get("budget_s", 1e9)
  per_token = base = None
  if job.get("time_at"):
    t = job["time_at"]
    row = layer_attempt(spec, t, iters=job.get("iters", 3), execute=True, limit=limit)
    emit(dict(row, phase="time"))
    peak = row.get("peak_bytes_per_device")
    if row.get("ok") and peak:
      per_token, base = max(peak) / t, 0.0
    elif row.get("compiled_bytes_per_device"):
      per_token, base = row["compiled_bytes_per_device"]["total"] / t, 0.0
  fit = job.get("fit")
  if not fit or not limit:
    return
  step, execute = fit["step"], not fit.get("compile_only", False)
  if fit.get("probes"):  # no timed run: two compiled footprints alone
    (t1, m1), (t2, m2) = [
      (t, layer_attempt(spec, t, iters=0, execute=False, limit=None)) for t in fit["probes"]
    ]
    for row in (m1, m2):
      emit(dict(row, phase="probe"))
    m1, m2 = (r.get("compiled_bytes_per_device", {}).get("total") for r in (m1, m2))
    if m1 and m2:
      per_token = (m2 - m1) / (t2 - t1)
      base = m1 - per_token * t1
      emit({"job": "fit_estimate", "kind": spec.kind, "devices": spec.devices,
            "bytes_per_token": per_token, "base_bytes": base,
            "longest_estimate": int((limit - base) / per_token)})  # fmt: skip
  elif fit.get("compile_only") and job.get("time_at"):
    # Two compiled footprints give the fixed part and the part per token.
    t2 = fit.get("probe", 8 * job["time_at"])
    probe = layer_attempt(spec, t2, iters=0, execute=False, limit=None)
    emit(dict(probe, phase="probe"))
    m1 = probe.get("compiled_bytes_per_device", {}).get("total")
    if m1 and per_token:
      m0 = per_token * job["time_at"]
      per_token = (m1 - m0) / (t2 - job["time_at"])
      base = m0 - per_token * job["time_at"]
  if not per_token:
    start = fit.get("start", step)
  else:
    start = max(step, int((limit - base) / per_token) // step * step)
  emit({"job": "fit_plan", "kind": spec.kind, "devices": spec.devices, "start": start})
  longest = failed = None
  t = start
  for _ in range(fit.get("max_attempts", 5)):
    if time.perf_counter() > deadline:
      break
    row = layer_attempt(spec, t, iters=0, execute=execute, limit=limit)
    emit(dict(row, phase="fit"))
    if row["ok"]:
      longest = t if longest is None else max(longest, t)
      if failed is not None and t + step >= failed:
        break
      t += step
    else:
      failed = t if failed is None else min(failed, t)
      if longest is not None and longest + step >= t:
        break
      t -= step
      if t < step:
        break
  emit(
    {
      "job": "fit_result",
      "kind": spec.kind,
      "devices": spec.devices,
      "longest_fit": longest,
      "first_fail": failed,
      "step": step,
      "executed": execute,
    }
  )


# ------------------------------------------------------------------------ training steps


def run_train_job(job: dict):
  """A few optimizer steps of a config's model, the sequence over `devices` seq shards.

  Tokens are uniform random ids (throughput does not depend on them; no data pipeline
  runs). Reports each step's time and tokens/s, the loss and peak memory per device.
  """
  from flax import nnx

  from subq_jax import experiment, seq_parallel_train
  from subq_jax import train as train_lib
  from subq_jax.model import Transformer, count_params

  module = importlib.import_module(job["config"])
  cfg = experiment.resolve(module.get_config(job.get("arg", "")))
  stage = job.get("stage", len(cfg.train.stages) - 1)
  model_cfg = train_lib.stage_model_config(cfg, stage)
  if job.get("model"):
    model_cfg = dataclasses.replace(model_cfg, **job["model"])
  seq_len = job.get("seq_len") or cfg.train.stages[stage].seq_len
  batch = job.get("batch") or cfg.train.stages[stage].batch_size or cfg.train.batch_size
  devices = jax.devices()[: job["devices"]]
  mesh_cfg = dataclasses.replace(cfg.mesh, seq=job["devices"], data=1, fsdp=1)
  mesh_cfg = dataclasses.replace(mesh_cfg, layout=job.get("layout", mesh_cfg.layout))
  cfg = dataclasses.replace(cfg, model=model_cfg, mesh=mesh_cfg)
  mesh = sharding.make_mesh(mesh_cfg, devices)
  row = {"job": "train", "config": job["config"], "arg": job.get("arg", ""), "stage": stage}
  row.update(devices=len(devices), seq_len=seq_len, batch=batch, layout=mesh_cfg.layout)
  row["model"] = json.loads(json.dumps(dataclasses.asdict(model_cfg)))
  graphdef, params = nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(0)))
  row["params"] = count_params(nnx.merge(graphdef, params))
  shardings = sharding.logical_param_shardings(params, mesh, mesh_cfg.rules)
  params = jax.device_put(params, shardings)
  tx = train_lib.make_optimizer(cfg.train)
  opt_state = seq_parallel_train.init_optimizer(tx, params, mesh, shardings)
  tok = cfg.data.make_tokenizer()
  step = seq_parallel_train.make_train_step(
    graphdef, tx, cfg, tok.sep_id, tok.pad_id, mesh, param_shardings=shardings
  )
  rng = np.random.default_rng(0)
  times, losses = [], []
  try:
    for i in range(job.get("steps", 5) + 1):
      tokens = rng.integers(0, model_cfg.vocab_size, (batch, seq_len + 1), dtype=np.int32)
      t0 = time.perf_counter()
      params, opt_state, metrics = step(params, opt_state, {"tokens": jnp.asarray(tokens)})
      loss = float(metrics["loss"])  # waits for the step
      dt = time.perf_counter() - t0
      if i == 0:
        row["compile_and_first_s"] = round(dt, 2)
      else:
        times.append(dt)
      losses.append(loss)
      print(f"train step {i}: {dt:.3f} s loss {loss:.4f}", flush=True)
    row.update(ok=True, step_s=float(np.median(times)), step_s_all=[round(t, 4) for t in times])
    row["tokens_per_s"] = batch * seq_len / row["step_s"]
  except Exception as e:  # noqa: BLE001
    row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
  row["losses"] = losses
  row["peak_bytes_per_device"] = peak_bytes(devices)
  emit(row)

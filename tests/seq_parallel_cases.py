"""Sharded vs single-device cases for `subq_jax.seq_parallel`, run in a fresh process.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/seq_parallel_cases.py CASE...

`tests/test_seq_parallel.py` runs it that way (the pytest worker may already have
initialised jax with one device). Each case compares output and gradients of a sharded
layer against `ssa_attention` on one device, and prints `ok <case>`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import chex  # noqa: E402
import jax  # noqa: E402
import jax.extend  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

from subq_jax import seq_parallel, sharding  # noqa: E402
from subq_jax.ssa import SSAConfig, ssa_attention  # noqa: E402

SMALL = dict(block_size=16, query_tile=8, top_k=3, fanout=4, beam=2, sink_blocks=1, local_blocks=1)
TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=3e-2, rtol=3e-2)}

# name: (kind, summary, layout, data, seq, dtype, position-free routing). Every shard count,
# summary, layout and block kind appears; compile time (an unrolled ring per case) bounds
# how many combinations CI affords.
CASES = {
  "ssa_mean_striped_seq2_data2": ("ssa", "mean", "striped", 2, 2, jnp.float32, False),
  "ssa_bounds_zigzag_seq4": ("ssa", "bounds", "zigzag", 1, 4, jnp.float32, False),
  "ssa_mean_striped_seq8": ("ssa", "mean", "striped", 1, 8, jnp.float32, False),
  "ssa_mean_contiguous_seq2_norope_bf16": ("ssa", "mean", "contiguous", 1, 2, jnp.bfloat16, True),
  "block_topk_zigzag_seq2": ("block_topk", "mean", "zigzag", 1, 2, jnp.float32, False),
  "sliding_striped_seq2": ("sliding", "mean", "striped", 1, 2, jnp.float32, False),
  "dense_striped_seq8": ("dense", "mean", "striped", 1, 8, jnp.float32, False),
  "dense_zigzag_seq4_data2": ("dense", "mean", "zigzag", 2, 4, jnp.float32, False),
  "dense_contiguous_seq2_bf16": ("dense", "mean", "contiguous", 1, 2, jnp.bfloat16, False),
}
# Tiles of the dense ring's steps: several per step, some skipped (wholly masked).
seq_parallel.DENSE_TILES["cpu"] = (16, 32)


def inputs(seed, b, t, hq, hkv, d, dtype, d_route=None):
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = jax.random.normal(keys[0], (b, t, hq, d)).astype(dtype)
  k = jax.random.normal(keys[1], (b, t, hkv, d)).astype(dtype)
  v = jax.random.normal(keys[2], (b, t, hkv, d)).astype(dtype)
  if d_route is None:
    return q, k, v, {}
  rq = jax.random.normal(keys[3], (b, t, hq, d_route)).astype(dtype)
  rk = jax.random.normal(keys[4], (b, t, hkv, d_route)).astype(dtype)
  return q, k, v, dict(routing_q=rq, routing_k=rk)


def run_case(name: str):
  kind, summary, layout, data, seq, dtype, position_free = CASES[name]
  config = SSAConfig(kind=kind, summary=summary, route_with_rope=not position_free, **SMALL)
  b, t, hq, hkv, d = 2, 256, 4, 2, 16
  q, k, v, routing = inputs(seq, b, t, hq, hkv, d, dtype, 8 if position_free else None)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=data, seq=seq), jax.devices()[: data * seq])
  perm = sharding.layout_permutation(t, seq, config.block_size, layout)
  inv = np.argsort(perm)
  cot = jax.random.normal(jax.random.PRNGKey(7), q.shape, jnp.float32)

  def single(q, k, v, return_info=False):
    return ssa_attention(q, k, v, config, implementation="xla", return_info=return_info, **routing)

  def sharded(q, k, v, return_selected=False):
    lay = {key: x[:, perm] for key, x in routing.items()}
    out = seq_parallel.sharded_attention(
      q[:, perm],
      k[:, perm],
      v[:, perm],
      config,
      mesh,
      layout=layout,
      return_selected=return_selected,
      **lay,
    )
    return (out[0][:, inv], out[1]) if return_selected else out[:, inv]

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cot)

  tol = TOL[dtype]
  if kind == "dense":
    out_1, out_p = jax.jit(single)(q, k, v), jax.jit(sharded)(q, k, v)
  else:  # the chosen blocks too, tiles in layout order
    out_1, info = jax.jit(functools.partial(single, return_info=True))(q, k, v)
    out_p, chosen = jax.jit(functools.partial(sharded, return_selected=True))(q, k, v)
    tiles = perm[:: config.tile] // config.tile
    np.testing.assert_array_equal(np.asarray(chosen), np.asarray(info.selected_blocks)[:, :, tiles])
  chex.assert_trees_all_close(out_p, out_1, **tol)
  grads_1 = jax.jit(jax.grad(loss(single), argnums=(0, 1, 2)))(q, k, v)
  grads_p = jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2)))(q, k, v)
  scale = float(max(jnp.abs(g.astype(jnp.float32)).max() for g in grads_1))
  chex.assert_trees_all_close(grads_p, grads_1, atol=tol["atol"] * scale, rtol=tol["rtol"])
  print(f"ok {name}", flush=True)


# name: (data, fsdp, seq, layout). With fsdp > 1 the parameters are placed by the
# logical-axis rules (ZeRO-3 over fsdp), and the step must keep them there.
TRAIN_CASES = {
  "train_step_data2_seq4": (2, 1, 4, "zigzag"),
  "train_step_rules_data2_fsdp2_seq2": (2, 2, 2, "striped"),
}


# name: (query_tile, sequence length). Tiles of 1 give query_tile x G = 4 rows, fewer than
# the kernels' 16: the path repeats the heads.
PALLAS_CASES = {"pallas_ssa_striped_seq2": (None, 256), "pallas_ssa_tile1_striped_seq2": (1, 128)}


def _pallas_operands(closed) -> list[tuple[int, ...]]:
  """Shapes of every pallas_call operand in a jaxpr, its sub-jaxprs included."""
  shapes = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        shapes.extend(tuple(x.aval.shape) for x in eqn.invars)
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else [param]:
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            walk(sub)

  walk(closed.jaxpr)
  return shapes


def run_pallas_case(name: str = "pallas_ssa_striped_seq2"):
  """The Pallas path (interpreted on CPU), whose ring backward takes each step's share
  from the merged softmax statistics instead of differentiating the step."""
  tile, t = PALLAS_CASES[name]
  config = SSAConfig(kind="ssa", block_size=16, query_tile=tile, top_k=3, fanout=4, beam=2)
  b, hq, hkv, d = 1, 4, 1, 16
  q, k, v, _ = inputs(3, b, t, hq, hkv, d, jnp.float32)
  mesh = sharding.make_mesh(sharding.MeshConfig(seq=2), jax.devices()[:2])
  perm = sharding.layout_permutation(t, 2, config.block_size, "striped")
  inv = np.argsort(perm)
  cot = jax.random.normal(jax.random.PRNGKey(7), q.shape, jnp.float32)
  single = lambda q, k, v: ssa_attention(q, k, v, config, implementation="xla")

  def sharded(q, k, v):
    out = seq_parallel.sharded_attention(
      q[:, perm], k[:, perm], v[:, perm], config, mesh, implementation="pallas"
    )
    return out[:, inv]

  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * cot)
  # The interpreter takes tiles of any height, so check what the GPU needs: every kernel's
  # query operands [b, t, kv_heads, heads, d] hold at least 16 rows per tile.
  rows = {
    s[3] * config.tile for s in _pallas_operands(jax.make_jaxpr(sharded)(q, k, v)) if len(s) == 5
  }
  assert rows and min(rows) >= 16, f"{name}: kernel tiles of {sorted(rows)} rows"
  chex.assert_trees_all_close(jax.jit(sharded)(q, k, v), single(q, k, v), **TOL[jnp.float32])
  grads_1 = jax.grad(loss(single), argnums=(0, 1, 2))(q, k, v)
  grads_p = jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2)))(q, k, v)
  scale = float(max(jnp.abs(g).max() for g in grads_1))
  chex.assert_trees_all_close(grads_p, grads_1, atol=1e-5 * scale, rtol=1e-4)
  print(f"ok {name}", flush=True)


def run_train_step(name: str):
  """One optimizer step of the model on a data x (fsdp x) seq mesh equals the one-device
  step; parameters placed by the logical-axis rules stay sharded as the rules say."""
  from flax import nnx

  from subq_jax import seq_parallel_train
  from subq_jax import train as train_lib
  from subq_jax.data.pipeline import DataConfig
  from subq_jax.experiment import EvalConfig, ExperimentConfig, Stage, TrainConfig
  from subq_jax.model import ModelConfig, Transformer

  model_cfg = ModelConfig(
    vocab_size=64,
    num_layers=2,
    d_model=32,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=64,
    dtype="float32",
    attention=SSAConfig(kind="ssa", block_size=8, top_k=2, fanout=2, beam=1),
    attention_pattern=("ssa", "dense"),  # the dense ring inside the model too
  )
  train_cfg = TrainConfig(stages=(Stage(128, 1),), batch_size=2, warmup_steps=0, lr=1e-2)
  cfg = ExperimentConfig(model_cfg, DataConfig(), train_cfg, EvalConfig(num_samples=0))
  graphdef, params = nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(0)))
  tx = train_lib.make_optimizer(train_cfg)
  data, fsdp, seq, layout = TRAIN_CASES[name]
  tokens = jax.random.randint(jax.random.PRNGKey(1), (max(2, data * fsdp), 129), 0, 64)
  batch = {"tokens": tokens, "answer_mask": (tokens % 3 == 0).astype(jnp.int32)}
  copy = lambda tree: jax.tree.map(jnp.array, tree)

  step_1 = train_lib.make_train_step(graphdef, tx, cfg, sep_id=1, pad_id=0)
  params_1, _, metrics_1 = step_1(copy(params), tx.init(params), batch)
  mesh_cfg = sharding.MeshConfig(data=data, fsdp=fsdp, seq=seq, layout=layout)
  cfg = dataclasses.replace(cfg, mesh=mesh_cfg)
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[: data * fsdp * seq])
  axes = sharding.param_logical_axes(params)
  unnamed = [path for path, names in axes.items() if names is None]
  assert not unnamed, f"parameters without logical axes: {unnamed}"
  shardings = sharding.logical_param_shardings(params, mesh, mesh_cfg.rules)
  placed = jax.device_put(copy(params), shardings)
  if fsdp > 1:  # embedding dimension over fsdp, the rest whole
    spec = lambda v: v.get_value().sharding.spec
    assert spec(placed["embed"]["embedding"]) == PartitionSpec(None, "fsdp")
    assert spec(placed["blocks"][0]["attn"]["wq"]["kernel"]) == PartitionSpec("fsdp", None)
    assert spec(placed["blocks"][0]["mlp"]["w2"]["kernel"]) == PartitionSpec(None, "fsdp")
    assert spec(placed["final_norm"]["scale"]) == PartitionSpec(None)
  step_p = seq_parallel_train.make_train_step(
    graphdef, tx, cfg, 1, 0, mesh, param_shardings=shardings if fsdp > 1 else None
  )
  params_p, _, metrics_p = step_p(placed, tx.init(placed), batch)
  for (path, got), (_, want) in zip(
    nnx.to_flat_state(params_p), nnx.to_flat_state(shardings), strict=True
  ):
    got = got.get_value()
    assert got.sharding.is_equivalent_to(want.get_value(), got.ndim), (path, got.sharding)
  chex.assert_trees_all_close(metrics_p["loss"], metrics_1["loss"], atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(metrics_p["grad_norm"], metrics_1["grad_norm"], rtol=1e-4)
  # Adam's first step is about lr * sign(g): a gradient near 0 turns float rounding into
  # up to ~1e-5 of movement, so the parameters get a little more room than the loss.
  chex.assert_trees_all_close(params_p, params_1, atol=1e-4, rtol=1e-4)
  print(f"ok {name}", flush=True)


if __name__ == "__main__":
  assert jax.device_count() >= 8, jax.devices()
  for case in sys.argv[1:] or [*CASES, *TRAIN_CASES, *PALLAS_CASES]:
    if case in TRAIN_CASES:
      run_train_step(case)
    elif case.startswith("pallas"):
      run_pallas_case(case)
    else:
      run_case(case)

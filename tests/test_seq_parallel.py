"""Sequence parallelism: layouts, rules and merges here; sharded-vs-single-device cases
and a two-process `jax.distributed` run in fresh processes (fake CPU devices)."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from subq_jax import seq_parallel, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Lower XLA CPU optimisation: these programs are tiny, compiling them dominates.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _env(devices: int) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_XLA}"
  return env


@pytest.mark.parametrize("layout", sharding.LAYOUTS)
@pytest.mark.parametrize("shards", [1, 2, 4])
def test_layout_tables(layout, shards):
  n, bs = 16, 4
  table = sharding.block_owner_table(n, shards, layout)
  assert sorted(table.reshape(-1)) == list(range(n))
  assert (np.diff(table, axis=1) > 0).all()  # a shard's blocks keep their global order
  perm = sharding.layout_permutation(n * bs, shards, bs, layout)
  x = np.arange(n * bs)[None]
  np.testing.assert_array_equal(sharding.from_layout(sharding.to_layout(x, perm), perm), x)
  np.testing.assert_array_equal(perm[::bs] // bs, table.reshape(-1))


def test_layouts_balance_causal_work():
  n, p = 64, 4
  work = {}
  for layout in sharding.LAYOUTS:  # earlier keys per shard: the causal work
    work[layout] = sharding.block_owner_table(n, p, layout).sum(axis=1)
  assert work["contiguous"].max() / work["contiguous"].min() > 5
  assert work["striped"].max() / work["striped"].min() < 1.15
  assert work["zigzag"].max() == work["zigzag"].min()


def test_logical_rules():
  spec = sharding.logical_to_spec(("batch", "seq", "heads", "head_dim"))
  assert spec == PartitionSpec(("data", "fsdp"), "seq", None, None)
  assert sharding.logical_to_spec(("embed", "mlp")) == PartitionSpec("fsdp", None)
  # A mesh axis is used once per array.
  assert sharding.logical_to_spec(("embed", "embed")) == PartitionSpec("fsdp", None)
  with pytest.raises(ValueError, match="no rule"):
    sharding.logical_to_spec(("nonsense",))
  mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
  assert mesh.axis_names == sharding.MESH_AXES and mesh.devices.size == jax.device_count()
  named = sharding.logical_sharding(mesh, ("batch", "seq"))
  assert named.spec == PartitionSpec(("data", "fsdp"), "seq")


def test_model_logical_axes():
  """Every parameter names its logical axes; rules turn them into specs; `constrain` is
  a no-op outside `axis_rules`."""
  from flax import nnx

  from subq_jax.model import ModelConfig, Transformer

  cfg = ModelConfig(vocab_size=32, d_model=16, num_heads=2, num_kv_heads=1, mlp_dim=32)
  _, params = nnx.split(
    Transformer(dataclasses.replace(cfg, tie_embeddings=False), rngs=nnx.Rngs(0))
  )
  axes = sharding.param_logical_axes(params)
  assert all(names is not None for names in axes.values()), axes
  assert axes["blocks/0/attn/wq/kernel"] == ("embed", "q_proj")
  assert axes["blocks/1/mlp/w2/kernel"] == ("mlp", "embed")
  assert axes["unembed/kernel"] == ("embed", "vocab")
  assert sharding.logical_to_spec(axes["embed/embedding"]) == PartitionSpec(None, "fsdp")
  assert sharding.logical_to_spec(("batch", "seq", "act_embed")) == PartitionSpec(
    ("data", "fsdp"), "seq", None
  )
  x = jnp.ones((2, 4, 16))
  assert sharding.constrain(x, ("batch", "seq", "act_embed")) is x
  mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
  with sharding.axis_rules(mesh):
    y = jax.jit(lambda x: sharding.constrain(x, ("batch", "seq", "act_embed")))(x)
  chex.assert_trees_all_equal(y, x)
  with pytest.raises(ValueError, match="do not match"):
    with sharding.axis_rules(mesh):
      sharding.constrain(x, ("batch", "seq"))


def test_param_shardings():
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=-1))
  params = {"w": np.zeros((256, 128)), "b": np.zeros(8)}
  specs = sharding.param_shardings(params, mesh, min_size=16)
  want = "fsdp" if jax.device_count() > 1 else None
  assert specs["w"].spec == PartitionSpec(want, None)
  assert specs["b"].spec == PartitionSpec(None)  # below min_size: replicated


def test_mesh_config_errors():
  with pytest.raises(ValueError, match="layout"):
    sharding.MeshConfig(layout="spiral")
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.MeshConfig(data=-1, seq=-1)
  with pytest.raises(ValueError, match="needs"):
    sharding.MeshConfig(data=2, seq=3).shape(4)
  with pytest.raises(ValueError, match="multiple"):
    seq_parallel.check_seq_len(96, 4, 16, "zigzag")


def test_short_conv_needs_contiguous_layout():
  """A short convolution over a striped/zigzag (reordered) sequence would mix tokens that
  are not neighbours: the sharded train step refuses it, naming the value."""
  from configs import quickstart
  from subq_jax import seq_parallel_train
  from subq_jax.experiment import resolve

  cfg = resolve(quickstart.get_config("smoke"))
  assert cfg.model.short_conv == 4
  mesh = sharding.make_mesh(sharding.MeshConfig(seq=1))
  with pytest.raises(ValueError, match="short_conv=4 .* 'striped'"):
    seq_parallel_train.make_train_step(None, None, cfg, 1, 0, mesh, layout="striped")


def test_coarse_grad_has_no_sharded_path():
  """The sharded attention would drop the coarse branch's gradient; it refuses instead."""
  from subq_jax import seq_parallel_train
  from subq_jax.config import SSAConfig

  mesh = sharding.make_mesh(sharding.MeshConfig(seq=1))
  attend = seq_parallel_train.sharded_attend(mesh, "contiguous")
  q = jnp.ones((1, 64, 2, 16))
  k = jnp.ones((1, 64, 1, 16))
  with pytest.raises(ValueError, match="coarse_grad=0.5 has no sequence-parallel path"):
    attend(q, k, k, SSAConfig(block_size=16, top_k=1, coarse_grad=0.5))


def test_dense_steps_match_attention():
  """The dense ring's step kernels, tile by tile (some tiles wholly masked): the forward
  going on from an earlier (out, lse) over two key parts equals one causal softmax, and
  the dq / dK dV passes from the final lse equal autodiff of it."""
  b, t, hq, hkv, d, scale = 1, 64, 4, 2, 8, 0.3
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(ks[0], (b, t, hq, d))
  k, v = (jax.random.normal(x, (b, t, hkv, d)) for x in ks[1:3])
  d_out = jax.random.normal(ks[3], q.shape)
  pos = jnp.arange(t)
  kw = dict(scale=scale, tiles=(16, 8))
  out, lse = jnp.zeros_like(q), jnp.full((b, hkv, hq // hkv, t), -jnp.inf)
  for part in (slice(32, 64), slice(0, 32)):  # rows before 32 see none of the first part
    out, lse = seq_parallel.dense_step_forward(
      q, k[:, part], v[:, part], pos, pos[part], out, lse, **kw
    )
  attention = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True)
  ref, vjp = jax.vjp(attention, q, k, v)
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  want = vjp(d_out)
  delta = jnp.sum(out * d_out, -1).reshape(b, t, hkv, hq // hkv).transpose(0, 2, 3, 1)
  grads = dict(q=q, d_out=d_out, lse=lse, delta=delta, q_pos=pos, **kw)
  dq = jnp.zeros_like(q)
  dk, dv = jnp.zeros_like(k), jnp.zeros_like(v)
  for part in (slice(0, 32), slice(32, 64)):
    dq = seq_parallel.dense_step_dq(k=k[:, part], v=v[:, part], k_pos=pos[part], dq=dq, **grads)
    dk_p, dv_p = seq_parallel.dense_step_dkv(
      k=k[:, part], v=v[:, part], k_pos=pos[part], dk=dk[:, part], dv=dv[:, part], **grads
    )
    dk, dv = dk.at[:, part].set(dk_p), dv.at[:, part].set(dv_p)
  chex.assert_trees_all_close((dq, dk, dv), want, atol=1e-5, rtol=1e-5)


# Two groups so that `pytest -n 2` runs them side by side.
CASE_GROUPS = {
  "ssa": [
    "ssa_mean_striped_seq2_data2",
    "ssa_bounds_zigzag_seq4",
    "ssa_mean_striped_seq8",
    "train_step_rules_data2_fsdp2_seq2",
    "pallas_ssa_striped_seq2",
  ],
  "others": [
    "ssa_mean_contiguous_seq2_norope_bf16",
    "block_topk_zigzag_seq2",
    "dense_striped_seq8",
    "dense_zigzag_seq4_data2",
    "dense_contiguous_seq2_bf16",
    "train_step_data2_seq4",
    "pallas_ssa_tile1_striped_seq2",
  ],
}


@pytest.mark.parametrize("group", list(CASE_GROUPS))
def test_sharded_matches_single_device(group):
  cases = CASE_GROUPS[group]
  script = os.path.join(ROOT, "tests", "seq_parallel_cases.py")
  result = subprocess.run(
    [sys.executable, script, *cases],
    env=_env(8),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stdout + result.stderr[-5000:]
  for case in cases:
    assert f"ok {case}" in result.stdout, result.stdout


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_jax_distributed():
  """Two processes x 2 CPU devices, joined by jax.distributed (gloo): a 4-shard ring."""
  port = _free_port()
  script = os.path.join(ROOT, "tests", "distributed_worker.py")
  procs = [
    subprocess.Popen(
      [sys.executable, script, str(i), "2", str(port)],
      env=_env(2),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=600)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for i, (proc, log) in enumerate(zip(procs, logs, strict=True)):
    assert proc.returncode == 0, log[-5000:]
    for kind in ("ssa", "dense"):
      assert f"process {i}: ok {kind} over 4 devices" in log

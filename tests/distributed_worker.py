"""One process of a multi-process sequence-parallel run on localhost (CPU, gloo).

    python tests/distributed_worker.py PROCESS_ID NUM_PROCESSES PORT

Each process has 2 CPU devices; `jax.distributed.initialize` joins them into one mesh
whose `seq` axis spans every process. The sharded SSA and ring-attention forward and
backward must agree with the same layer computed in this process alone on one device.
`tests/test_seq_parallel.py` starts the processes.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from subq_jax import seq_parallel, sharding  # noqa: E402
from subq_jax.ssa import SSAConfig, ssa_attention  # noqa: E402


def main(process_id: int, num_processes: int, port: int):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"localhost:{port}",
    num_processes=num_processes,
    process_id=process_id,
    local_device_ids=[0, 1],
  )
  assert jax.process_count() == num_processes and jax.local_device_count() == 2
  p = jax.device_count()
  mesh = sharding.make_mesh(sharding.MeshConfig(seq=p))
  spec = NamedSharding(mesh, PartitionSpec(None, "seq", None, None))

  b, t, hq, hkv, d = 1, 256, 4, 2, 16
  rng = np.random.default_rng(0)  # the same inputs in every process
  q, k, v = (rng.standard_normal((b, t, h, d), np.float32) for h in (hq, hkv, hkv))
  cot = rng.standard_normal((b, t, hq, d), np.float32)
  local = jax.local_devices()[0]

  for config in (
    SSAConfig(block_size=16, query_tile=8, top_k=3, fanout=4, beam=2, summary="bounds"),
    SSAConfig(kind="dense", block_size=16),
  ):
    layout = "zigzag"
    perm = sharding.layout_permutation(t, p, config.block_size, layout)

    def global_array(x, perm=perm):
      x = x[:, perm]
      return jax.make_array_from_callback(x.shape, spec, lambda idx, x=x: x[idx])

    def sharded_loss(q, k, v, config=config, layout=layout, perm=perm):
      out = seq_parallel.sharded_attention(q, k, v, config, mesh, layout=layout)
      return jnp.sum(out * cot[:, perm]), out

    args = [global_array(x) for x in (q, k, v)]
    (_, out), grads = jax.jit(jax.value_and_grad(sharded_loss, (0, 1, 2), has_aux=True))(*args)
    out, *grads = (
      np.asarray(multihost_utils.process_allgather(x, tiled=True))[:, np.argsort(perm)]
      for x in (out, *grads)
    )

    def single_loss(q, k, v, config=config):
      out = ssa_attention(q, k, v, config, implementation="xla")
      return jnp.sum(out * cot), out

    local_args = [jax.device_put(x, local) for x in (q, k, v)]
    (_, ref), ref_grads = jax.jit(jax.value_and_grad(single_loss, (0, 1, 2), has_aux=True))(
      *local_args
    )
    chex.assert_trees_all_close(out, np.asarray(ref), atol=2e-5, rtol=2e-5)
    chex.assert_trees_all_close(
      tuple(grads), tuple(np.asarray(g) for g in ref_grads), atol=1e-4, rtol=1e-4
    )
    print(f"process {process_id}: ok {config.kind} over {p} devices", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))

"""The model's training step with the sequence sharded over a mesh's `seq` axis.

    mesh = sharding.make_mesh(cfg.mesh)  # e.g. MeshConfig(data=2, fsdp=2, seq=2)
    params = jax.device_put(params, sharding.logical_param_shardings(params, mesh))
    step = make_train_step(graphdef, tx, cfg, sep_id, pad_id, mesh, layout="zigzag")
    params, opt_state, metrics = step(params, opt_state, batch)  # batch as for train.py

Same contract as `subq_jax.train.make_train_step`. Inside, the step reorders inputs,
targets and RoPE positions into the layout (`subq_jax.sharding`), runs the model with
`attention_fn=sharded_attend(...)` (every attention layer through
`seq_parallel.sharded_attention`), and takes the loss on the reordered targets: the token
loss is a sum over tokens, so it is unchanged. The rest of the model (projections, MLP,
norms) is position-wise; the model's logical-axis constraints (`sharding.constrain`,
active under `sharding.axis_rules` while the step traces) keep its activations split
along batch and sequence, and the parameters stay where the rules put them (FSDP over
`fsdp`: GSPMD gathers each weight where a layer uses it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from subq_jax import seq_parallel, sharding
from subq_jax import ssa as ssa_lib
from subq_jax import train as train_lib


def sharded_attend(mesh, layout: str, seq_axis: str = "seq"):
  """An `attend(q, k, v, config, **kw)` for the model that shards the sequence."""

  def attend(q, k, v, config, *, scale=None, implementation=None, return_info=False, **kwargs):
    if return_info:
      raise ValueError("sequence-parallel attention returns no AttentionInfo")
    if kwargs.pop("indexer_weights", None) is not None:
      raise ValueError("kind='indexer' has no sequence-parallel path")
    if config.coarse_grad:
      raise ValueError(
        f"coarse_grad={config.coarse_grad} has no sequence-parallel path (its branch reads "
        "every block's summary); train with coarse_grad=0 or on one device"
      )
    if config.far_distance:
      raise ValueError(
        f"far_distance={config.far_distance} has no sequence-parallel path yet (the ring "
        "attends with one q and k); train with far_distance=0 or on one device"
      )
    if implementation is None:  # as ssa_attention: Pallas kernels on GPU where they fit
      implementation = ssa_lib._default_implementation(q, k, config)
    impl = "pallas" if implementation == "pallas" and config.kind != "dense" else "xla"
    return seq_parallel.sharded_attention(
      q,
      k,
      v,
      config,
      mesh,
      layout=layout,
      seq_axis=seq_axis,
      scale=scale,
      implementation=impl,
      **kwargs,
    )

  return attend


def init_optimizer(tx, params, mesh, param_shardings):
  """`tx.init(params)` placed on `mesh`: every subtree shaped like the parameters (Adam's
  moments) sharded as they are, the rest (step counts) replicated. Placing it so keeps
  the step from compiling a second time for the shardings its first call returns."""
  structure = jax.tree.structure(param_shardings)
  replicated = NamedSharding(mesh, PartitionSpec())
  like_params = lambda x: jax.tree.structure(x) == structure

  def place(node):
    return param_shardings if like_params(node) else replicated

  opt_state = jax.jit(tx.init)(params)
  return jax.device_put(opt_state, jax.tree.map(place, opt_state, is_leaf=like_params))


def layout_block_size(model_cfg) -> int:
  """The block size every layer shares (the unit of the sequence layout)."""
  sizes = {model_cfg.layer_attention(i).block_size for i in range(model_cfg.num_layers)}
  if len(sizes) != 1:
    raise ValueError(f"sequence parallelism needs one block_size in every layer, got {sizes}")
  return sizes.pop()


def make_train_step(
  graphdef, tx, cfg, sep_id: int, pad_id: int, mesh, layout=None, rules=None, param_shardings=None
):
  """`train.make_train_step` with the sequence over `mesh`'s `seq` axis.

  `layout` and `rules` default to `cfg.mesh`'s. `param_shardings` (e.g.
  `sharding.logical_param_shardings(params, mesh, rules)`) pins the updated parameters
  to them; by default they follow the inputs' shardings.
  """
  layout = cfg.mesh.layout if layout is None else layout
  if cfg.model.short_conv and layout != "contiguous":
    raise ValueError(
      f"model.short_conv={cfg.model.short_conv} mixes neighbouring tokens, which the "
      f"{layout!r} layout reorders: use layout='contiguous'"
    )
  rules = cfg.mesh.rules if rules is None else rules
  attention_fn = sharded_attend(mesh, layout)
  p = mesh.shape["seq"]
  block = layout_block_size(cfg.model)
  if cfg.train.loss_aggregation != "token" and layout != "contiguous":
    raise ValueError(
      f"loss_aggregation={cfg.train.loss_aggregation!r} reads documents in order: "
      "use layout='contiguous'"
    )

  def loss_fn(params, batch):
    tokens = batch["tokens"]
    b, t = tokens.shape[0], tokens.shape[1] - 1
    perm = sharding.layout_permutation(t, p, block, layout)
    inputs, targets = tokens[:, :-1][:, perm], tokens[:, 1:][:, perm]
    positions = jnp.broadcast_to(jnp.asarray(np.arange(t, dtype=np.int32)[perm]), (b, t))
    with sharding.axis_rules(mesh, rules):
      logits = nnx.merge(graphdef, params)(inputs, positions, attention_fn=attention_fn)
    # lm_loss reads targets as tokens[:, 1:]; the column in front is never a target.
    shifted = jnp.concatenate([inputs[:, :1], targets], axis=1)
    mask = batch.get("answer_mask")
    if mask is not None:
      mask = jnp.concatenate([mask[:, :1], mask[:, 1:][:, perm]], axis=1)
    return train_lib.lm_loss(
      logits,
      shifted,
      aggregation=cfg.train.loss_aggregation,
      sep_id=sep_id,
      pad_id=pad_id,
      answer_mask=mask,
      answer_weight=cfg.train.answer_weight,
    )

  def step(params, opt_state, batch):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    metrics["grad_norm"] = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if param_shardings is not None:
      params = jax.lax.with_sharding_constraint(params, param_shardings)
    return params, opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1))

"""Meshes, logical-axis rules and sequence layouts for `jax.sharding`.

    mesh = make_mesh(MeshConfig(data=2, seq=4))
    spec = logical_to_spec(("batch", "seq", "heads", "head_dim"))  # P(("data", "fsdp"), "seq")
    x = jax.device_put(x, logical_sharding(mesh, ("batch", "seq", "heads", "head_dim")))
    params = jax.device_put(params, logical_param_shardings(params, mesh))
    with axis_rules(mesh):  # while tracing: the model's `constrain` calls pin activations
      ...

Mesh axes: `data` (batch), `fsdp` (batch, and parameters sharded ZeRO-3 style), `seq`
(the sequence: SSA and ring attention under `shard_map`, see `subq_jax.seq_parallel`).
Logical axes name what a dimension means (`batch`, `seq`, `embed`, `mlp`, ...); the
rules (MaxText / big_vision style, `MeshConfig.rules`, the experiment config's `mesh`
section) map each onto mesh axes, so a model annotates its arrays once and any mesh
shape shards them. `subq_jax.model` annotates its parameters (nnx `out_sharding`
metadata, never applied eagerly: the model is built without a mesh) and constrains its
activations through `constrain`, a no-op outside `axis_rules`.

Sequence layouts (causal load balance). A shard of a causal layer does work in
proportion to how late its tokens are. `layout_permutation` reorders the sequence, at
block granularity, before it is split evenly over the `seq` shards:
- `contiguous`: shard s holds blocks [s N/P, (s+1) N/P); the last shard works most.
- `striped`: shard s holds blocks s, s + P, s + 2P, ... (Striped Attention, per block).
- `zigzag`: 2P chunks; shard s holds chunks s and 2P - 1 - s (ring-flash-attention).
The model permutes its tokens and positions once at the input (RoPE takes the permuted
positions) and the loss is a sum over tokens, so nothing else changes.

Works with jax 0.11.2 and newer: meshes get explicit `Auto` axis types (recent
`jax.make_mesh` defaults to `Explicit`), and `shard_map` is found where it lives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "seq")
LAYOUTS = ("contiguous", "striped", "zigzag")

# Logical axis -> mesh axes (None: replicated). Parameters: the embedding dimension over
# fsdp (ZeRO-3); heads, the MLP and the vocabulary stay whole (no tensor parallelism
# here). Activations have their own names (`act_*`), so that a parameter rule never
# shards an activation by accident: batch over data and fsdp, seq over seq.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  # parameters
  ("embed", "fsdp"),
  ("mlp", None),
  ("vocab", None),
  ("q_proj", None),  # a projection's flattened heads x head_dim output
  ("kv_proj", None),
  ("norm", None),  # RMSNorm scales: tiny, replicated
  ("layers", None),
  # activations
  ("batch", ("data", "fsdp")),
  ("seq", "seq"),
  ("heads", None),
  ("kv_heads", None),
  ("head_dim", None),
  ("act_embed", None),
  ("act_mlp", None),
  ("act_vocab", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape and sequence layout.

  Attributes:
    data, fsdp, seq: devices along each axis; one of them may be -1 (all the rest).
    layout: sequence layout across `seq` shards, one of `LAYOUTS`.
    rules: logical-axis rules (see `DEFAULT_RULES`).
  """

  data: int = 1
  fsdp: int = 1
  seq: int = 1
  layout: str = "striped"
  rules: tuple = DEFAULT_RULES

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f"layout={self.layout!r} is not one of {LAYOUTS}")
    sizes = (self.data, self.fsdp, self.seq)
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"data, fsdp, seq = {sizes}: each >= 1, at most one -1")

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.seq]
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(f"{num_devices=} is not a multiple of the fixed axes {sizes}")
      sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
      raise ValueError(f"mesh (data, fsdp, seq) = {tuple(sizes)} needs {num_devices=}")
    return tuple(sizes)


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, seq) mesh over `devices` (default: all, every process's).

  `seq` is the innermost axis, so that a ring step's neighbours share a host (and, on
  GPUs, an NVLink island) first.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = config.shape(len(devices))
  grid = np.asarray(devices, dtype=object).reshape(shape)
  return _mesh(grid, MESH_AXES)


def _mesh(devices: np.ndarray, axis_names: tuple[str, ...]) -> Mesh:
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is None:  # older jax: every axis is automatic anyway
    return Mesh(devices, axis_names)
  return Mesh(devices, axis_names, axis_types=(axis_type.Auto,) * len(axis_names))


def logical_to_spec(axes: Sequence[str | None], rules=DEFAULT_RULES) -> PartitionSpec:
  """PartitionSpec of an array whose dimensions have the logical names `axes`.

  A mesh axis is used once per array: a later dimension mapped to an axis already used
  stays replicated along it.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in axes:
    target = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} has no rule; rules cover {sorted(table)}")
    names = (target,) if isinstance(target, str) else tuple(target or ())
    names = tuple(n for n in names if n not in used)
    used.update(names)
    spec.append(None if not names else names[0] if len(names) == 1 else names)
  return PartitionSpec(*spec)


def logical_sharding(mesh: Mesh, axes: Sequence[str | None], rules=DEFAULT_RULES):
  """NamedSharding of an array with logical dimension names `axes` on `mesh`."""
  return NamedSharding(mesh, _fit(logical_to_spec(axes, rules), mesh))


def _fit(spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes that `mesh` does not have (a rule may name `fsdp` on a data mesh)."""
  out = []
  for entry in spec:
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    names = tuple(n for n in names if n in mesh.axis_names)
    out.append(None if not names else names[0] if len(names) == 1 else names)
  return PartitionSpec(*out)


_ACTIVE = threading.local()


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules=DEFAULT_RULES):
  """While active (tracing a step), `constrain` pins activations onto `mesh` by `rules`.

  The model names its activations' axes once; without this context `constrain` does
  nothing, so single-device code never needs a mesh.
  """
  saved = getattr(_ACTIVE, "value", None)
  _ACTIVE.value = (mesh, tuple(rules))
  try:
    yield
  finally:
    _ACTIVE.value = saved


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` of x by its logical axis names, under `axis_rules`."""
  active = getattr(_ACTIVE, "value", None)
  if active is None:
    return x
  if len(axes) != x.ndim:
    raise ValueError(f"logical axes {tuple(axes)} do not match the shape {x.shape}")
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, logical_sharding(mesh, axes, rules))


def param_logical_axes(params) -> dict[str, tuple | None]:
  """{"blocks/0/attn/wq/kernel": ("embed", "q_proj"), ...}: every parameter's logical
  axes (nnx Variables' `out_sharding` metadata; None where a parameter has none)."""
  from flax import nnx

  out = {}
  for path, v in nnx.to_flat_state(params):
    names = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
    out["/".join(map(str, path))] = tuple(names) if names is not None else None
  return out


def logical_param_shardings(params, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings of an nnx parameter tree from its logical axes and `rules`: a tree
  that `jax.device_put(params, ...)` takes. Unannotated parameters are replicated."""
  from flax import nnx

  def one(v):
    value = v.get_value() if isinstance(v, nnx.Variable) else v
    names = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
    names = tuple(names) if names is not None else (None,) * np.ndim(value)
    spec = logical_sharding(mesh, names, rules)
    return v.replace(spec) if isinstance(v, nnx.Variable) else spec

  return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(params, mesh: Mesh, axis: str = "fsdp", min_size: int = 1 << 14):
  """FSDP (ZeRO-3) shardings of a parameter tree: each array's largest dimension that
  `axis` divides is split over it; small arrays (< `min_size` elements) and arrays with
  no such dimension are replicated. Use with `jax.device_put(params, ...)`; GSPMD
  gathers each weight where a layer uses it.

  A rule-free default: a model whose parameters carry logical axis names should use
  `logical_sharding` instead.
  """
  size = mesh.shape[axis] if axis in mesh.axis_names else 1

  def one(x):
    spec = [None] * x.ndim
    if size > 1 and x.size >= min_size:
      for dim in sorted(range(x.ndim), key=lambda i: -x.shape[i]):
        if x.shape[dim] % size == 0:
          spec[dim] = axis
          break
    return NamedSharding(mesh, PartitionSpec(*spec))

  return jax.tree.map(one, params)


def shard_map(f, *, mesh: Mesh, in_specs, out_specs):
  """`jax.shard_map` (new) or `jax.experimental.shard_map.shard_map` (old), unchecked.

  Replication checking is off: the bodies here mix per-shard constants (layout tables
  indexed by `axis_index`) with collectives, which the checker cannot type.
  """
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map as legacy

  return legacy(f, mesh, in_specs, out_specs, check_rep=False)


# ------------------------------------------------------------------- sequence layouts


@functools.lru_cache(maxsize=64)
def block_owner_table(num_blocks: int, num_shards: int, layout: str) -> np.ndarray:
  """int32 [num_shards, num_blocks // num_shards]: global block id of each shard's blocks.

  Local block m of shard s is global block `table[s, m]`; each row ascends (a shard's
  blocks keep their global order), which the sharded attention relies on.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
  p = num_shards
  chunks = 2 * p if layout == "zigzag" else p
  if num_blocks % chunks:
    raise ValueError(
      f"{num_blocks=} must be a multiple of {chunks} for layout={layout!r} over {p} shards"
    )
  ids = np.arange(num_blocks)
  if layout == "contiguous":
    table = ids.reshape(p, -1)
  elif layout == "striped":
    table = ids.reshape(-1, p).T
  else:
    c = ids.reshape(chunks, -1)
    table = np.concatenate([c[:p], c[p:][::-1]], axis=1)
  table = np.ascontiguousarray(table, dtype=np.int32)
  table.setflags(write=False)
  return table


def layout_permutation(seq_len: int, num_shards: int, block_size: int, layout: str) -> np.ndarray:
  """Token order of `layout`: x_layout = x[:, perm]; shard s then holds an even slice.

  `seq_len` must be a multiple of `block_size * num_shards` (x 2 for zigzag).
  """
  if seq_len % block_size:
    raise ValueError(f"{seq_len=} must be a multiple of {block_size=}")
  table = block_owner_table(seq_len // block_size, num_shards, layout)
  return (table.reshape(-1)[:, None] * block_size + np.arange(block_size)).reshape(-1)


def to_layout(x, perm: np.ndarray, axis: int = 1):
  """x reordered into a layout (see `layout_permutation`) along `axis`."""
  return x.take(perm, axis=axis) if hasattr(x, "take") else np.take(x, perm, axis=axis)


def from_layout(x, perm: np.ndarray, axis: int = 1):
  """Inverse of `to_layout`."""
  return to_layout(x, np.argsort(perm), axis)

"""Pallas kernels for SSA, each beside the plain-JAX reference it is tested against.

- `selector/`: score candidate routing-tree nodes for every query tile.
- `sparse_attention/`: attention of every query tile to a listed set of KV blocks.
"""

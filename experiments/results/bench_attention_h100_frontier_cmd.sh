#!/bin/bash
# Session 18 (kind nvidia-h100-x1, jax 0.11.2), from the repository root with $OUT set: the
# training cost of the two coarse branches (SSAConfig.coarse_nodes "blocks" and "frontier"),
# one layer forward+backward, in one run.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -m experiments.bench_attention --seq_lens=8K,32K,128K --rows=ssa,ssa_coarse,ssa_frontier \
  --modes=fwdbwd --max_quadratic=128K --repeats=3 --out_dir="$OUT" --tag=h100_frontier

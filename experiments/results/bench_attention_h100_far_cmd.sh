#!/bin/bash
# Session 20 (kind nvidia-h100-x1, jax 0.11.2), from the repository root with $OUT set: the
# cost of far blocks at bounded distances (SSAConfig.far_distance: far and near blocks in two
# sparse calls merged by log-sum-exp), one layer, forward and forward+backward, in one run.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -m experiments.bench_attention --seq_lens=8K,32K,128K --rows=ssa,ssa_far \
  --modes=fwd,fwdbwd --repeats=3 --out_dir="$OUT" --tag=h100_far

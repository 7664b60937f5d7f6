#!/bin/bash
# Session 17 (kind nvidia-h100-x1, jax 0.11.2), from the repository root with $OUT set: the
# cost of SSAConfig.coarse_grad in training, one layer forward+backward with and without the
# coarse branch (quadratic in T / block_size), to 128K. The flags are those recorded in the
# JSON's meta; the .txt and .png were re-rendered from the JSON here after the table learned
# to print the ratio (subq_jax.benchmark.format_table).
python3 -m experiments.bench_attention --seq_lens=8K,32K,128K --rows=ssa,ssa_coarse \
  --modes=fwdbwd --max_quadratic=128K --repeats=3 --out_dir="$OUT" --tag=h100_coarse

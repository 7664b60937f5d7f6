#!/bin/bash
# Session 20, last call: MQAR routing (pair block attended by layer) for seed 0 (MQAR fell)
# and seed 2 (MQAR held) at 16x, n = 16 samples (384 queries); then the far split's cost
# (bench_attention rows ssa, ssa_far; fwd and fwdbwd; 8K-128K). Checkpoints restored into
# /tmp/ckY (seed 0) and /tmp/ckZ (seed 2) by earlier calls.
set -x
for x in "ckY c8_s19fr" "ckZ c8_s20fr2"; do set -- $x
  [ -d /tmp/$2 ] || { tar xzf /tmp/$1/$2.tar.gz -C /tmp && cat /tmp/$1/ckpt_fr_6500.tar.a* | tar xf - -C /tmp/$2; }
done
rm -rf runs/cmp/ck
RUNS="16:16:200" D=/tmp/c8_s19fr/fr bash runs/cmp/s19eval.sh; mkdir -p $OUT/seed0; mv $OUT/*_16_n16* $OUT/seed0/
RUNS="16:16:200" D=/tmp/c8_s20fr2/fr SET="train.seed=2 data.seed=2" bash runs/cmp/s19eval.sh; mkdir -p $OUT/seed2; mv $OUT/*_16_n16* $OUT/seed2/
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout 330 python3 -m experiments.bench_attention --seq_lens=8K,32K,128K --rows=ssa,ssa_far \
  --modes=fwd,fwdbwd --repeats=3 --out_dir="$OUT" --tag=h100_far > $OUT/bench_far.log 2>&1; echo bench rc=$?
tail -20 $OUT/bench_far.log

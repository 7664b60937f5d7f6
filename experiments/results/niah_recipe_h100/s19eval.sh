#!/bin/bash
# Session 19: larger NIAH samples for the far=80 seed-0 model (restored into /tmp/c8_s19fr first):
# n = 256 at 1x and 16x, then n = 64 at 64x (262,144 tokens); no YaRN. Session 20: seeds 1 and 2
# (D, SET below), RUNS picks the evaluations. Session 21: V (the variant) and MECH (dense_rope,
# dense_yarn for a dense lane) too. Session 22: V=<session 20's V>,needles=8 with the variant's
# order of s12.sh (...,far=80,needles=8,block=16), D=/tmp/c8_s22n8/fr, RUNS="1,16:64:265", then
# "1:128:220", "16:128:200 64:32:220 4:64:120"; the outputs tarred into one file per call.
# Session 23: dense, MECH=dense_rope / dense_yarn, V=<session 22's V without far, coarse_grad, block>,
# D=/tmp/c8_s23dn8/dn, RUNS="1:128:200 16:32:170", "4:64:150".
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
V=${V:-short_chars=4-8,short_steps=2000-1500,short_niah=0.45,steps=3000,niah=0.45,tile=1,coarse_grad=1,short_coarse=0,far=80,block=16}
D=${D:-/tmp/c8_s19fr/fr}  # seed 1: D=/tmp/c8_s19fr1/fr SET="train.seed=1 data.seed=1"
run() {  # mults retrieval_samples seconds
  timeout $3 python3 -m experiments.compare_mechanisms --out_dir=$D --mechanisms=${MECH:-ssa_bounds} --variant=$V \
    --lrs=1e-3 --multipliers=$1 --depths=0,0.5,1 --num_samples=8 --tasks= --retrieval_samples=$2 \
    --batch_size=8 --set=train.checkpoint_every=100 $(for x in $SET; do echo --set=$x; done) > $OUT/eval_${1//,/_}_n$2.log 2>&1
  echo "$1 n$2 rc=$?"; cp $D/compare.json $OUT/compare_${1//,/_}_n$2.json; cp $D/compare.md $OUT/compare_${1//,/_}_n$2.md
  cp $D/eval/${MECH:-ssa_bounds}/suite.json $OUT/suite_${1//,/_}_n$2.json
}
for r in ${RUNS:-1,16:64:330 64:16:230}; do run ${r//:/ }; done  # mults:samples:seconds
grep -h "(train format) at" $OUT/eval_*.log | cut -c1-400

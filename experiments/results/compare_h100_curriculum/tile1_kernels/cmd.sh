#!/bin/bash
# One mechanism of the comparison alone on the GPU, results copied to $OUT every 15 s
# (a call cut short by the device budget still returns what was done).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
D=/tmp/one_$TAG; mkdir -p $D
timeout ${TMO:-200} python3 -m experiments.compare_mechanisms --out_dir=$D --mechanisms=$MECH \
  --variant=$VARIANT ${SET:+--set=$SET} --lrs=$LR --multipliers=${MULTS:-1} --tasks=niah_single_1 \
  --depths=0.5 --num_samples=8 --retrieval_samples=16 --batch_size=8 > $D/run.log 2>&1 &
P=$!
while kill -0 $P 2>/dev/null; do
  sleep 15
  cp $D/run.log $OUT/ 2>/dev/null; cp $D/runs/*/lr*/metrics.jsonl $OUT/ 2>/dev/null
done
wait $P; echo "rc=$?"
cp $D/run.log $OUT/; cp $D/runs/*/lr*/metrics.jsonl $D/runs/*/lr*/config.json $OUT/ 2>/dev/null
cp $D/compare.md $D/compare.json $OUT/ 2>/dev/null
grep "stage \|step .*00/\|mqar (train format)\|training:" $D/run.log | cut -c1-160 | tail -20

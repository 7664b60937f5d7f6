#!/bin/bash
# Session 10, call 5: ssa_bounds on recipe v2 with 1,000 steps at 4K, alone; the training
# metrics are copied to $OUT every 15 s, so a cut call still returns the curve.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
D=/tmp/long; mkdir -p $D; M=$D/nl/runs/ssa_bounds/lr0.001/metrics.jsonl
( while sleep 15; do [ -f $M ] && cp $M $OUT/metrics.jsonl; done ) &
timeout ${TMO:-540} python3 -m experiments.compare_mechanisms --out_dir=$D/nl --mechanisms=ssa_bounds \
  --variant=short_chars=4-8,short_steps=2000-1500,short_niah=0.45,steps=1000,niah=0.3,tile=1 \
  --lrs=1e-3 --multipliers=1 --depths=0,0.5,1 --tasks=vt --num_samples=8 --retrieval_samples=16 \
  --batch_size=8 > $D/nl.log 2>&1; echo "rc=$?"
cp $M $OUT/metrics.jsonl; cp $D/nl.log $OUT/; cp $D/nl/compare.json $OUT/ 2>/dev/null
cp $D/nl/runs/ssa_bounds/lr0.001/config.json $OUT/ 2>/dev/null
grep "train format) at\|tok/s" $D/nl.log | cut -c1-160
python3 -c "
import json
for l in open('$M'):
  x = json.loads(l)
  if x['step'] % 100 == 0: print(x['step'], x['seq_len'], round(x['tokens_per_s']), round(x['loss'], 3), {k[11:]: round(v, 2) for k, v in x.items() if k.startswith('answer_acc/')})
"

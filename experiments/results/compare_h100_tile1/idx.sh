#!/bin/bash
# Session 10, call 1: the indexer at its chosen rate (2e-3): train + 1x, then 4x (plain and
# YaRN) and 16x (plain, YaRN) evaluated concurrently from the same checkpoint; then the
# one-layer bench of the library's indexer (backward with the forward's probabilities).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
T0=$SECONDS; D=/tmp/idx; mkdir -p $D; TMO=${TMO:-560}
cm() { out=$1; shift; timeout $(( TMO - (SECONDS - T0) )) python3 -m experiments.compare_mechanisms --out_dir=$D/$out \
  --variant=steps=200,tile=1 --lrs=2e-3 --depths=0,0.5,1 --retrieval_samples=16 --batch_size=8 "$@" > $D/$out.log 2>&1
  echo "$out rc=$? at $((SECONDS-T0)) s" >> $D/done.txt; }
cm t --mechanisms=indexer --multipliers=1 --num_samples=8
for x in x4 x16 x16y; do mkdir -p $D/$x; cp -r $D/t/runs $D/$x/; done
cm x4 --mechanisms=indexer,indexer_yarn --multipliers=4 --num_samples=8 &
cm x16 --mechanisms=indexer --multipliers=16 --tasks=vt --num_samples=8 &
cm x16y --mechanisms=indexer_yarn --multipliers=16 --tasks=vt --num_samples=8 &
sleep 30; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv > $D/smi.txt
wait
left=$(( TMO - (SECONDS - T0) ))
[ $left -gt 60 ] && timeout $((left - 5)) python3 runs/cmp/indexer_bench.py 16 4096 > $D/bench.txt 2>&1
cat $D/done.txt $D/smi.txt $D/bench.txt
for f in $D/*.log; do echo "== $f"; grep -v "^W\|^I0\|Warning\|^ *$" $f | grep "val loss\|train format\|pairs attended\|tok/s" | cut -c1-150 | tail -8; done
python3 -c "
import json
for l in open('$D/t/runs/indexer/lr0.002/metrics.jsonl'):
  x = json.loads(l)
  if x['step'] % 100 == 0: print(x['step'], x['seq_len'], round(x['tokens_per_s']), round(x['loss'], 3), {k[11:]: round(v, 2) for k, v in x.items() if k.startswith('answer_acc/')})
"
tar czf $OUT/idx.tar.gz --exclude=checkpoints -C /tmp idx

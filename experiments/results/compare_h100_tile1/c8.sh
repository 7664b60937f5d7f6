#!/bin/bash
# Lanes of comparison runs. RUNS: space-separated lanes; a lane is '+'-joined runs
# 'name:mechanisms:variant:lr:mults[:tasks(;-separated, - for none beyond the training formats):num_samples]'; a run of the same name
# is reused, each spec's compare.json kept as compare_<mults>.json. Results tarred to $OUT (checkpoints excluded).
# SET: space-separated config overrides for every run (e.g. SET=train.checkpoint_every=100). A lane
# cut by TMO keeps its checkpoints under /tmp: a call on the same, still warm, machine resumes it.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
T0=$SECONDS; D=/tmp/c8_$TAG; mkdir -p $D; TMO=${TMO:-570}
for lane in $RUNS; do
  (
  for spec in ${lane//+/ }; do
    IFS=: read -r n mech var lr mults tasks ns <<< "$spec"
    left=$(( TMO - (SECONDS - T0) )); [ $left -lt 60 ] && { echo "$n skipped" >> $D/done.txt; continue; }
    timeout $left python3 -m experiments.compare_mechanisms --out_dir=$D/$n --mechanisms=$mech \
      --variant=$var --lrs=$lr --multipliers=$mults --depths=0,0.5,1 --num_samples=${ns:-${NS:-8}} $([ "$tasks" = "-" ] && echo --tasks= || echo ${tasks:+--tasks=${tasks//;/,}}) \
      --retrieval_samples=16 --batch_size=8 $(for x in $SET; do echo --set=$x; done) > $D/$n.log 2>&1
    echo "$n ($mults) rc=$? at $((SECONDS-T0)) s" >> $D/done.txt
    cp $D/$n/compare.json $D/$n/compare_${mults//,/_}.json 2>/dev/null; cp $D/$n.log $D/${n}_${mults//,/_}.log
  done
  ) &
done
sleep 90; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv > $D/smi.txt
wait; cat $D/done.txt $D/smi.txt
for f in $D/*/runs/*/lr*/metrics.jsonl; do echo "== $f"; python3 -c "
import json
for l in open('$f'):
  x = json.loads(l)
  if x['step'] % 200 == 0: print(x['step'], x['seq_len'], round(x['tokens_per_s']), round(x['loss'], 3), {k[11:]: round(v, 2) for k, v in x.items() if k.startswith('answer_acc/')})
"; done
for f in $D/*.log; do echo "== $f"; grep "val loss\|mqar (train format)" $f | cut -c1-120 | tail -4; done
tar czf $OUT/c8_$TAG.tar.gz --exclude=checkpoints -C /tmp c8_$TAG

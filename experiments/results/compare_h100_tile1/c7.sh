#!/bin/bash
# Session 6 call 1: routed kinds with query_tile=1 (ssa mean/bounds, block_topk) and the
# indexer, curriculum default, lr 1e-3, eval 1x/4x/16x; plus a NIAH probe lane at 512 (dense).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
T0=$SECONDS; D=/tmp/c7_$TAG; mkdir -p $D; TMO=${TMO:-570}
cmp() { # name mechanism variant mults
  left=$(( TMO - (SECONDS - T0) )); [ $left -lt 60 ] && { echo "$1 skipped" >> $D/done.txt; return; }
  timeout $left python3 -m experiments.compare_mechanisms --out_dir=$D/$1 --mechanisms=$2 \
    --variant=$3 --lrs=1e-3 --multipliers=$4 --depths=0,0.5,1 --num_samples=8 \
    --retrieval_samples=16 --batch_size=8 > $D/$1.log 2>&1
  echo "$1 rc=$? at $((SECONDS-T0)) s" >> $D/done.txt
}
Q="--config.eval.num_samples=0 --config.train.log_every=25 --config.train.checkpoint_every=100000"
probe() { # name variant flags...
  n=$1; v=$2; shift 2; left=$(( TMO - (SECONDS - T0) )); [ $left -lt 40 ] && { echo "$n skipped" >> $D/done.txt; return; }
  timeout $left python3 -m experiments.train --config=configs/ablation.py:$v "$@" --workdir=$D/$n $Q > $D/$n.log 2>&1
  echo "$n rc=$? at $((SECONDS-T0)) s" >> $D/done.txt
}
cmp sb ssa_bounds ${V}tile=1 1,4,16 &
cmp sm ssa_mean ${V}tile=1 1,4,16 &
cmp bt block_topk ${V}tile=1 1,4,16 &
[ -z "$RESUME" ] && cmp ix indexer tile=1 1,4 &
[ -z "$RESUME" ] && ( probe n50 kind=dense,short_steps=2000,steps=1,short_niah=0.5
  probe n50u4 kind=dense,short_steps=2000,steps=1,short_niah=0.5 --config.data.niah.uuid_chars=4 ) &
sleep 90; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv > $D/smi.txt
wait; cat $D/done.txt $D/smi.txt
for f in $D/*/runs/*/lr*/metrics.jsonl $D/n*/metrics.jsonl; do echo "== $f"; python3 -c "
import json
for l in open('$f'):
  x = json.loads(l)
  if x['step'] % 100 == 0: print(x['step'], x['seq_len'], round(x['tokens_per_s']), round(x['loss'], 3), {k[11:]: round(v, 2) for k, v in x.items() if k.startswith('answer_acc/')})
"; done
for f in $D/*.log; do echo "== $f"; grep "mqar (train format)\|niah (train format)\|niah_single_1 " $f | cut -c1-200 | tail -4; done
tar czf $OUT/c7_$TAG.tar.gz --exclude=checkpoints -C /tmp c7_$TAG

#!/bin/bash
# Which difference between the quickstart (learns MQAR) and the ablation model (does not)
# stops recall? Dense attention, runs of experiments.train in LANES (';'-separated runs
# of 'name|flags'), no evaluation; answer accuracy every 25 steps.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
T0=$SECONDS; D=/tmp/probe_$TAG; mkdir -p $D
Q="--config.eval.num_samples=0 --config.train.log_every=25 --config.train.checkpoint_every=100000"
BIG="--config.model.num_layers=6 --config.model.d_model=256 --config.model.num_heads=8 --config.model.mlp_dim=768"
run() { # name config flags...
  n=$1; shift; left=$(( ${TMO:-560} - (SECONDS - T0) )); [ $left -lt 40 ] && { echo "$n skipped" >> $D/done.txt; return; }
  timeout $left python3 -m experiments.train "$@" --workdir=$D/$n $Q > $D/$n.log 2>&1; echo "$n rc=$? at $((SECONDS-T0)) s" >> $D/done.txt
}
QS=--config=configs/quickstart.py:kind=dense,steps=1000
( run A256 $QS,seq_len=256; run B512 $QS,seq_len=512; run E512mix $QS,seq_len=512 --config.data.mixture.mqar=0.6 --config.data.mixture.code=0.4; run G512pairs $QS,seq_len=512 --config.data.mqar.pairs_at=0.5 ) &
( run C512big $QS,seq_len=512 $BIG; run D512bigbf16 $QS,seq_len=512 $BIG --config.model.dtype=bfloat16 ) &
( run F512biglr1 $QS,seq_len=512 $BIG --config.train.lr=1e-3; run H512bigbf16lr1 $QS,seq_len=512 $BIG --config.model.dtype=bfloat16 --config.train.lr=1e-3 ) &
wait; cat $D/done.txt
for f in $D/*/metrics.jsonl; do echo "== $f"; python3 -c "
import json
r = [json.loads(l) for l in open('$f')]
print(' '.join(f\"{x['step']}:{x['answer_token_acc']:.2f}\" for x in r[1::2]), '| tok/s', round(r[-1]['tokens_per_s']))
"; done
tar czf $OUT/probe_$TAG.tar.gz --exclude=checkpoints -C /tmp probe_$TAG

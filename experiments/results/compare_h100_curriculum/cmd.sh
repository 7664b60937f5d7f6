#!/bin/bash
# The mechanism comparison (configs/ablation.py:VARIANT) in LANES: each lane is one process
# stream that trains+evaluates its groups one after another (few processes share the GPU:
# time-slicing among many made small steps 5-10x slower). LANES="dense_rope,dense_yarn+sliding ssa_mean+block_topk"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
T0=$SECONDS
D=/tmp/cmp_$TAG
mkdir -p $D
for lane in $LANES; do
  (
  for gx in ${lane//+/ }; do
    g=${gx%%~*}; x=${gx#*~}; [ "$x" = "$gx" ] && x= || x=,$x
    n=${g%%,*}_lr$LR${x//[,=]/_}
    left=$(( ${TMO:-560} - (SECONDS - T0) ))
    [ $left -lt 60 ] && { echo "$g skipped at $((SECONDS-T0)) s" >> $D/done.txt; continue; }
    timeout $left python3 -m experiments.compare_mechanisms --out_dir=$D/$n --mechanisms=$g \
      --variant=$VARIANT$x ${SET:+--set=$SET} --lrs=$LR --multipliers=${MULTS:-1,4,16} \
      --depths=0,0.5,1 --num_samples=${NS:-8} --retrieval_samples=16 --batch_size=8 \
      > $D/$n.log 2>&1
    echo "$g rc=$? at $((SECONDS-T0)) s" >> $D/done.txt
  done
  ) &
done
sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv > $D/smi.txt
wait
cat $D/done.txt $D/smi.txt
for f in $D/*/runs/*/lr*/metrics.jsonl; do echo "== $f"; python3 -c "
import json
for l in open('$f'):
  x = json.loads(l); print(x['step'], x['seq_len'], round(x['tokens_per_s']), round(x['loss'], 3), round(x['answer_token_acc'], 3))
" | awk 'NR%2==0'; done
for f in $D/*.log; do echo "== $f"; grep "mqar (train format)\|niah_single_1 \|vt " $f | cut -c1-160 | tail -3; done
tar czf $OUT/cmp_$TAG.tar.gz --exclude=checkpoints -C /tmp cmp_$TAG
du -sh $D

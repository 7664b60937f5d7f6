#!/bin/bash
# One learning rate of the mechanism comparison (configs/ablation.py), every mechanism
# group in its own process on the one GPU at once; results (no checkpoints) come back as a tarball.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
T0=$SECONDS
D=/tmp/cmp_${TAG:-lr$LR}
mkdir -p $D
for g in ${GROUPS_:-ssa_mean ssa_bounds dense_rope,dense_yarn sliding block_topk}; do
  n=${g%%,*}
  ( timeout ${TMO:-540} python3 -m experiments.compare_mechanisms --out_dir=$D/$n --mechanisms=$g \
      --variant=steps=$STEPS,batch=$BATCH --lrs=$LR --multipliers=${MULTS:-1,4,16} \
      --depths=0,0.5,1 --num_samples=${NS:-8} --retrieval_samples=16 --batch_size=8 \
      > $D/$n.log 2>&1; echo "$g rc=$? at $((SECONDS-T0)) s" >> $D/done.txt ) &
done
sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv > $D/smi.txt
wait
cat $D/done.txt
for f in $D/*.log; do echo "== $f"; grep -v "^I1123\|^W1123" $f | grep -v "^ *$" | tail -3 | cut -c1-200; done
tar czf $OUT/cmp_${TAG:-lr$LR}.tar.gz --exclude=checkpoints -C /tmp cmp_${TAG:-lr$LR}
ls -la $OUT; du -sh $D

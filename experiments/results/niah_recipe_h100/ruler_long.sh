#!/bin/bash
# RULER-format NIAH tasks beyond the training length (YaRN) for one ssa checkpoint (parts in runs/cmp/ck).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p /tmp/ck && cat runs/cmp/ck/${CK:-s13_b16}.tgz.* | tar xzf - -C /tmp/ck
W=/tmp/ck/b16/runs/ssa_bounds/lr0.001; T0=$SECONDS
for len in ${LENS:-16x 4x}; do
  left=$(( ${TMO:-530} - (SECONDS - T0) )); [ $left -lt 60 ] && break
  timeout $left python3 -m experiments.evaluate --workdir=$W --suite=${TASKS:-niah_single_1,niah_single_2,niah_multikey_1} \
    --lengths=$len --yarn --depths=0,0.5,1 --num_samples=16 --batch_size=${BATCH:-8} ${BEAM:+--beam=$BEAM} --out_dir=/tmp/rl/ruler_$len$BEAM 2>&1 | grep -v "^|" | tail -6
  echo "$len rc=$? at $((SECONDS - T0)) s"
done
tar czf $OUT/ruler_long.tar.gz -C /tmp rl

#!/bin/bash
# Evaluation-time routing beam: one ssa checkpoint (parts in runs/cmp/ck) re-evaluated on its
# training-format NIAH/MQAR at 1x/4x/16x (YaRN beyond 1x) with each beam in BEAMS.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p /tmp/ck && cat runs/cmp/ck/${CK:-s13_b16}.tgz.* | tar xzf - -C /tmp/ck
W=/tmp/ck/b16/runs/ssa_bounds/lr0.001
for beam in ${BEAMS:-16 32 64 128}; do
  python3 -m experiments.evaluate --workdir=$W --suite= --train_tasks=niah,mqar --train_samples=16 \
    --lengths=${LENGTHS:-1x,4x,16x} --yarn --batch_size=${BATCH:-8} --beam=$beam --out_dir=$OUT/${CK:-s13_b16}_beam$beam 2>&1 | grep -v "^|" | tail -8
done
nvidia-smi --query-gpu=name,driver_version --format=csv; python3 -c "import jax; print(jax.__version__, jax.devices())"

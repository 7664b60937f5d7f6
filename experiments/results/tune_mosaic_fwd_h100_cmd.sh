#!/bin/bash
# Issue 3, Mosaic GPU forward, device call 1 (kind nvidia-h100-x1), from the repository
# root with $OUT set: compiled tests of the Mosaic forward, then the forward A/B
# (Triton 64/4/2 against Mosaic GPU tilings) at 128K and 1M on the same inputs, with the
# dense bf16 matmul rate measured in the same process.
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$SECONDS
versions=$(python3 -c 'import jax, triton; print(f"jax {jax.__version__}, Triton {triton.__version__}")' 2>/dev/null)
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)
echo "# $(date -u '+%F %H:%M UTC'), $gpu, $versions" | tee "$OUT/tune.txt"
timeout 170 python3 -m pytest -q -x tests/test_pallas_kernels.py -k "Compiled and mosaic" 2>&1 \
  | tail -40 | tee "$OUT/gpu_tests.log"
echo "== tests rc=$? at $((SECONDS - T0)) s"
for T in 128K 1M; do
  timeout 200 python3 -m experiments.tune_sparse_attention --seq_len=$T --matmul \
    --fwd=64/4/2 --fwd_mosaic=${MOSAIC_SPECS:-w2/s2,w2/s3,w2/s4,w4/s2,w2/s2/nosched} \
    --dq= --dkv= --repeats=5 --out="$OUT/tune_$T.json" 2>&1 | grep -v "^I0000\|^W0000" \
    | tail -30 | tee -a "$OUT/tune.txt"
  echo "== tune $T rc=$? at $((SECONDS - T0)) s" | tee -a "$OUT/tune.txt"
done

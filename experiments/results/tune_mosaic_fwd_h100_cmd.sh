#!/bin/bash
# Issue 3, Mosaic GPU forward, device call 1 (kind nvidia-h100-x1), from the repository
# root with $OUT set: the compiled kernel tests (the Mosaic forward's among them), then
# the forward A/B
# (Triton 64/4/2 against Mosaic GPU tilings) at 128K and 1M on the same inputs, with the
# dense bf16 matmul rate measured in the same process. (Its first run, 02:31 UTC, had 128K
# first and w4/s2 before nosched; w4/s2 hung: tune_mosaic_fwd_h100_128K.txt.)
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$SECONDS
versions=$(python3 -c 'import jax, triton; print(f"jax {jax.__version__}, Triton {triton.__version__}")' 2>/dev/null)
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)
echo "# $(date -u '+%F %H:%M UTC'), $gpu, $versions" | tee "$OUT/tune.txt"
timeout 170 python3 -m pytest -q tests/test_pallas_kernels.py tests/test_ssa.py \
  -k "Compiled or pallas_path" 2>&1 | tail -40 | tee "$OUT/gpu_tests.log"
echo "== tests rc=$? at $((SECONDS - T0)) s"
for T in ${SEQ_LENS:-1M 128K}; do
  timeout 200 python3 -m experiments.tune_sparse_attention --seq_len=$T --matmul \
    --fwd=64/4/2 --fwd_mosaic=${MOSAIC_SPECS:-w2/s2,w2/s4,w2/s2/nosched,w4/s2} \
    --dq= --dkv= --repeats=5 --out="$OUT/tune_$T.json" 2>&1 | grep -v "^I0000\|^W0000" \
    | tail -30 | tee -a "$OUT/tune.txt"
  echo "== tune $T rc=$? at $((SECONDS - T0)) s" | tee -a "$OUT/tune.txt"
done

#!/bin/bash
# Issue 3: compiled kernel tests on the H100 (the four-consumer Mosaic case alone, last,
# with its own timeout), then the Mosaic forward's four-consumer tiling at 1M.
export PYTHONUNBUFFERED=1
T0=$SECONDS
echo "# $(date -u '+%F %H:%M UTC'), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)" | tee "$OUT/gpu_tests.log"
timeout 240 python3 -m pytest -q -rs tests/test_pallas_kernels.py tests/test_ssa.py \
  -k "(Compiled or pallas_path) and not w4" 2>&1 | grep -v Warning | tail -8 | tee -a "$OUT/gpu_tests.log"
echo "== tests rc=$? at $((SECONDS - T0)) s" | tee -a "$OUT/gpu_tests.log"
timeout 90 python3 -m pytest -q tests/test_pallas_kernels.py -k "Compiled and w4" 2>&1 | tail -3 | tee -a "$OUT/gpu_tests.log"
echo "== w4 test rc=$? at $((SECONDS - T0)) s" | tee -a "$OUT/gpu_tests.log"
timeout 150 python3 -m experiments.tune_sparse_attention --seq_len=1M --matmul --fwd=64/4/2 \
  --fwd_mosaic=w2/s2,w4/s2 --dq= --dkv= --repeats=5 --out="$OUT/tune_1M.json" 2>&1 \
  | grep -v "^I0000\|^W0000" | tail -12 | tee "$OUT/tune.txt"
echo "== tune rc=$? at $((SECONDS - T0)) s" | tee -a "$OUT/tune.txt"

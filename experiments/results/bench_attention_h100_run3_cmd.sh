#!/bin/bash
# Issue 3, headline run 3 (kind nvidia-h100-x1), from the repository root with $OUT set:
# the SSA pallas-path tests, then the whole table in one process (one matmul rate, every
# ratio from this run): 8K..1M with the dense rows (cuDNN fwd+bwd to 1M, FA2 fwd to 1M,
# FA2 fwd+bwd to 512K: 96 GiB at 1M) and the SSA rows at 2M.
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$SECONDS
versions=$(python3 -c 'import jax, triton; print(f"jax {jax.__version__}, Triton {triton.__version__}")' 2>/dev/null)
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)
echo "# $(date -u '+%F %H:%M UTC'), $gpu, $versions" | tee "$OUT/gpu_tests.log"
timeout 60 python3 -m pytest -q tests/test_ssa.py -k "pallas_path" 2>&1 | tail -5 \
  | tee -a "$OUT/gpu_tests.log"
echo "== tests rc=$? at $((SECONDS - T0)) s"
timeout $((585 - (SECONDS - T0))) python3 -m experiments.bench_attention \
  --seq_lens=${SEQ_LENS:-8K,32K,128K,512K,1M,2M} --max_dense=1M --max_dense_fwdbwd=1M \
  --max_fa2_fwdbwd=512K --repeats=5 --check_len=8K --out_dir="$OUT" --tag=h100_run3 2>&1 \
  | grep -v "^I0000\|^W0000" | tee "$OUT/bench.log"
echo "== bench rc=$? at $((SECONDS - T0)) s"

#!/bin/bash
# The one device call of the forward-improvement round (issue 3), kind nvidia-h100-x1,
# run from the repository root with $OUT set: compiled tests, the SSA rows at 128K and 1M
# (dense rows joined from the committed run), a same-run A/B of the forward kernel and of
# the list packing, then a few training steps of configs/gpu.py. Every step has a timeout
# so the call ends inside 420 s.
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$SECONDS
left() { echo $((385 - (SECONDS - T0))); }
log=$OUT/gpu_tests.log
versions=$(python3 -c 'import jax, triton; print(f"jax {jax.__version__}, Triton {triton.__version__}")' 2>/dev/null)
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)
echo "# $(date -u '+%F %H:%M UTC'), $gpu, $versions" > "$log"
echo '# python3 -m pytest -q tests/test_pallas_kernels.py tests/test_ssa.py -k "Compiled or pallas_path"' >> "$log"
timeout 125 python3 -m pytest -q tests/test_pallas_kernels.py tests/test_ssa.py \
  -k "Compiled or pallas_path" 2>&1 | tee -a "$log"
echo "== tests rc=$? at $((SECONDS - T0)) s"
timeout 190 python3 -m experiments.bench_attention --seq_lens=128K,1M \
  --rows=ssa,ssa_selector,ssa_attention --modes=fwd,fwdbwd --repeats=5 --check_len=8K \
  --add_rows=experiments/results/bench_attention_h100.json --out_dir="$OUT" --tag=h100 \
  2>&1 | tee "$OUT/bench.log"
echo "== bench rc=$? at $((SECONDS - T0)) s"
t=$(($(left) - 110))
if [ "$t" -gt 30 ]; then
  timeout "$t" python3 -m experiments.tune_sparse_attention --seq_len=1M \
    --fwd=64/4/2/s0,64/4/2 --dq= --dkv= --repeats=7 \
    --out="$OUT/tune_fwd_ab.json" 2>&1 | tee "$OUT/tune_fwd_ab.txt"
  echo "== tune rc=$? at $((SECONDS - T0)) s"
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
t=$(left)
if [ "$t" -gt 120 ]; then t=120; fi
if [ "$t" -gt 20 ]; then
  timeout "$t" python3 -m experiments.train --config=configs/gpu.py:steps=20 \
    --config.eval.num_samples=0 --workdir=/tmp/gpu_run 2>&1 | tee "$OUT/gpu_config_h100.log"
  echo "== train rc=$? at $((SECONDS - T0)) s (limit $t s)" | tee -a "$OUT/gpu_config_h100.log"
fi

#!/bin/bash
# Session 11: ssa_bounds on the NIAH recipe with 2,000 steps at 4K, blocks of 64 and of 16
# (same 448 keys), over consecutive calls on one warm machine (checkpoints every 100 steps).
# LANES=b16 (default both); the newest checkpoint also comes back in 15 MB parts (ckpt_*).
V=short_chars=4-8,short_steps=2000-1500,short_niah=0.45,steps=2000,niah=0.3,tile=1
L_b64="b64:ssa_bounds:$V:1e-3:1:-:8+b64:ssa_yarn:$V:1e-3:4,16:-:8"
L_b16="b16:ssa_bounds:$V,block=16:1e-3:1:-:8+b16:ssa_yarn:$V,block=16:1e-3:4,16:-:8"
L_dn="dn:dense_rope:$V:1e-3:1:-:8+dn:dense_yarn:$V:1e-3:4,16:-:8"
L_bt16="bt16:block_topk:$V,block=16:1e-3:1:-:8+bt16:block_topk:$V,block=16,yarn:1e-3:4,16:-:8"
declare -A TRAINED=([b64]=ssa_bounds [b16]=ssa_bounds [dn]=dense_rope [bt16]=block_topk)
LANES=${LANES:-b64 b16}; RUNS=""; for n in $LANES; do v=L_$n; RUNS="$RUNS ${!v}"; done
D=/tmp/c8_s11; mkdir -p $D
( while sleep 20; do for n in $LANES; do f=$D/$n/runs/${TRAINED[$n]}/lr0.001/metrics.jsonl; [ -f $f ] && cp $f $OUT/metrics_$n.jsonl; done; done ) > /dev/null 2>&1 &
LOOP=$!
RUNS="$RUNS" SET="train.checkpoint_every=100" TAG=s11 TMO=${TMO:-560} bash runs/cmp/c8.sh
kill $LOOP
for n in $LANES; do
  c=$D/$n/runs/${TRAINED[$n]}/lr0.001/checkpoints; last=$(ls $c 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1)
  echo "$n newest checkpoint: $last"; cp $D/$n/runs/${TRAINED[$n]}/lr0.001/metrics.jsonl $OUT/metrics_$n.jsonl
  [ -n "$last" ] && [ "$CKPT" = 1 ] && tar cf - -C $D $n/runs/${TRAINED[$n]}/lr0.001/checkpoints/$last | split -b 15M - $OUT/ckpt_${n}_$last.tar.
done

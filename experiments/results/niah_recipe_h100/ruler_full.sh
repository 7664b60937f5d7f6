#!/bin/bash
# Session 23: the full 13-task RULER suite (--tasks=ruler) at 1x, 32 samples a depth, for the
# four needles=8 models (SSA seeds 2 and 1, dense seeds 2 and 1), restored from /tmp/ckall/<TAG>
# (brought over in parts by earlier calls), the four evaluations at once on one GPU.
for tag in s22n8 s22n8s1 s23dn8 s23dn8s1; do
  tar xzf /tmp/ckall/$tag/c8_$tag.tar.gz -C /tmp && cat /tmp/ckall/$tag/ckpt_*.tar.a* | tar xf - -C /tmp/c8_$tag
done
ls -d /tmp/c8_*/*/runs/*/lr0.001/checkpoints/*
B=short_chars=4-8,short_steps=2000-1500,short_niah=0.45,steps=3000,niah=0.45,tile=1
VS=$B,coarse_grad=1,short_coarse=0,far=80,needles=8,block=16; VD=$B,needles=8
run() {  # tag lane mechanism variant seed
  RUNS="$2:$3:$4:1e-3:1:ruler:32" SET="train.checkpoint_every=100 train.seed=$5 data.seed=$5" TAG=$1 \
    TMO=${TMO:-420} bash runs/cmp/c8.sh > /tmp/$1_ruler.out 2>&1
}
# staggered: each c8.sh installs the wheels into /tmp/site first
run s22n8 fr ssa_bounds $VS 2 & sleep 20; run s22n8s1 fr ssa_bounds $VS 1 & sleep 20
run s23dn8 dn dense_rope $VD 2 & sleep 20; run s23dn8s1 dn dense_rope $VD 1 & wait
for tag in s22n8 s22n8s1 s23dn8 s23dn8s1; do echo "== $tag"; grep "RULER average" /tmp/c8_$tag/*/compare.md; done

#!/bin/bash
# Session 12: dense and ssa_bounds (16-token blocks) on the NIAH recipe with 3,000 steps at 4K
# and NIAH 45% of the 4K stage (MQAR 15%), RULER-style tasks at 1x, over consecutive calls on
# one warm machine (checkpoints every 100 steps). LANES: dn, b16, sl (sliding, 16-token blocks);
# CKPT="b16 ..." brings those lanes' newest checkpoints back in 15 MB parts.
# Session 13: EXTRA=,short_ruler=0.2 TAG=s13 LANES="dn b16" (EXTRA is appended to the variant).
# Session 15: EXTRA=,convert=1000 TAG=s15cv (seed 0) and TAG=s15cv1 SET="train.seed=1 data.seed=1"
# on one machine at once (metrics files carry the TAG).
# Session 16: EXTRA=,coarse_grad=1 TAG=s16cg (seed 0) and TAG=s16cg1 SET="train.seed=1 data.seed=1".
# Sessions 17-18: EXTRA=,coarse_grad=1,short_coarse=0 LANES=b16 TAG=s17cg (seed 0), TAG=s17cg1
# SET="train.seed=1 data.seed=1", TAG=s18cg2 SET="train.seed=2 data.seed=2", one lane per machine.
# Session 22: EXTRA=,coarse_grad=1,short_coarse=0,far=80,needles=8 LANES=fr TAG=s22n8 SET="train.seed=2
# data.seed=2" (three calls, CKPT=fr in the last two), and TAG=s22n8s1 SET="train.seed=1 data.seed=1".
# Session 23: LANES=dn EXTRA=,needles=8 TAG=s23dn8 SET="train.seed=2 data.seed=2" (dense on that data;
# one call, then c8.sh with RUNS="dn:dense_rope:$V:1e-3:1::32" finishes it with RULER at 32 samples a depth).
# Session 14: EXTRA=,task_min=1024 TAG=s14; a second seed of session 12's recipe: SET="train.seed=1
# data.seed=1" TAG=s14seed1 LANES=b16 (SET is added to the overrides of every run).
# A run brought back from an earlier machine resumes from its newest checkpoint: put its
# c8_$TAG.tar.gz and ckpt_<lane>_<step>.tar.* parts in runs/cmp/ck before carrying runs/cmp.
# Tree, wheels and a 50 MB checkpoint exceed the 64 MiB carry: a first call carries runs/cmp
# alone with RESTORE_ONLY=1 (unpacks into /tmp and stops), the next, on the still-warm
# machine, carries runs/cmp (without ck) and .whl.
V=short_chars=4-8,short_steps=2000-1500,short_niah=0.45,steps=3000,niah=0.45,tile=1${EXTRA}
TAG=${TAG:-s12}
L_b16="b16:ssa_bounds:$V,block=16:1e-3:1::16+b16:ssa_yarn:$V,block=16:1e-3:4,16:-:8"
# Session 19: far blocks at bounded distances, LANES=fr EXTRA=,coarse_grad=1,short_coarse=0,far=80:
# evaluated beyond 4K without YaRN (no distance is unseen), then with it (mults 16,4 keep the file apart).
L_fr="fr:ssa_bounds:$V,block=16:1e-3:1::16+fr:ssa_bounds:$V,block=16:1e-3:4,16:-:8+fr:ssa_yarn:$V,block=16:1e-3:16,4:-:8"
L_dn="dn:dense_rope:$V:1e-3:1::16+dn:dense_yarn:$V:1e-3:4,16:-:8"
L_sl="sl:sliding:$V,block=16:1e-3:1::16+sl:sliding:$V,block=16:1e-3:4,16:-:8"
declare -A TRAINED=([fr]=ssa_bounds [b16]=ssa_bounds [dn]=dense_rope [sl]=sliding)
LANES=${LANES:-dn b16}; RUNS=""; for n in $LANES; do v=L_$n; RUNS="$RUNS ${!v}"; done
D=/tmp/c8_$TAG
if [ -f runs/cmp/ck/c8_$TAG.tar.gz ] && [ ! -d $D ]; then
  tar xzf runs/cmp/ck/c8_$TAG.tar.gz -C /tmp
  for p in runs/cmp/ck/ckpt_*.tar.aa; do cat ${p%aa}* | tar xf - -C $D; done
fi
[ -n "$RESTORE_ONLY" ] && { ls -R $D | grep -A1 checkpoints:; exit 0; }
mkdir -p $D
( while sleep 20; do for n in $LANES; do f=$D/$n/runs/${TRAINED[$n]}/lr0.001/metrics.jsonl; [ -f $f ] && cp $f $OUT/metrics_${TAG}_$n.jsonl; done; done ) > /dev/null 2>&1 &
LOOP=$!
RUNS="$RUNS" SET="train.checkpoint_every=100 $SET" TAG=$TAG TMO=${TMO:-560} bash runs/cmp/c8.sh
kill $LOOP
for n in $LANES; do
  c=$D/$n/runs/${TRAINED[$n]}/lr0.001/checkpoints; last=$(ls $c 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1)
  echo "$n newest checkpoint: $last"; cp $D/$n/runs/${TRAINED[$n]}/lr0.001/metrics.jsonl $OUT/metrics_${TAG}_$n.jsonl
  [ -n "$last" ] && [[ " $CKPT " == *" $n "* ]] && tar cf - -C $D $n/runs/${TRAINED[$n]}/lr0.001/checkpoints/$last | split -b 15M - $OUT/ckpt_${n}_$last.tar.
done

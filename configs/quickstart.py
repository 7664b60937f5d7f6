"""Quickstart: a small SSA model on stdlib code + associative recall, on 2 CPU cores.

  python -m experiments.train --config=configs/quickstart.py --workdir=runs/quickstart

Variants after the colon: `kind=dense|sliding|block_topk|indexer` (same model, same
tokens; only the mechanism changes), `seq_len=`, `steps=`, `extend=N` (a second stage:
`extend_steps` steps of 4 sequences of N tokens, evaluated at 1x and 4x of N), `smoke` (a
seconds-long run for tests).

Why this shape (experiments/results/quickstart_sweep/ has the measured curves):
- The task is Zoology's MQAR (a one-letter Greek key right before its one-digit value),
  with the queries scattered through code ("spread"), so at 4x and 16x the training
  length a query sits up to that far from its pair.
- `short_conv=4`: each attention layer's input is mixed with the 3 tokens before it, so
  the key at a value's position carries the key letter and one attention layer can
  recall. Without it neither SSA nor dense attention learned this task within ten CPU
  minutes; with it SSA passes 90% at step 300-600 (`quickstart_sweep/conv/`).
- `query_tile=1`: a query routes with its own query vector. A tile of Q > 1 routes with
  the Q queries ending at its first position (causal and decode-consistent), so a key
  read inside the tile cannot steer its own selection: with Q = 8 SSA did not learn this
  task at all, with Q = 1 it does.
- Blocks of 2 tokens, 16 routed, beam 16: a routed block is about one key-value pair, so
  the block's mean key is not diluted by its neighbours; the beam keeps 16 nodes a tree
  level (beam 4 levelled off near 90%). Each query attends to at most
  (1 sink + 16 routed + 1 local + own) x 2 = 38 keys (a dense row averages 128).
- Batches of 8 at 5e-3 for 1,100 steps: the step at which recall appears varies with
  the seed (300-600 steps at batch 8 or 16 alike), so smaller batches buy more steps
  for the same CPU time.
"""

from subq_jax.experiment import default_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, kind="ssa", smoke=False, seq_len=256, steps=1100, extend=0, extend_steps=300)
  c = default_config()
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim = 2, 128, 4, 2, 384
  m.short_conv = 4
  m.attention.kind = arg.kind
  m.dtype = "float32"  # XLA:CPU runs bfloat16 matmuls slower than float32
  m.attention.update(
    block_size=2, query_tile=1, top_k=16, fanout=4, beam=16, sink_blocks=1, local_blocks=1
  )
  c.data.mixture = {"code": 0.1, "mqar": 0.9}
  # Greek keys never occur in the code around them; each is two bytes.
  c.data.mqar.update(num_pairs=24, num_queries=24, key_len=1, value_len=1, separator="")
  c.data.mqar.update(key_alphabet="greek", layout="spread")
  c.train.update(batch_size=8, lr=5e-3, warmup_steps=100, checkpoint_every=250, log_every=25)
  c.train.answer_weight = 5.0  # the answers are a tenth of the tokens
  c.train.stages = [dict(seq_len=arg.seq_len, steps=arg.steps, rope_scale=1.0)]
  c.eval.update(tasks=["mqar"], multipliers=[1, 4, 16], num_samples=32)
  # Curriculum: recall at the short length first (experiments/results/curriculum_probe_cpu).
  if arg.extend:
    c.train.stages.append(dict(seq_len=arg.extend, steps=arg.extend_steps, batch_size=4))
    c.eval.multipliers = [1, 4]
  if arg.smoke:
    m.update(num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, mlp_dim=64)
    c.data.mqar.update(num_pairs=2, num_queries=1)
    c.train.update(batch_size=2, warmup_steps=1, checkpoint_every=2, log_every=1)
    c.train.stages = [dict(seq_len=128, steps=2, rope_scale=1.0)]
    c.eval.update(multipliers=[1, 2], num_samples=1)
  return c

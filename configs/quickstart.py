"""Quickstart: a small SSA model on stdlib code + NIAH + MQAR, on 2 CPU cores in < 10 min.

  python -m experiments.train --config=configs/quickstart.py --workdir=runs/quickstart

Variants after the colon: `kind=dense|sliding|block_topk|indexer` (same model, same
tokens; only the mechanism changes), `seq_len=`, `steps=`, `smoke` (a seconds-long run
for tests).
"""

from subq_jax.experiment import default_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, kind="ssa", smoke=False, seq_len=256, steps=1000)
  c = default_config()
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim = 2, 128, 4, 2, 384
  m.attention.kind = arg.kind
  m.dtype = "float32"  # XLA:CPU runs bfloat16 matmuls slower than float32
  # 256-token sequences of 32 blocks of 8: each query attends to the sink block, top_k=4
  # routed blocks, 1 local block and its own: at most 56 keys (a dense row averages 128).
  m.attention.update(block_size=8, top_k=4, fanout=4, beam=2, sink_blocks=1, local_blocks=1)
  c.data.mixture = {"code": 0.1, "niah": 0.2, "mqar": 0.7}
  c.data.niah.update(num_needles=3, num_queries=3, uuid_chars=4)
  # Zoology-style MQAR: one-letter keys right before one-digit values ("α1 β7 ... | β7"),
  # Greek letters so that keys never occur in the code around them.
  c.data.mqar.update(num_pairs=24, num_queries=24, key_len=1, value_len=1, separator="")
  c.data.mqar.key_alphabet = "greek"
  c.train.update(batch_size=16, lr=3e-3, warmup_steps=100, checkpoint_every=250, log_every=25)
  c.train.answer_weight = 5.0  # retrieval answers are a few % of the tokens
  c.train.stages = [dict(seq_len=arg.seq_len, steps=arg.steps, rope_scale=1.0)]
  c.eval.update(multipliers=[1, 4, 16], num_samples=32)
  if arg.smoke:
    m.update(num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, mlp_dim=64)
    c.data.niah.update(num_needles=1, num_queries=1)
    c.data.mqar.update(num_pairs=2, num_queries=1)
    c.train.update(batch_size=2, warmup_steps=1, checkpoint_every=2, log_every=1)
    c.train.stages = [dict(seq_len=128, steps=2, rope_scale=1.0)]
    c.eval.update(multipliers=[1, 2], num_samples=1)
  return c

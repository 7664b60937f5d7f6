"""One H100: a ~25M-parameter SSA model, context extended 8K -> 32K with YaRN.

  python -m experiments.train --config=configs/gpu.py --workdir=runs/gpu

Stage 1 trains 8K-token sequences; stage 2 continues at 32K (same tokens per step) with
RoPE scaled by YaRN (s = 4 over the 8K original length, attention temperature
0.1 ln s + 1). Variants: `kind=` as in ablation.py, `smoke` (tiny, for tests).
"""

from subq_jax.experiment import default_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, kind="ssa", steps=3000, smoke=False)
  c = default_config()
  m = c.model
  m.update(num_layers=8, d_model=512, num_heads=8, num_kv_heads=4, mlp_dim=1536)
  m.update(dtype="bfloat16", remat="dots", rope_theta=10_000.0)
  # 64-token blocks, 8 routed: 11 * 64 = 704 keys per query (8.6% of a dense row at 8K,
  # 2.1% at 32K).
  m.attention.update(
    kind=arg.kind, block_size=64, top_k=8, fanout=16, beam=4, sink_blocks=1, local_blocks=1
  )
  c.data.mixture = {"code": 0.6, "niah": 0.2, "mqar": 0.2}
  c.data.niah.update(num_needles=8, num_queries=4, uuid_chars=36)
  c.data.mqar.update(num_pairs=128, num_queries=64)
  c.data.update(num_threads=4, prefetch=8)
  c.train.update(batch_size=8, lr=1e-3, warmup_steps=min(300, arg.steps // 10))
  c.train.update(checkpoint_every=500, log_every=50)
  long_steps = max(arg.steps // 5, 1)
  c.train.stages = [
    dict(seq_len=8192, steps=arg.steps - long_steps, rope_scale=1.0, batch_size=8),
    dict(seq_len=32768, steps=long_steps, rope_scale=4.0, batch_size=2),
  ]
  c.eval.update(multipliers=[1, 2, 4], num_samples=16, yarn=True)
  if arg.smoke:
    m.update(num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, mlp_dim=64, dtype="float32")
    m.update(remat="full")
    m.attention.update(block_size=8, top_k=2, fanout=4, beam=1)
    c.data.niah.update(num_needles=1, num_queries=1, uuid_chars=8)
    c.data.mqar.update(num_pairs=2, num_queries=1)
    c.data.update(num_threads=1, prefetch=2)
    c.train.update(batch_size=2, warmup_steps=1, checkpoint_every=1, log_every=1)
    c.train.stages = [
      dict(seq_len=64, steps=1, rope_scale=1.0, batch_size=2),
      dict(seq_len=128, steps=1, rope_scale=2.0, batch_size=1),
    ]
    c.eval.update(multipliers=[1], num_samples=0)
  return c

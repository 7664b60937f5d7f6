"""The recipe sweep behind configs/quickstart.py: one variant string per run.

  python -m experiments.train --workdir=DIR \
    --config=configs/quickstart_sweep.py:kind=ssa,qt=1,B=2,topk=16,beam=4,lay=spread

The 24 runs, their variant strings and their learning curves (measured on one H100, the
model in float32 through the `xla` attention path, as on CPU) are in
experiments/results/quickstart_sweep/. Knobs: kind, steps, d (d_model; mlp 3d), L (layers),
T (seq_len), bs, lr, qt (query_tile; 0 = block_size), B (block_size), topk, fan (fanout),
beam, summ (summary), rr (route_with_rope), mix (niah | mqar: 90% of samples, the rest
code), nd (NIAH needles = queries), uc (UUID chars), npairs (MQAR pairs = queries),
lay (MQAR layout), aw (answer weight), impl (attention implementation), conv
(short_conv), seed (parameter init), dseed (data), ns (evaluation samples per
length), smoke. The second sweep (short convolutions, seeds) is in the `conv/` folder there.
"""

from subq_jax.experiment import default_config, parse_arg


def get_config(arg=None):
  a = parse_arg(
    arg, kind="ssa", steps=2000, d=128, L=2, T=256, bs=16, lr=3e-3, qt=0, mix="mqar", nd=3,
    uc=4, npairs=24, aw=5.0, B=8, topk=4, impl="xla", summ="mean", rr=True, fan=4, beam=2,
    lay="block", conv=0, seed=0, dseed=0, ns=16, smoke=False,
  )  # fmt: skip
  c = default_config()
  m = c.model
  m.update(num_layers=a.L, d_model=a.d, num_heads=4, num_kv_heads=2, mlp_dim=3 * a.d)
  m.update(dtype="float32", attention_impl=a.impl, short_conv=a.conv)
  m.attention.update(
    kind=a.kind, block_size=a.B, query_tile=a.qt or None, top_k=a.topk, fanout=a.fan,
    beam=a.beam, summary=a.summ, route_with_rope=a.rr, sink_blocks=1, local_blocks=1,
  )  # fmt: skip
  if a.mix not in ("niah", "mqar"):
    raise ValueError(f"mix={a.mix!r} is not one of ('niah', 'mqar')")
  c.data.mixture = {"code": 0.1, a.mix: 0.9}
  c.data.niah.update(num_needles=a.nd, num_queries=a.nd, uuid_chars=a.uc)
  c.data.mqar.update(num_pairs=a.npairs, num_queries=a.npairs, key_len=1, value_len=1)
  c.data.mqar.update(separator="", key_alphabet="greek", layout=a.lay)
  c.train.update(batch_size=a.bs, lr=a.lr, warmup_steps=min(100, a.steps // 5))
  c.train.seed, c.data.seed = a.seed, a.dseed
  c.train.update(log_every=20, checkpoint_every=100_000, answer_weight=a.aw)
  c.train.stages = [dict(seq_len=a.T, steps=a.steps, rope_scale=1.0)]
  c.eval.update(tasks=["niah", "mqar"], multipliers=[1, 4, 16], num_samples=a.ns)
  if a.smoke:
    m.update(num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, mlp_dim=64)
    c.data.niah.update(num_needles=1, num_queries=1, uuid_chars=4)
    c.data.mqar.update(num_pairs=2, num_queries=2)
    c.train.update(batch_size=2, warmup_steps=1, log_every=1)
    c.train.stages = [dict(seq_len=64, steps=2, rope_scale=1.0)]
    c.eval.update(multipliers=[1], num_samples=0)
  return c

"""The ablation grid: one model size and token budget, one attention mechanism per run.

  python -m experiments.train --config=configs/ablation.py:kind=ssa --workdir=runs/abl_ssa
  ... kind=dense | sliding | block_topk | indexer, or mix=4 (SSA with every 4th layer dense)
  ... summary=bounds (SSA / block_topk route by min/max bounds), yarn (evaluate beyond the
  training length with YaRN-scaled RoPE; training unchanged), steps=N (4096-token steps,
  default 200; 1 with smoke), short=N, short_steps=, short_batch= (the short stage;
  short=0 trains at 4096 from the start), short_niah= (the short stage's NIAH share, the
  rest MQAR and 10% code), short_chars= (the short stage's NIAH key and value length;
  empty or 0 = the 4096 stage's 8; a ladder such as `4-8` makes one short stage per
  length, with `short_steps=2000-1500` steps each or one count for all), short_together
  (the short stages' needles one after another at one depth, as MQAR's pairs: on the CPU
  learned earlier than scattered needles, but a together-first run then stalled at half
  the answer, experiments/results/niah_probe_cpu/), niah= (the 4096 stage's NIAH share,
  default 0.15, taken from MQAR's 0.45), tile= (query_tile of the routed kinds, default 1),
  block= (block_size, default 64; a divisor of 64: the sink is one block, the local window
  64 tokens, top_k fills the 448 keys, e.g. block=16 routes among 16-token leaves with
  top_k=22, DESIGN.md section 1.7), short_ruler= (the short stages' share of RULER-format
  samples, default 0, taken from MQAR: the `SHORT_RULER_TASKS` whose fixed text fits 512
  tokens, so the question-to-needle lookup of RULER's prompts is learned where the
  training format's was), task_min= (`data.task_min_len`: the 4096 stage's task samples
  are built at a length in [task_min, 4096] and placed anywhere among code, so their
  queries are not always at the sequence's end; default 0, full length), short_top_k= (the
  short stages' top_k, `Stage.attention`; default 0, the 4096 stage's: at 512 tokens its
  448 keys cover nearly every key, so routing decides nothing there; e.g. short_top_k=2
  with block=16 attends to 128 of 512 keys), convert= (the last N steps of the 4096 stage
  run with `kind`, every step before with dense attention: a dense model converted, as SubQ
  converted an open-weight one; default 0, `kind` throughout), coarse_grad= (`ssa` and
  `block_topk`: weight of the coarse branch's gradient, `SSAConfig.coarse_grad`: every
  query also attends to all its routable blocks' summaries, for the gradient only, so
  keys that routing never selects learn to be selected; default 0, off; dense stages of
  `convert` run without it), short_coarse= (whether the short stages use coarse_grad too;
  default 1; `short_coarse=0` keeps it to the 4096 stage, where SSA attends 448 of 4,096
  keys, rather than the 512-token stages, where it attends 448 of 512), far= (block kinds:
  `SSAConfig.far_distance` in tokens, default 0, off; e.g. far=80 with block=16 puts
  every sink and chosen block right past the 64 local tokens and the own block, whatever
  its true distance: no RoPE distance beyond 95 at any length; dense stages without it),
  needles= (the 4096 stages' NIAH needles a sample, each queried once; default 0, the
  model's 4 needles and 4 queries, which the evaluation's training-format cells keep: more
  needles in training than in evaluation, so that keys are told apart from more
  distractors than the evaluation shows)

`python -m experiments.compare_mechanisms` trains every mechanism of this grid over a
small learning-rate sweep and evaluates each at 1x, 4x and 16x the training length.

Only `model.attention.kind` (and that kind's own knobs) changes between runs. Every sparse
kind attends to the same (sink + top_k + local + 1) * block_size = 448 keys per query
(`SSAConfig.keys_per_query`), 11% of a dense row at the 4K training length. Sized for one
GPU (4.6M parameters, `batch` x 4096 tokens a step); `smoke` shrinks it for tests.

What the quickstart taught (configs/quickstart.py, experiments/results/quickstart_sweep/):
- `short_conv=4`: each attention input mixes in the 3 tokens before it, so a value's
  position carries its key and one layer can recall.
- `query_tile=1`: a tile of Q > 1 routes with the queries that end at its first
  position, so a key read inside the tile cannot steer the tile's own selection. Measured
  at 4K (experiments/results/compare_h100_tile1/): with tiles of 4 no sparse kind kept
  MQAR recall; with tiles of 1 (the GPU kernels repeat each KV head's 4 query heads up to
  their 16-row minimum) ssa_bounds reaches MQAR 0.90, dense 0.77 on the same recipe.
- `beam=16`: a beam of 4 levelled off below 90% recall.
The data: the quickstart's MQAR (45%), the `ruler` source (25%: the RULER families of the
evaluation, built at the training length from the training split), the training-format
NIAH with 8-character keys (15%) and code (15%); answer tokens weigh 5x in the loss.
No mechanism learns that NIAH here (dense included); at 512 tokens with half the batch
NIAH, 4-character keys were learned by step 1,600 (0.8 a token) and 8-character ones not
in 2,000 steps (`short_niah=0.5`, `--config.data.niah.uuid_chars=4`). A key-length ladder
does teach it (experiments/results/niah_recipe_h100/):
`short_chars=4-8,short_steps=2000-1500,short_niah=0.45,steps=2000,niah=0.3` gave NIAH
0.91 exact at 4K for dense, 0.52 for ssa_bounds and 0.88 for ssa_bounds with `block=16`
(0.66 at 16x with YaRN, dense 0.64); `steps=3000,niah=0.45` gave dense 0.98 and
ssa_bounds with `block=16` 0.94 (0.86 and 0.81 at 16x with YaRN), while RULER's
formats stayed near 0.10 for both: the lookup from RULER's question is not learned.
`short_ruler=0.2` learns it (RULER niah_single_1 1.00 for dense and SSA, average 0.42 /
0.41), but in that training SSA's own NIAH fell to 0.80 at 4K and 0.17 at 16x (one
training; session 13 of the results README). `task_min=1024` keeps NIAH below 4K (SSA
0.63 at 1,024 tokens, 0.00 without) but gave 0.83 at 4K and 0.42 at 16x; a second seed
of the `steps=3000` recipe (`--set=train.seed=1 --set=data.seed=1`) lost MQAR at 4K and
reached NIAH 0.08, so single trainings do not rank these recipes (sessions 14-15).
`convert=1000` kept MQAR at 1.00 for both seeds (NIAH 0.75 and 0.86 at 4K, 0.19 and 0.53
at 16x); `short_top_k=2` learned no lookup at 512 tokens in 3,500 steps (session 15).
`coarse_grad=1` let seed 1 relearn MQAR at 4K (0.96 at 1x, NIAH 0.44); its seed 0 never
learned NIAH at 512 tokens (session 16). `coarse_grad=1,short_coarse=0` (the gradient in
the 4096 stage only) lost MQAR with no seed of three and gave NIAH 0.98 / 0.89 / 0.89 at
4K, 0.70 / 0.69 / 0.55 at 16x with YaRN (sessions 17-18). Adding `far=80` (far blocks
at bounded distances, no YaRN) gave seeds 0 / 1 / 2 NIAH 0.988 / 0.980 / 0.973 at 4K and
0.992 / 0.965 / 0.965 at 16x (n = 256 each), 1.00 at 1,048,576 tokens (seeds 0, 2; n =
32); MQAR 0.99 at 4K for seeds 1 and 2, 0.90 for seed 0 (sessions 19-20). `steps=4000`
did not lift seed 2 (0.969 at 4K); dense on the same data reached 0.957 at 4K and 0.18
on RULER (SSA 0.61): both miss by reading another needle, and read one needle alone
without a miss (session 21). `needles=8` (eight needles a 4K NIAH sample, four at
evaluation) lifted NIAH at 4K to 0.990 (seed 2) and 1.000 (seed 1), n = 512 each, and
seed 2 to 0.982 at 16x; RULER average 0.55 and 0.61 (session 22). Dense on the
`needles=8` data (seeds 2, 1): NIAH 0.984 / 0.996 at 4K, RULER 0.18 / 0.47 (SSA 0.55 / 0.61);
SSA seed 1 1.000 at 16x, n = 512 (session 23).

The schedule is a curriculum (experiments/results/compare_h100_curriculum/): 1,200 steps
of 16 x 512 tokens, 80% MQAR with the pairs from the start, then 4096 tokens. Trained at
4096 from the start, or at 512 with lr 3e-3 or 5e-3, no mechanism (dense included) left
chance on MQAR; at 512 with lr 1e-3 every mechanism passes 0.75 by step 600, with 5e-4
by step 800, with 2e-3 only the indexer (by step 1,000). Then 200 steps of 16 x 4096.
"""

from subq_jax.experiment import default_config, parse_arg

# The RULER-format tasks of the training mixture whose fixed text (instructions, needle,
# question, answer room) fits a 512-token short stage; the others need 640 to 768.
SHORT_RULER_TASKS = ("niah_single_1", "niah_single_2", "vt")


def get_config(arg=None):
  arg = parse_arg(
    arg,
    kind="ssa",
    mix=0,
    summary="mean",
    yarn=False,
    steps=0,
    batch=16,
    short=512,
    short_steps="1200",
    short_batch=16,
    short_niah=0.1,
    short_chars="",
    short_together=False,
    short_ruler=0.0,
    task_min=0,
    short_top_k=0,
    convert=0,
    coarse_grad=0.0,
    short_coarse=True,
    far=0,
    needles=0,
    niah=0.15,
    tile=1,
    block=64,
    smoke=False,
  )
  c = default_config()
  m = c.model
  m.update(num_layers=6, d_model=256, num_heads=8, num_kv_heads=2, mlp_dim=768, remat="none")
  m.short_conv = 4
  if arg.block < 1 or 64 % arg.block:
    raise ValueError(f"block={arg.block} must divide 64 (the local window in tokens)")
  local = 64 // arg.block  # 448 keys: one sink block, 64 local tokens, the own block, top_k
  top_k = 448 // arg.block - 1 - local - 1
  m.attention.update(kind=arg.kind, block_size=arg.block, query_tile=arg.tile, top_k=top_k)
  m.attention.update(fanout=8, beam=16, sink_blocks=1, local_blocks=local)
  m.attention.summary = arg.summary
  m.attention.coarse_grad = float(arg.coarse_grad)  # SSAConfig checks value and kind
  m.attention.far_distance = arg.far  # and this
  if arg.kind == "indexer":
    m.attention.update(indexer_heads=4, indexer_dim=32)
  if arg.mix:
    m.attention_pattern = [arg.kind] * (arg.mix - 1) + ["dense"]
  if not 0 <= arg.niah <= 0.6:
    raise ValueError(f"niah={arg.niah} must be in [0, 0.6]")
  c.data.mixture = {"code": 0.15, "niah": arg.niah, "mqar": round(0.6 - arg.niah, 6), "ruler": 0.25}
  c.data.niah.update(num_needles=4, num_queries=4, uuid_chars=8)
  if arg.task_min < 0:
    raise ValueError(f"task_min={arg.task_min} must be >= 0")
  c.data.task_min_len = arg.task_min  # 512 or more leaves the 512-token stages whole
  if not isinstance(arg.short_top_k, int) or arg.short_top_k < 0:
    raise ValueError(f"short_top_k={arg.short_top_k!r} must be an integer >= 0")
  if not arg.short_coarse and not (arg.coarse_grad and arg.short and not arg.convert):
    raise ValueError(
      f"short_coarse=0 has no effect with coarse_grad={arg.coarse_grad}, short={arg.short}, "
      f"convert={arg.convert} (it needs coarse_grad > 0, short > 0 and convert=0)"
    )
  # The quickstart's MQAR: one-letter Greek keys (never in the code around them), one
  # digit values, queries spread through the sequence (distance grows with the length); the
  # pairs start anywhere in the first half, out of the sink block.
  c.data.mqar.update(num_pairs=24, num_queries=24, key_len=1, value_len=1, separator="")
  c.data.mqar.update(key_alphabet="greek", layout="spread", pairs_at=0.5)
  c.train.update(batch_size=arg.batch, lr=1e-3, checkpoint_every=500, log_every=50)
  c.train.answer_weight = 5.0
  steps = arg.steps or 200
  c.train.stages = [dict(seq_len=4096, steps=steps, rope_scale=1.0)]
  if not isinstance(arg.convert, int) or not 0 <= arg.convert <= steps:
    raise ValueError(f"convert={arg.convert!r} must be an integer in [0, steps={steps}]")
  if arg.convert:
    if arg.kind in ("dense", "indexer") or arg.mix:
      raise ValueError(
        f"convert={arg.convert} converts a dense model to a kind without parameters of its "
        f"own, one for every layer: kind={arg.kind!r}, mix={arg.mix} cannot"
      )
    if arg.short_top_k:
      raise ValueError(f"short_top_k={arg.short_top_k} has no effect with convert (dense)")
    if arg.convert == steps and not arg.short:
      raise ValueError(f"convert={arg.convert} with short=0 leaves no dense step (steps={steps})")
    dense = dict(seq_len=4096, steps=steps - arg.convert, rope_scale=1.0)
    dense["attention"] = dict(kind="dense", coarse_grad=0.0, coarse_nodes="blocks", far_distance=0)
    c.train.stages = [dense, dict(seq_len=4096, steps=arg.convert, rope_scale=1.0)]
    c.train.stages = [s for s in c.train.stages if s["steps"]]
  if not isinstance(arg.needles, int) or arg.needles < 0:
    raise ValueError(f"needles={arg.needles!r} must be an integer >= 0 (0 = the model's 4)")
  if arg.needles:
    for stage in c.train.stages:  # every stage is a 4096 one here; short ones come next
      stage.setdefault("data", {})["niah"] = dict(num_needles=arg.needles, num_queries=arg.needles)
  if arg.short:  # curriculum: recall at a short length first, then 4096
    # Mostly MQAR, pairs from the start (RULER's fixed text does not fit 512 tokens).
    if not 0 <= arg.short_niah <= 0.9:
      raise ValueError(f"short_niah={arg.short_niah} must be in [0, 0.9]")
    try:
      chars = [int(n) for n in str(arg.short_chars).split("-") if n] or [0]
      steps_each = [int(n) for n in str(arg.short_steps).split("-")]
    except ValueError:
      raise ValueError(
        f"short_chars={arg.short_chars!r} and short_steps={arg.short_steps!r} must be "
        "integers joined by '-', e.g. short_chars=4-8,short_steps=2000-1500"
      ) from None
    if len(steps_each) == 1:
      steps_each *= len(chars)
    if len(steps_each) != len(chars):
      raise ValueError(
        f"short_steps={arg.short_steps!r} needs one count or one per "
        f"short_chars={arg.short_chars!r}"
      )
    if not 0 <= arg.short_ruler <= round(0.9 - arg.short_niah, 6):
      raise ValueError(
        f"short_ruler={arg.short_ruler} must be in [0, 0.9 - short_niah={arg.short_niah}]"
      )
    if arg.short_ruler and arg.short < 512:
      raise ValueError(f"short_ruler={arg.short_ruler} needs short >= 512, got short={arg.short}")
    mqar = round(0.9 - arg.short_niah - arg.short_ruler, 6)
    mixture = {"code": 0.1, "niah": arg.short_niah, "mqar": mqar}
    if arg.short_ruler:
      mixture["ruler"] = arg.short_ruler
    for n, k in reversed(list(zip(chars, steps_each, strict=True))):
      short = dict(seq_len=arg.short, steps=k, batch_size=arg.short_batch)
      short["data"] = dict(mixture=mixture, mqar=dict(pairs_at=0.0))
      attention = {}
      if arg.short_top_k:
        attention["top_k"] = arg.short_top_k
      if not arg.short_coarse:
        attention["coarse_grad"] = 0.0
      if arg.convert:
        attention = dict(kind="dense", coarse_grad=0.0, coarse_nodes="blocks", far_distance=0)
      if attention:
        short["attention"] = attention
      if arg.short_ruler:
        short["data"]["ruler_tasks"] = SHORT_RULER_TASKS
      niah = dict(uuid_chars=n) if n else {}
      if arg.short_together:
        niah["together"] = True
      if niah:
        short["data"]["niah"] = niah
      c.train.stages.insert(0, short)
  c.train.warmup_steps = min(200, sum(s["steps"] for s in c.train.stages) // 10)
  c.eval.update(multipliers=[1, 4, 16], num_samples=32, yarn=arg.yarn)
  if arg.smoke:
    m.update(num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, mlp_dim=64, dtype="float32")
    m.attention.update(block_size=8, query_tile=None, top_k=2, fanout=2, beam=1)
    c.data.mixture = {"code": 0.5, "niah": 0.25, "mqar": 0.25}  # RULER prompts exceed 128
    c.data.niah.update(num_needles=1, num_queries=1, uuid_chars=8)
    c.data.mqar.update(num_pairs=2, num_queries=1)
    c.train.update(batch_size=2, warmup_steps=1, checkpoint_every=1, log_every=1)
    c.train.stages = [dict(seq_len=128, steps=arg.steps or 1, rope_scale=1.0)]
    c.eval.update(multipliers=[1], num_samples=0)
  return c

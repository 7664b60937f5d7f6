"""Training-format NIAH at 4096 tokens with 1, 4 or 8 needles a sequence (CPU, teacher-forced).

Session 21 found the 1x misses of SSA and dense alike to be reads from another needle's
value. If so, one needle alone (nothing to confuse it with) is read without a miss, and 8
needles (the training format has 4) miss more. Each count is asked with every needle
queried, on the validation split, samples seeded as `experiments.evaluate` seeds them;
the misses field says which wrong tokens belong to another needle.

  PYENV_VERSION=3.12.1 .venv/bin/python \
    experiments/results/niah_recipe_h100/needle_count_probe.py <run workdir> NEEDLES:SEQUENCES ...
  e.g. ... <workdir> 1:128 8:32
"""

import dataclasses
import sys
import time

import jax

from subq_jax import evaluate

workdir, specs = sys.argv[1], sys.argv[2:]
counts = []  # (needles, sequences), checked before the checkpoint loads
for spec in specs:
  try:
    counts.append(tuple(int(x) for x in spec.split(":")))
  except ValueError:
    counts.append(())
  if len(counts[-1]) != 2 or min(counts[-1]) < 1:
    raise SystemExit(f"spec {spec!r} is not NEEDLES:SEQUENCES, two positive integers (e.g. 8:32)")
params, model_cfg, cfg, step = evaluate.load_checkpoint(workdir)
train_len = cfg.train.stages[-1].seq_len
print(f"{workdir} step {step}, {jax.devices()[0].platform}, jax {jax.__version__}")
for needles, sequences in counts:
  niah = dataclasses.replace(cfg.data.niah, num_needles=needles, num_queries=needles)
  suite = evaluate.SuiteConfig(
    tasks=(), lengths=(train_len,), train_tasks=("niah",), train_samples=sequences
  )
  t0 = time.time()
  (cell,) = evaluate.suite_eval(
    params,
    model_cfg,
    train_len,
    suite,
    tokenizer=cfg.data.make_tokenizer(),
    corpus_root=cfg.data.corpus_root,
    val_fraction=cfg.data.val_fraction,
    data_cfg=dataclasses.replace(cfg.data, niah=niah),
    log=lambda *_: None,
  )
  m = cell["misses"]
  print(
    f"{needles} needle(s), {sequences} sequences: NIAH {cell['mean']:.3f} "
    f"[{cell['lo']:.3f}, {cell['hi']:.3f}] (n={cell['n']}); misses {m['n']}"
    + (
      f", another needle's token {m['other_answer']:.2f} (if uniform "
      f"{m['other_answer_if_uniform']:.2f}), first wrong position {m['first_wrong']}, "
      f"queries {[r['query'] for r in m['records']]}"
      if m["n"]
      else ""
    )
    + f"; {time.time() - t0:.0f} s",
    flush=True,
  )

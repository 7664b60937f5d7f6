"""Training-format NIAH of a 4K checkpoint at and below its training length (CPU, teacher-forced).

Does a model trained last at 4096 tokens find needles in shorter sequences? Four probes,
exact match of the 8-character value (16 queries a cell):
1. the training format (4 needles) at 512 ... 4096 tokens, with the first character's
   accuracy (finding the value) beside the exact match;
2. one needle at 4096 tokens at a fixed depth: is it the needle's distance from the query?
3. one needle in a 1,024-token sample, alone or after 1,024 / 3,072 tokens of unrelated
   code: is it the query's position in the sequence? The same weights run with their own
   attention kind and with dense attention (every key), to tell routing from the rest.
4. the training formats of NIAH and MQAR at 4096 tokens (8 samples each), with the model's
   own attention and with dense attention on the same weights: is a loss the routing's?
5. as 4, with SSA at 448 keys (16-token blocks, top_k 22, 4 local blocks, one sink block;
   bounds and mean summaries) on the same weights: does a dense-trained model route?

  PYENV_VERSION=3.12.1 .venv/bin/python \
    experiments/results/niah_recipe_h100/short_context_probe.py <run workdir> [parts: 1 2 3 4 5]
"""

import dataclasses
import sys

import jax
import numpy as np

from subq_jax import evaluate
from subq_jax.data import corpus, tasks

workdir = sys.argv[1]
parts = {int(p) for p in sys.argv[2:]} or {1, 2, 3, 4, 5}
params, model_cfg, cfg, step = evaluate.load_checkpoint(workdir)
tok = cfg.data.make_tokenizer()
stream = corpus.token_stream(tok, "validation", cfg.data.val_fraction, cfg.data.corpus_root)
print(f"{workdir} step {step}, {jax.devices()[0].platform}, jax {jax.__version__}")
one = dataclasses.replace(cfg.data.niah, num_needles=1, num_queries=1)


def score(runner, samples):
  """(exact match, first character right) per query of `samples` [(tokens, answer_mask)]."""
  exact, first = [], []
  for i in range(0, len(samples), 2):
    pair = samples[i : i + 2]
    pred, _ = runner.teacher_forced(np.stack([t[:-1] for t, _ in pair]))
    for row, (t, mask) in zip(pred, pair, strict=True):
      for a, b in evaluate.answer_spans(mask[1:]):
        exact.append(np.all(row[a:b] == t[1:][a:b]))
        first.append(row[a] == t[1 + a])
  return float(np.mean(exact)), float(np.mean(first)), len(exact)


def runner_of(kind, **changes):
  """A runner of the checkpoint's weights with every layer's attention of `kind`."""
  attention = dataclasses.replace(model_cfg.attention, kind=kind, **changes)
  return evaluate._Runner(params, dataclasses.replace(model_cfg, attention=attention))


def part1():
  print("1. training format (4 needles at random depths)")
  runner = evaluate._Runner(params, model_cfg)
  for length in (512, 1024, 2048, 3072, 4096):
    samples = []
    for i in range(4):
      s = tasks.niah(np.random.default_rng([1, i]), tok, stream, length + 1, cfg.data.niah)
      samples.append((s.tokens, s.answer_mask))
    exact, first, n = score(runner, samples)
    print(f"  {length:5d} tokens: exact {exact:.3f}, first character {first:.3f} (n={n})")


def part2():
  print("2. one needle at 4096 tokens, by depth")
  runner = evaluate._Runner(params, model_cfg)
  for depth in (0.0, 0.5, 0.9, 0.99):
    samples = []
    for i in range(16):
      s = tasks.niah(np.random.default_rng([2, i]), tok, stream, 4097, one, depths=[depth])
      samples.append((s.tokens, s.answer_mask))
    exact, first, n = score(runner, samples)
    print(f"  depth {depth:.2f}: exact {exact:.3f}, first character {first:.3f} (n={n})")


def part3():
  print("3. one needle in a 1024-token sample after unrelated code")
  for kind in (model_cfg.attention.kind, "dense"):
    runner = runner_of(kind)
    for before in (0, 1024, 3072):
      samples = []
      for i in range(16):
        s = tasks.niah(np.random.default_rng([3, i]), tok, stream, 1025, one)
        code = tasks.code_window(np.random.default_rng([4, i]), stream, before)
        pad = np.zeros(before, bool)
        samples.append((np.concatenate([code, s.tokens]), np.concatenate([pad, s.answer_mask])))
      exact, first, n = score(runner, samples)
      where = f"{kind:5s}, {before:4d} code tokens before"
      print(f"  {where}: exact {exact:.3f}, first {first:.3f} (n={n})")


def training_formats(runners):
  for label, runner in runners:
    for name, make, task_cfg in (
      ("niah", tasks.niah, cfg.data.niah),
      ("mqar", tasks.mqar, cfg.data.mqar),
    ):
      samples = []
      for i in range(8):
        s = make(np.random.default_rng([5, i]), tok, stream, 4097, task_cfg)
        samples.append((s.tokens, s.answer_mask))
      exact, first, n = score(runner, samples)
      print(f"  {label:5s} {name}: exact {exact:.3f}, first {first:.3f} (n={n})")


def part4():
  print("4. training formats at 4096 tokens: the model's attention, then dense on the same weights")
  training_formats([(kind, runner_of(kind)) for kind in (model_cfg.attention.kind, "dense")])


def part5():
  print("5. training formats at 4096 tokens with SSA at 448 keys on the same weights")
  ssa = dict(block_size=16, top_k=22, local_blocks=4, sink_blocks=1, query_tile=1)
  training_formats([(s, runner_of("ssa", summary=s, **ssa)) for s in ("bounds", "mean")])


for p in sorted(parts):
  (part1, part2, part3, part4, part5)[p - 1]()

"""Teacher-forced accuracy of each answer character of RULER-format NIAH tasks at 4K.

Which part of a RULER needle does a checkpoint miss: the first digit (finding the needle
from the key in the question) or the ones after it (copying)? Samples: seeds [7, i],
depths 0 / 0.5 / 1 in turn, haystacks from the validation split.

  PYENV_VERSION=3.12.1 .venv/bin/python experiments/results/niah_recipe_h100/ruler_by_position.py \
    <run workdir with config.json and checkpoints/> 24 niah_single_1,niah_single_2
"""

import collections
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from subq_jax import evaluate
from subq_jax.data import ruler
from subq_jax.model import Transformer

workdir, n, names = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
params, model_cfg, cfg, step = evaluate.load_checkpoint(workdir)
tok = cfg.data.make_tokenizer()
graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
forward = jax.jit(lambda p, t: jnp.argmax(nnx.merge(graphdef, p)(t), -1))
source = ruler.Source(tok, "validation", cfg.data.val_fraction, cfg.data.corpus_root)
print(f"{workdir} step {step}, {jax.devices()[0].platform}, jax {jax.__version__}")
for name in names:
  rows, first = [], collections.Counter()
  for i in range(n):
    task = ruler.generate(name, 4096, seed=[7, i], source=source, depth=[0.0, 0.5, 1.0][i % 3])
    sample = task.to_sample(tok, 4097)
    pred = np.asarray(forward(params, jnp.asarray(sample.tokens[None, :-1])))[0]
    target, mask = sample.tokens[1:], sample.answer_mask[1:]
    for a, b in evaluate.answer_spans(mask):
      rows.append(pred[a:b] == target[a:b])
      first[tok.decode(pred[a : a + 1].tolist())] += 1
  width = min(len(r) for r in rows)
  by_pos = np.mean([r[:width] for r in rows], 0)
  exact = np.mean([r.all() for r in rows])
  print(
    f"{name}: n={len(rows)} exact {exact:.2f}, by position {np.round(by_pos, 2).tolist()}, "
    f"first character predicted {first.most_common(4)}"
  )

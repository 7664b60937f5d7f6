"""NIAH accuracy conditional on the needle block being attended, per query (session 10).

  python experiments/results/niah_probe_cpu/s10_apart_1800/conditional_accuracy.py WORKDIR OUT_DIR

from the repository root with PYTHONPATH=. ; uses subq_jax.evaluate internals (the same
samples, seeds and scoring as the training-format cells of experiments/evaluate)."""

import json
import sys

import numpy as np

from subq_jax import evaluate
from subq_jax.data import corpus
from subq_jax.data.pipeline import make_sample

workdir, out = sys.argv[1], sys.argv[2]
params, model_cfg, cfg, _ = evaluate.load_checkpoint(workdir)
tok = cfg.data.make_tokenizer()
stream = corpus.token_stream(tok, "validation", cfg.data.val_fraction, cfg.data.corpus_root)
train_len = cfg.train.stages[-1].seq_len
res = {}
for yarn in (False, True):
  for mult in (1, 4, 16):
    length = mult * train_len
    mcfg = evaluate.eval_model_config(model_cfg, train_len, length, yarn)
    runner = evaluate._Runner(params, mcfg)
    layers = [mcfg.layer_attention(i) for i in range(mcfg.num_layers)]
    rows = []  # (correct, attended per layer)
    for i0 in range(0, 32, 8):
      seqs = [
        make_sample(
          cfg.data, tok, stream, length, np.random.default_rng([0, 7, 0, i]), "niah", needle_at=True
        )
        for i in range(i0, i0 + 8)
      ]
      tokens = evaluate._pad_rows(
        [c["tokens"][:-1] for c in seqs], runner.cache_len(length), 8, tok.pad_id
      )
      pred, _ = runner.teacher_forced(tokens)
      sel = runner.selections(tokens)
      for j, c in enumerate(seqs):
        target = c["tokens"][1:]
        spans = evaluate.answer_spans(c["answer_mask"][1:])
        hits = np.stack(
          [
            evaluate.needle_block_attended(spans, c["needle_at"], s[j], a)
            for s, a in zip(sel, layers, strict=True)
          ],
          1,
        )
        for (a, b), h in zip(spans, hits, strict=True):
          rows.append((float(np.all(pred[j, a:b] == target[a:b])), h.tolist()))
    ok = np.array([r[0] for r in rows])
    h = np.array([r[1] for r in rows])
    anyh = h.max(1) > 0
    key = f"{'yarn' if yarn else 'rope'} {mult}x"
    res[key] = {
      "n": len(rows),
      "accuracy": ok.mean(),
      "attended_by_layer": h.mean(0).tolist(),
      "attended_any_layer": anyh.mean(),
      "accuracy_if_attended_any": ok[anyh].mean() if anyh.any() else None,
      "n_attended": int(anyh.sum()),
      "accuracy_if_not": ok[~anyh].mean() if (~anyh).any() else None,
      "n_not": int((~anyh).sum()),
      "accuracy_if_layer0": ok[h[:, 0] > 0].mean() if (h[:, 0] > 0).any() else None,
      "n_layer0": int((h[:, 0] > 0).sum()),
    }
    print(key, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res[key].items()})
json.dump(res, open(f"{out}/conditional.json", "w"), indent=1, default=float)

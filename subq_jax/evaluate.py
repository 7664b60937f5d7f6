"""Retrieval evaluation at multiples of the training length, and the run's plots.

Scoring is teacher-forced exact match: the model reads the whole sample once, and a query
counts as retrieved when the argmax at every answer position is the answer token.
Haystacks come from the validation split of the corpus.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from subq_jax.data import corpus
from subq_jax.data.pipeline import make_sample
from subq_jax.experiment import ExperimentConfig
from subq_jax.model import ModelConfig, Transformer


def answer_spans(mask: np.ndarray) -> list[tuple[int, int]]:
  """[start, end) of each run of True in a 1-D mask (one run per query)."""
  padded = np.concatenate([[False], mask.astype(bool), [False]])
  edges = np.flatnonzero(padded[1:] != padded[:-1])
  return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def eval_model_config(model_cfg: ModelConfig, train_len: int, length: int, yarn: bool):
  """The model config used at `length`: YaRN-rescaled beyond training when `yarn`."""
  if not yarn or length <= train_len:
    return model_cfg
  base = model_cfg.rope_original_length or train_len
  scale = model_cfg.rope_scale * length / train_len
  return dataclasses.replace(model_cfg, rope_scale=scale, rope_original_length=base)


def retrieval_eval(
  params, model_cfg: ModelConfig, cfg: ExperimentConfig, train_len: int, log=print
):
  """{task: {multiplier: {"accuracy", "queries", "length", "pairs_fraction"}}}."""
  ev = cfg.eval
  tok = cfg.data.make_tokenizer()
  stream = corpus.token_stream(tok, "validation", cfg.data.val_fraction, cfg.data.corpus_root)
  results = {t: {} for t in ev.tasks}
  for mult in ev.multipliers:
    length = mult * train_len
    mcfg = eval_model_config(model_cfg, train_len, length, ev.yarn)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda c=mcfg: Transformer(c, rngs=nnx.Rngs(0))))

    @jax.jit
    def forward(params, tokens, graphdef=graphdef):
      logits, infos = nnx.merge(graphdef, params)(tokens, return_info=True)
      pairs = [jnp.mean(i.pairs_attended) for i in infos if i is not None]
      return jnp.argmax(logits, -1), jnp.mean(jnp.stack(pairs)) if pairs else jnp.nan

    for task in ev.tasks:
      hits, total, fractions = 0, 0, []
      for i in range(ev.num_samples):
        rng = np.random.default_rng([ev.seed, ev.tasks.index(task), mult, i])
        sample = make_sample(cfg.data, tok, stream, length, rng, task)
        tokens = sample["tokens"]
        pred, pairs = forward(params, jnp.asarray(tokens[None, :-1]))
        pred = np.asarray(pred[0])
        target_mask = sample["answer_mask"][1:]
        for a, b in answer_spans(target_mask):
          hits += bool(np.all(pred[a:b] == tokens[1:][a:b]))
          total += 1
        fractions.append(float(pairs) / (length * (length + 1) / 2))
      results[task][mult] = {
        "accuracy": hits / max(total, 1),
        "queries": total,
        "length": length,
        "pairs_fraction": float(np.mean(fractions)),
      }
      log(
        f"eval {task} at {mult}x ({length} tokens): {hits}/{total} = "
        f"{results[task][mult]['accuracy']:.3f}, pairs attended {np.mean(fractions):.3f}"
      )
  return results


def format_table(results: dict, train_len: int) -> str:
  mults = sorted({m for r in results.values() for m in r})
  head = f"{'task':<8}" + "".join(f"{f'{m}x ({m * train_len})':>16}" for m in mults)
  lines = [head, "-" * len(head)]
  for task, r in results.items():
    lines.append(f"{task:<8}" + "".join(f"{r[m]['accuracy']:>16.3f}" for m in mults))
  any_task = next(iter(results.values()))
  lines.append(
    f"{'pairs %':<8}" + "".join(f"{100 * any_task[m]['pairs_fraction']:>16.1f}" for m in mults)
  )
  return "\n".join(lines)


def save_results(results: dict, workdir: str, train_len: int):
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump({"train_len": train_len, "results": results}, f, indent=2)


def plot_loss(metrics_path: str, out_png: str):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from subq_jax.metrics import read_jsonl

  rows = read_jsonl(metrics_path)
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
  if rows and "answer_token_acc" in rows[0]:
    ax2 = ax.twinx()
    ax2.plot(
      [r["step"] for r in rows],
      [r["answer_token_acc"] for r in rows],
      "C1",
      label="answer token acc",
    )
    ax2.set_ylabel("answer token accuracy")
    ax2.set_ylim(0, 1)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title("training")
  fig.legend(loc="upper right")
  fig.tight_layout()
  fig.savefig(out_png, dpi=120)
  plt.close(fig)


def plot_accuracy(results: dict, train_len: int, out_png: str, title: str = ""):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for task, r in results.items():
    mults = sorted(r)
    ax.plot([m * train_len for m in mults], [r[m]["accuracy"] for m in mults], "o-", label=task)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("exact-match retrieval accuracy")
  ax.set_ylim(-0.02, 1.02)
  ax.axvline(train_len, color="gray", ls=":", label="training length")
  ax.set_title(title or "retrieval by length")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_png, dpi=120)
  plt.close(fig)

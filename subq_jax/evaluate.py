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

from subq_jax.config import BLOCK_KINDS
from subq_jax.data import corpus
from subq_jax.data.pipeline import make_sample
from subq_jax.experiment import ExperimentConfig
from subq_jax.model import ModelConfig, Transformer


def answer_spans(mask: np.ndarray) -> list[tuple[int, int]]:
  """[start, end) of each run of True in a 1-D mask (one run per query)."""
  padded = np.concatenate([[False], mask.astype(bool), [False]])
  edges = np.flatnonzero(padded[1:] != padded[:-1])
  return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def needle_block_attended(spans, needle_at, selected, attn) -> np.ndarray:
  """Whether each query could see its needle: per answer span (a, b) of the shifted
  target (the query at input position a predicts the answer's first token), 1.0 when the
  KV block holding its needle's value (`needle_at`: `tasks.Sample.needle_at`) is among
  the blocks the query attends to: the sinks, its tile's selected blocks (in any KV
  head), the local blocks and its own.

  selected: int [kv_heads, tiles, top_k] (one layer's `AttentionInfo.selected_blocks`,
  -1 for empty slots); attn: that layer's SSAConfig.
  """
  out = []
  for (a, _), at in zip(spans, needle_at, strict=True):
    needle, own = int(at) // attn.block_size, a // attn.block_size
    seen = needle < attn.sink_blocks or own - attn.local_blocks <= needle <= own
    out.append(float(seen or np.any(selected[:, a // attn.tile] == needle)))
  return np.array(out)


def full_length(data_cfg):
  """`data_cfg` whose task samples fill the sequence: an evaluation at length L asks its
  queries at the end of L tokens, whatever `task_min_len` the run trained with."""
  return dataclasses.replace(data_cfg, task_min_len=0)


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
        sample = make_sample(full_length(cfg.data), tok, stream, length, rng, task)
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


# ------------------------------------------------------------------ the long-context suite
#
# `suite_eval` runs named tasks of `subq_jax.data.ruler` over lengths (and depths, for the
# tasks that take one) with greedy decoding through the KV cache (`subq_jax.decode`), and
# scores the continuations with `subq_jax.data.scoring`. MQAR, whose answers sit inside
# the text, is scored teacher-forced: exact match of the argmax at every answer token,
# which is exactly whether greedy decoding from the true prefix reproduces the value.


def load_checkpoint(workdir: str, step: int | None = None):
  """(params, model config of the last stage, ExperimentConfig, step) of a training run.

  Reads `config.json` (written by `subq_jax.train.train`) and the orbax checkpoint of
  `step` (default: the latest) under `workdir/checkpoints`, onto this process's first
  device whatever devices it was saved from (a checkpoint trained on a GPU evaluates on
  a CPU).
  """
  import orbax.checkpoint as ocp

  from subq_jax import train as train_lib
  from subq_jax.experiment import resolve

  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a training run's workdir")
  with open(path) as f:
    cfg = resolve(json.load(f))
  mngr = train_lib._checkpoint_manager(workdir, cfg.train)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
  model_cfg = train_lib.stage_model_config(cfg, len(cfg.train.stages) - 1)
  _, params = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
  opt_state = jax.eval_shape(train_lib.make_optimizer(cfg.train).init, params)
  here = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # not the saved device's
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here),
    {"params": params, "opt_state": opt_state},
  )
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  mngr.close()
  return restored.state["params"], model_cfg, cfg, step


def with_beam(model_cfg: ModelConfig, beam: int) -> ModelConfig:
  """`model_cfg` with the routing descent's beam set to `beam` (an evaluation knob: the
  trained weights do not depend on it). Only layers of kind `ssa` descend a tree."""
  kinds = {model_cfg.layer_attention(i).kind for i in range(model_cfg.num_layers)}
  if "ssa" not in kinds:
    raise ValueError(f"beam={beam} needs an `ssa` layer; this model's layers are {sorted(kinds)}")
  if not isinstance(beam, int) or beam < 1:
    raise ValueError(f"beam={beam!r}: must be a positive integer")
  attention = dataclasses.replace(model_cfg.attention, beam=beam)
  return dataclasses.replace(model_cfg, attention=attention)


def parse_lengths(spec: str, train_len: int) -> list[int]:
  """'1x,4x,16x' (multiples of the training length), '4096,16K' or a mix -> tokens."""
  out = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    if item.lower().endswith("x"):
      out.append(int(round(float(item[:-1]) * train_len)))
    elif item[-1] in "kKmM":
      out.append(int(float(item[:-1]) * (1024 if item[-1] in "kK" else 1024 * 1024)))
    else:
      out.append(int(item))
  if not out or min(out) < 1:
    raise ValueError(f"lengths={spec!r} must name at least one positive length")
  return out


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
  """What `suite_eval` runs.

  tasks: task names of `subq_jax.data.ruler` (see `ruler.suite`).
  lengths: prompt + generation budget of each sample, in tokens.
  depths: needle depths for the tasks that take one (`ruler.TAKES_DEPTH`); the others
    draw their own placements.
  num_samples: samples per (task, length, depth) cell.
  batch_size: sequences decoded together.
  yarn: beyond the training length, scale RoPE with YaRN by length / training length.
  seed: the samples of a cell are `ruler.generate(task, length, seed=[seed, length,
    depth index (999 without a depth), i])`.
  split: corpus split of the filler text (`validation`: never trained on).
  train_tasks: the training mixture's own tasks (`niah`, `mqar` of
    `subq_jax.data.tasks`, packed with code as in training; needs the run's DataConfig),
    scored teacher-forced on `train_samples` sequences per length.
  """

  tasks: tuple[str, ...] = ("niah_single_2",)
  lengths: tuple[int, ...] = (4096,)
  depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
  num_samples: int = 50
  batch_size: int = 8
  yarn: bool = False
  seed: int = 0
  split: str = "validation"
  train_tasks: tuple[str, ...] = ()
  train_samples: int = 32

  def __post_init__(self):
    from subq_jax.data import ruler

    object.__setattr__(self, "train_tasks", tuple(self.train_tasks))
    for t in self.train_tasks:
      if t not in ("niah", "mqar"):
        raise ValueError(f"train_tasks has {t!r}, not one of ('niah', 'mqar')")

    for t in self.tasks:
      if t not in ruler.TASKS:
        raise ValueError(f"task {t!r} is not one of {sorted(ruler.TASKS)}")
    if self.num_samples < 1 or self.batch_size < 1:
      raise ValueError(f"{self.num_samples=} and {self.batch_size=} must be >= 1")
    if any(not 0.0 <= d <= 1.0 for d in self.depths):
      raise ValueError(f"depths={self.depths} must lie in [0, 1]")


class _Runner:
  """Jitted prefill + greedy decoding; teacher-forced scoring reads the same prefill's
  argmax, so one compile per (cache length, capacity) serves both."""

  def __init__(self, params, model_cfg: ModelConfig):
    from subq_jax import decode

    self.params, self.model_cfg = params, model_cfg
    self.graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
    self.multiple = decode.cache_multiple(model_cfg)
    self._generate = {}
    self._select = jax.jit(self._selected_blocks)  # compiled on first use

  def cache_len(self, n: int) -> int:
    return -(-n // self.multiple) * self.multiple

  def _call(self, tokens, lengths, max_new: int):
    from subq_jax import decode

    # Budgets share a compile per power-of-two capacity (NIAH, vt, QA and teacher forcing:
    # 128).
    capacity = max(128, 1 << (max_new - 1).bit_length())
    if capacity not in self._generate:
      self._generate[capacity] = decode.make_generate(self.graphdef, capacity)
    return self._generate[capacity](
      self.params, jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32), max_new
    )

  def generate(self, tokens, lengths, max_new: int):
    """(greedy continuations [B, max_new], pairs fraction)."""
    out, fraction, _ = self._call(tokens, lengths, max_new)
    return np.asarray(out)[:, :max_new], float(fraction)

  def _selected_blocks(self, params, tokens):
    _, infos = nnx.merge(self.graphdef, params)(tokens, return_info=True)
    return [None if i is None else i.selected_blocks for i in infos]

  def selections(self, tokens):
    """Each layer's `selected_blocks` of one full forward over `tokens` as numpy
    ([B, kv_heads, tiles, top_k]), None for layers that select no blocks."""
    return [None if x is None else np.asarray(x) for x in self._select(self.params, tokens)]

  def teacher_forced(self, tokens):
    """(argmax predictions [B, T], pairs fraction) of one forward over `tokens`."""
    tokens = np.asarray(tokens)
    lengths = np.full(tokens.shape[0], tokens.shape[1], np.int32)
    _, fraction, every = self._call(tokens, lengths, 1)
    return np.asarray(every), float(fraction)


def _pad_rows(rows: list[np.ndarray], width: int, batch: int, pad_id: int) -> np.ndarray:
  """Rows right-padded to `width`; missing rows (a short last batch) repeat row 0."""
  out = np.full((batch, width), pad_id, np.int32)
  for i in range(batch):
    r = rows[i] if i < len(rows) else rows[0]
    out[i, : len(r)] = r
  return out


def _cut(ids: np.ndarray, tokenizer) -> str:
  """Generated ids up to the first separator or padding token, as text."""
  stop = np.flatnonzero((ids == tokenizer.sep_id) | (ids == tokenizer.pad_id))
  return tokenizer.decode(ids[: stop[0]] if stop.size else ids)


def _score_generated(runner: _Runner, samples, tokenizer, batch: int, length: int):
  """Greedy continuations scored by each sample's metric: (scores, predictions, pairs)."""
  from subq_jax.data import scoring

  prompts = [tokenizer.encode(s.prompt) for s in samples]
  max_new = max(s.max_new_tokens for s in samples)
  # One cache length per eval length (one compile); MRCR's budgets vary per sample.
  width = runner.cache_len(max(length, max(len(p) for p in prompts) + max_new))
  scores, preds, fractions = [], [], []
  for i in range(0, len(samples), batch):
    chunk = prompts[i : i + batch]
    tokens = _pad_rows(chunk, width, batch, tokenizer.pad_id)
    lengths = np.array([len(p) for p in chunk] + [len(chunk[0])] * (batch - len(chunk)))
    out, fraction = runner.generate(tokens, lengths.astype(np.int32), max_new)
    fractions.append(fraction)
    for j, s in enumerate(samples[i : i + batch]):
      pred = _cut(out[j, : s.max_new_tokens], tokenizer)
      preds.append(pred)
      scores.append(scoring.score(s.metric, pred, s.answers, s.meta.get("prefix", "")))
  return scores, preds, float(np.mean(fractions))


def _score_teacher_forced(runner: _Runner, samples, tokenizer, batch: int, length: int):
  """Exact match of every answer span (MQAR): (scores per answer, distances, pairs)."""
  encoded = [s.to_sample(tokenizer) for s in samples]
  width = runner.cache_len(max(length, max(len(e.tokens) for e in encoded)))
  scores, distances, fractions = [], [], []
  for i in range(0, len(samples), batch):
    chunk = encoded[i : i + batch]
    tokens = _pad_rows([e.tokens for e in chunk], width, batch, tokenizer.pad_id)
    pred, fraction = runner.teacher_forced(tokens)
    fractions.append(fraction)
    for j, (e, s) in enumerate(zip(chunk, samples[i : i + batch], strict=True)):
      spans = answer_spans(e.answer_mask)
      for (a, b), dist in zip(spans, s.meta.get("distances", [None] * len(spans)), strict=True):
        # logits at p predict token p + 1
        scores.append(float(np.all(pred[j, a - 1 : b - 1] == e.tokens[a:b])))
        distances.append(dist)
  return scores, distances, float(np.mean(fractions))


def suite_eval(
  params,
  model_cfg: ModelConfig,
  train_len: int,
  suite: SuiteConfig,
  *,
  tokenizer=None,
  corpus_root: str | None = None,
  val_fraction: float = 0.05,
  data_cfg=None,
  log=print,
) -> list[dict]:
  """One result per (task, length, depth) cell, each with its sample count, 95% Wilson
  interval, the filler used and the fraction of causal token pairs attended.

  Samples are cached in memory across calls (byte tokenizer), so evaluating several
  models on the same suite generates them once."""
  import time

  from subq_jax.data import ruler, scoring
  from subq_jax.data.tokenizer import ByteTokenizer

  tokenizer = tokenizer or ByteTokenizer()
  source = ruler.Source(
    tokenizer=tokenizer, split=suite.split, val_fraction=val_fraction, root=corpus_root
  )
  cells = []
  for length in suite.lengths:
    mcfg = eval_model_config(model_cfg, train_len, length, suite.yarn)
    runner = _Runner(params, mcfg)
    for task in suite.tasks:
      depths = list(enumerate(suite.depths)) if task in ruler.TAKES_DEPTH else [(None, None)]
      for d_idx, depth in depths:
        t0 = time.time()
        cell_seed = [suite.seed, length, 999 if d_idx is None else d_idx]
        try:
          samples = [
            _sample(task, length, (*cell_seed, i), source, depth) for i in range(suite.num_samples)
          ]
        except ValueError as e:  # the task's fixed text does not fit this length
          log(f"{task} at {length} tokens: skipped ({e})")
          cells.append({"task": task, "length": length, "depth": depth, "skipped": str(e)})
          continue
        cell = {
          "task": task,
          "length": length,
          "multiplier": length / train_len,
          "depth": depth,
          "metric": samples[0].metric,
          "filler": sorted({s.meta["filler"] for s in samples}),
          "filler_source": sorted({s.meta["filler_source"] for s in samples}),
          "rope_scale": mcfg.rope_scale,
          "yarn": suite.yarn,
          "samples": len(samples),
        }
        if samples[0].max_new_tokens == 0:  # answers inside the text
          scores, dists, fraction = _score_teacher_forced(
            runner, samples, tokenizer, suite.batch_size, length
          )
          cell["by_distance"] = scoring.bucket_by_distance(dists, scores, _distance_edges(length))
          cell["scoring"] = "teacher-forced exact match per query"
        else:
          scores, preds, fraction = _score_generated(
            runner, samples, tokenizer, suite.batch_size, length
          )
          cell["examples"] = [
            {"prediction": p, "answers": list(s.answers)}
            for p, s in zip(preds[:2], samples[:2], strict=True)
          ]
          cell["scoring"] = f"greedy decoding, string match ({samples[0].metric})"
        cell |= scoring.mean_score(scores)
        cell["scores"] = [round(float(x), 4) for x in scores]
        cell["pairs_fraction"] = fraction
        cell["wall_s"] = round(time.time() - t0, 2)
        cells.append(cell)
        where = "" if depth is None else f" depth {depth:.2f}"
        log(
          f"{task} at {length} tokens{where}: {cell['mean']:.3f} "
          f"[{cell['lo']:.3f}, {cell['hi']:.3f}] (n={cell['n']}), pairs attended "
          f"{100 * fraction:.1f}%, filler {'/'.join(cell['filler'])}, {cell['wall_s']:.1f}s"
        )
    for task in suite.train_tasks:
      if data_cfg is None:
        raise ValueError("suite.train_tasks needs the run's data_cfg")
      t0 = time.time()
      got = _train_format(runner, data_cfg, tokenizer, task, length, suite)
      scores, fraction, routing = got["scores"], got["pairs_fraction"], got["needle_block_attended"]
      cell = {
        "task": f"{task} (train format)",
        "length": length,
        "multiplier": length / train_len,
        "depth": None,
        "metric": "exact",
        "filler": ["code"],
        "filler_source": [f"corpus:{data_cfg.corpus_root or 'stdlib'}:validation"],
        "rope_scale": mcfg.rope_scale,
        "yarn": suite.yarn,
        "samples": suite.train_samples,
        "scoring": "teacher-forced exact match per query",
        **scoring.mean_score(scores),
        "scores": [float(x) for x in scores],
        "pairs_fraction": fraction,
        "answer_acc_by_position": got["answer_acc_by_position"],
        "by_distance": scoring.bucket_by_distance(
          got["distances"], scores, _distance_edges(length)
        ),
        "misses": got["misses"],
        "wall_s": round(time.time() - t0, 2),
      }
      if routing is not None:
        cell["needle_block_attended"] = routing
      cells.append(cell)
      seen = (
        ""
        if routing is None
        else ", needle block attended by layer "
        + " ".join("-" if r is None else f"{r:.2f}" for r in routing)
      )
      log(
        f"{cell['task']} at {length} tokens: {cell['mean']:.3f} [{cell['lo']:.3f}, "
        f"{cell['hi']:.3f}] (n={cell['n']}), pairs attended {100 * fraction:.1f}%{seen}, "
        "answer token accuracy by position "
        + " ".join(f"{a:.2f}" for a in cell["answer_acc_by_position"])
        + ", by distance quarter "
        + _fmt_quarters(cell["by_distance"])
        + ", misses "
        + _fmt_misses(cell["misses"])
      )
  return cells


def _distance_edges(length: int) -> list[int]:
  """Quarters of the sequence: the buckets of accuracy by needle (key) to query distance."""
  edges = np.linspace(0, length, 5).round().astype(int).tolist()
  edges[-1] += 1
  return edges


def _fmt_misses(m: dict) -> str:
  if not m["n"]:
    return "0"
  return (
    f"{m['n']} (first wrong position {' '.join(map(str, m['first_wrong']))}; another "
    f"answer's token {m['other_answer']:.2f}, if uniform {m['other_answer_if_uniform']:.2f})"
  )


def _fmt_miss_cell(m: dict) -> str:
  if not m["n"]:
    return "0"
  return f"{m['n']}: {m['other_answer']:.2f} ({m['other_answer_if_uniform']:.2f})"


def _fmt_quarters(buckets: list[dict]) -> str:
  return " ".join(f"{b['mean']:.2f}({b['n']})" if b["n"] else "-" for b in buckets)


_SAMPLES: dict = {}  # (task, length, seed, depth, source key) -> TaskSample


def _sample(task: str, length: int, seed: tuple, source, depth):
  from subq_jax.data import ruler
  from subq_jax.data.tokenizer import ByteTokenizer

  if not isinstance(source.tokenizer, ByteTokenizer):
    return ruler.generate(task, length, seed=list(seed), source=source, depth=depth)
  key = (task, length, seed, depth, source.root, source.split, source.val_fraction)
  if key not in _SAMPLES:
    _SAMPLES[key] = ruler.generate(task, length, seed=list(seed), source=source, depth=depth)
  return _SAMPLES[key]


def _train_format(runner: _Runner, data_cfg, tokenizer, task: str, length: int, suite):
  """Teacher-forced exact match of every query of the training-format `task`: a dict of
  `scores` (per query), `pairs_fraction`, `needle_block_attended` (needle routing),
  `answer_acc_by_position`, `distances` (per query: tokens from its needle's or pair's
  value to its answer) and `misses`.
  Accuracy by position: per k, the fraction of queries (of those with k+1 answer tokens
  or more) whose k-th answer token is right; a miss in the first character (finding the
  value) against one in the copy after it. In a model whose layers select blocks, needle
  routing is, per layer, the fraction of queries whose needle (`niah`) or pair (`mqar`)
  value block that layer attends to (`needle_block_attended`; None for layers that
  select no blocks); else None. Misses: `miss_summary` of every query not matched
  exactly."""
  stream = corpus.token_stream(tokenizer, "validation", data_cfg.val_fraction, data_cfg.corpus_root)
  index = ("niah", "mqar").index(task)
  layers = [runner.model_cfg.layer_attention(i) for i in range(runner.model_cfg.num_layers)]
  routed = any(a.kind in BLOCK_KINDS for a in layers)
  from subq_jax.data import pipeline  # at call time: tests wrap pipeline.make_sample

  seqs = [
    pipeline.make_sample(
      full_length(data_cfg),
      tokenizer,
      stream,
      length,
      np.random.default_rng([suite.seed, 7, index, i]),
      task,
      needle_at=True,
    )
    for i in range(suite.train_samples)
  ]
  width = runner.cache_len(length)
  scores, fractions, hits, tokens_ok, dists, misses = [], [], [], [], [], []
  for i in range(0, len(seqs), suite.batch_size):
    chunk = seqs[i : i + suite.batch_size]
    tokens = _pad_rows([c["tokens"][:-1] for c in chunk], width, suite.batch_size, tokenizer.pad_id)
    pred, fraction = runner.teacher_forced(tokens)
    fractions.append(fraction)
    selected = runner.selections(tokens) if routed else []
    for j, c in enumerate(chunk):
      target = c["tokens"][1:]
      spans = answer_spans(c["answer_mask"][1:])
      answers = [target[a:b] for a, b in spans]
      for q, ((a, b), at) in enumerate(zip(spans, c["needle_at"], strict=True)):
        tokens_ok.append(pred[j, a:b] == target[a:b])
        scores.append(float(np.all(tokens_ok[-1])))
        dists.append(a + 1 - int(at))  # target[a] is tokens[a + 1]
        if not scores[-1]:
          miss = miss_record(answers, q, pred[j, a:b], tokenizer)
          misses.append({"sample": i + j, "query": q, "distance": dists[-1], **miss})
      if routed:
        hits.append(
          [
            None if sel is None else needle_block_attended(spans, c["needle_at"], sel[j], attn)
            for sel, attn in zip(selected, layers, strict=True)
          ]
        )
  routing = None
  if routed:
    routing = []
    for layer in range(len(layers)):
      seen = None if hits[0][layer] is None else np.concatenate([h[layer] for h in hits])
      routing.append(None if seen is None else float(np.mean(seen)))
  longest = max((len(ok) for ok in tokens_ok), default=0)
  by_position = [float(np.mean([ok[k] for ok in tokens_ok if len(ok) > k])) for k in range(longest)]
  alphabet = {int(t) for c in seqs for t in c["tokens"][1:][c["answer_mask"][1:].astype(bool)]}
  return {
    "scores": scores,
    "pairs_fraction": float(np.mean(fractions)),
    "needle_block_attended": routing,
    "answer_acc_by_position": by_position,
    "distances": dists,
    "misses": miss_summary(misses, len(alphabet)),
  }


def miss_record(answers: list, q: int, predicted, tokenizer) -> dict:
  """Query q's miss, teacher-forced: its answer (`answers[q]`, one per query of the
  sequence) and the argmax at each of its positions (as text), the first wrong position
  k, and whether the token predicted there is the k-th token of another query's answer
  (`other_answer`: a read from the wrong needle or pair rather than a token of none;
  `others_matched`: those queries' indices)."""
  target = np.asarray(answers[q])
  k = int(np.flatnonzero(np.asarray(predicted) != target)[0])
  others = [(i, a) for i, a in enumerate(answers) if i != q and len(a) > k]
  return {
    "answer": tokenizer.decode(target),
    "predicted": tokenizer.decode(predicted),
    "first_wrong": k,
    "other_answer": any(a[k] == predicted[k] for _, a in others),
    "others_matched": [i for i, a in others if a[k] == predicted[k]],
    "other_tokens": len({int(a[k]) for _, a in others if a[k] != target[k]}),
  }


def miss_summary(misses: list[dict], alphabet: int, keep: int = 32) -> dict:
  """The misses of a cell: their count, how many first go wrong at each answer position,
  the fraction whose wrong token is another answer's (`other_answer`) and that fraction
  if the wrong token were drawn uniformly from the other `alphabet - 1` answer tokens
  (`other_answer_if_uniform`: the mean over misses of other answers' distinct tokens at
  that position over `alphabet - 1`), and the first `keep` records."""
  first = [m["first_wrong"] for m in misses]
  return {
    "n": len(misses),
    "first_wrong": np.bincount(first).tolist() if first else [],
    "other_answer": float(np.mean([m["other_answer"] for m in misses])) if misses else None,
    "other_answer_if_uniform": (
      float(np.mean([m["other_tokens"] for m in misses]) / max(alphabet - 1, 1)) if misses else None
    ),
    "records": misses[:keep],
  }


def pool(cells: list[dict]) -> dict:
  """{(task, length): pooled result over depths} with its Wilson interval."""
  from subq_jax.data import scoring

  groups = {}
  for c in cells:
    if "skipped" in c:
      continue
    groups.setdefault((c["task"], c["length"]), []).append(c)
  out = {}
  for key, group in groups.items():
    scores = [s for c in group for s in c["scores"]]
    out[key] = scoring.mean_score(scores) | {
      "filler": sorted({f for c in group for f in c["filler"]}),
      "pairs_fraction": float(np.mean([c["pairs_fraction"] for c in group])),
    }
  return out


def _fmt_row(values: list) -> str:
  return " ".join("-" if x is None else f"{x:.2f}" for x in values)


def _fmt_cell(r: dict) -> str:
  return f"{r['mean']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}] n={r['n']}"


def suite_table(cells: list[dict], train_len: int) -> str:
  """Markdown: accuracy [95% Wilson interval] n=samples per task and length (depths
  pooled), the filler of each task, and the fraction of token pairs attended."""
  pooled = pool(cells)
  skipped = sorted({(c["task"], c["length"]) for c in cells if "skipped" in c})
  cells = [c for c in cells if "skipped" not in c]
  lengths = sorted({c["length"] for c in cells})
  tasks = list(dict.fromkeys(c["task"] for c in cells))
  head = ["task", "filler"] + [f"{n} ({n / train_len:g}x)" for n in lengths]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for t in tasks:
    fill = "/".join(sorted({f for (tt, _), r in pooled.items() if tt == t for f in r["filler"]}))
    row = [t, fill] + [_fmt_cell(pooled[t, n]) if (t, n) in pooled else "" for n in lengths]
    lines.append("| " + " | ".join(row) + " |")
  pairs = [
    np.mean([r["pairs_fraction"] for (_, n), r in pooled.items() if n == m]) for m in lengths
  ]
  lines.append("| pairs attended | | " + " | ".join(f"{100 * p:.2f}%" for p in pairs) + " |")
  lines += _ruler_average_row(pooled, lengths)
  per_cell = (  # field, its row's label, the fewest entries worth a row
    ("needle_block_attended", "needle block attended, by layer", 1),
    ("answer_acc_by_position", "answer token accuracy, by position", 2),
    ("by_distance", "accuracy by needle-query distance, quarters of the length", 1),
  )
  for key, label, fewest in per_cell:
    got = {(c["task"], c["length"]): c[key] for c in cells if len(c.get(key) or ()) >= fewest}
    for t in dict.fromkeys(t for t, _ in got):
      by = [got.get((t, n)) for n in lengths]
      row = [(_fmt_quarters(r) if key == "by_distance" else _fmt_row(r)) if r else "" for r in by]
      lines.append(f"| {t}: {label} | | " + " | ".join(row) + " |")
  misses = {(c["task"], c["length"]): c["misses"] for c in cells if c.get("misses")}
  for t in dict.fromkeys(t for t, _ in misses):
    by = [misses.get((t, n)) for n in lengths]
    row = [_fmt_miss_cell(m) if m else "" for m in by]
    label = "misses: how many, and the fraction whose wrong token is another answer's (if uniform)"
    lines.append(f"| {t}: {label} | | " + " | ".join(row) + " |")
  if skipped:
    lines.append(
      "\nskipped (the task's fixed text does not fit): "
      + ", ".join(f"{t} at {n}" for t, n in skipped)
    )
  return "\n".join(lines)


def _ruler_average_row(pooled: dict, lengths: list[int]) -> list[str]:
  """The RULER average (`scoring.task_average`, the unweighted mean over tasks) at each
  length of the `ruler.RULER` tasks evaluated at every length; no row for fewer than two."""
  from subq_jax.data import ruler, scoring

  tasks = [t for t in ruler.RULER if all((t, n) in pooled for n in lengths)]
  if len(tasks) < 2:
    return []
  cells = [_fmt_cell(scoring.task_average([pooled[t, n] for t in tasks])) for n in lengths]
  label = f"RULER average ({len(tasks)} tasks: {', '.join(tasks)})"
  return [f"| {label} | | " + " | ".join(cells) + " |"]


def _plt():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def plot_heatmaps(cells: list[dict], out_dir: str, title: str = "") -> list[str]:
  """One depth x length accuracy heatmap per NIAH task evaluated at several depths."""
  plt = _plt()
  paths = []
  cells = [c for c in cells if "skipped" not in c]
  for task in dict.fromkeys(c["task"] for c in cells if c["depth"] is not None):
    if not task.startswith("niah"):
      continue
    mine = [c for c in cells if c["task"] == task]
    lengths = sorted({c["length"] for c in mine})
    depths = sorted({c["depth"] for c in mine})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for c in mine:
      grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["mean"]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.5 * len(depths) + 2))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    for i in range(len(depths)):
      for j in range(len(lengths)):
        if not np.isnan(grid[i, j]):
          ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    n = mine[0]["n"]
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{title} {task} (n={n} per cell)".strip())
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    path = os.path.join(out_dir, f"heatmap_{task}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
  return paths


def plot_by_length(series: dict, out_png: str, key: str, ylabel: str, train_len: int, title=""):
  """Lines of `key` against length: `series` = {label: {length: result dict}}; results
  with "lo"/"hi" get their 95% interval as error bars."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for label, by_len in series.items():
    lengths = sorted(by_len)
    y = np.array([by_len[n][key] for n in lengths], float)
    if key == "mean":
      lo = y - np.array([by_len[n]["lo"] for n in lengths])
      hi = np.array([by_len[n]["hi"] for n in lengths]) - y
      ax.errorbar(lengths, y, yerr=[lo, hi], marker="o", capsize=3, label=label)
    else:
      ax.plot(lengths, y, "o-", label=label)
  ax.set_xscale("log", base=2)
  if key == "pairs_fraction":
    ax.set_yscale("log")
  else:
    ax.set_ylim(-0.02, 1.02)
  ax.axvline(train_len, color="gray", ls=":", label="training length")
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_png, dpi=120)
  plt.close(fig)


def write_suite_report(cells: list[dict], out_dir: str, meta: dict, train_len: int) -> dict:
  """suite.json, suite.md and the PNGs (heatmaps, accuracy and pairs against length)."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "suite.json"), "w") as f:
    json.dump({**meta, "train_len": train_len, "cells": cells}, f, indent=1)
  table = suite_table(cells, train_len)
  title = meta.get("label", "")
  with open(os.path.join(out_dir, "suite.md"), "w") as f:
    f.write(f"# {title}\n\n" if title else "")
    f.write("accuracy [95% Wilson interval] n=samples (depths pooled)\n\n" + table + "\n")
  pooled = pool(cells)
  by_task = {}
  for (task, n), r in pooled.items():
    by_task.setdefault(task, {})[n] = r
  plot_by_length(
    by_task, os.path.join(out_dir, "accuracy_vs_length.png"), "mean", "accuracy", train_len, title
  )
  pairs = {}
  for (_, n), r in pooled.items():
    pairs[n] = {"pairs_fraction": r["pairs_fraction"]}
  plot_by_length(
    {title or "model": pairs},
    os.path.join(out_dir, "pairs_vs_length.png"),
    "pairs_fraction",
    "fraction of causal token pairs attended",
    train_len,
    title,
  )
  plot_heatmaps(cells, out_dir, title)
  return {"table": table}


def evaluate_checkpoint(
  workdir: str,
  *,
  suites: tuple[str, ...] = ("niah",),
  lengths: str = "1x,4x,16x",
  depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
  num_samples: int = 50,
  batch_size: int = 8,
  yarn: bool | None = None,
  seed: int = 0,
  step: int | None = None,
  out_dir: str | None = None,
  label: str = "",
  train_tasks: tuple[str, ...] = (),
  train_samples: int = 32,
  beam: int | None = None,
  log=print,
) -> dict:
  """Loads a training run's checkpoint, runs the named suites (`ruler.suite` names or
  task names; `train_tasks`: the run's own training-format `niah` / `mqar`) and writes
  suite.json, suite.md and the PNGs to `out_dir` (default `workdir/eval`). `yarn` None
  takes the run's `eval.yarn`. `beam` (None: the run's) widens or narrows the routing
  descent of the `ssa` layers at evaluation: it changes which blocks are found, not how
  many are attended (`top_k`), so the pairs attended stay the same."""
  import time

  from subq_jax.data import ruler

  t0 = time.time()
  params, model_cfg, cfg, step = load_checkpoint(workdir, step)
  if beam is not None:
    model_cfg = with_beam(model_cfg, beam)
  train_len = cfg.train.stages[-1].seq_len
  tasks = tuple(dict.fromkeys(t for name in suites for t in ruler.suite(name)))
  suite = SuiteConfig(
    tasks=tasks,
    lengths=tuple(parse_lengths(lengths, train_len)),
    depths=tuple(depths),
    num_samples=num_samples,
    batch_size=batch_size,
    yarn=cfg.eval.yarn if yarn is None else yarn,
    seed=seed,
    train_tasks=tuple(train_tasks),
    train_samples=train_samples,
  )
  kinds = [model_cfg.layer_attention(i).kind for i in range(model_cfg.num_layers)]
  label = label or f"{model_cfg.attention.kind} (step {step})"
  log(f"evaluating {workdir} step {step} ({label}): layers {kinds}, trained at {train_len}")
  cells = suite_eval(
    params,
    model_cfg,
    train_len,
    suite,
    tokenizer=cfg.data.make_tokenizer(),
    corpus_root=cfg.data.corpus_root,
    val_fraction=cfg.data.val_fraction,
    data_cfg=cfg.data,
    log=log,
  )
  out_dir = out_dir or os.path.join(workdir, "eval")
  meta = {
    "label": label,
    "workdir": os.path.abspath(workdir),
    "step": int(step),
    "attention": dataclasses.asdict(model_cfg.attention),
    "layer_kinds": kinds,
    "suite": dataclasses.asdict(suite),
    "wall_s": round(time.time() - t0, 1),
  }
  report = write_suite_report(cells, out_dir, meta, train_len)
  log(f"{label}: accuracy [95% Wilson interval] n=samples\n{report['table']}\nwritten to {out_dir}")
  return {"cells": cells, "train_len": train_len, "table": report["table"], "meta": meta}

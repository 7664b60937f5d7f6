"""grain pipelines: the train/eval mixture of code and synthetic tasks, packed to length.

Sample i of a stream is a pure function of (seed, stage, i): its source (code or a task,
drawn by `mixture` weight) and content come from `np.random.default_rng([seed, stage, i])`.
So the grain iterator state is just the next index, it goes into the checkpoint, and a
resumed run sees exactly the batches an uninterrupted run would have.

Packing: every sequence is exactly `seq_len + 1` tokens (inputs and shifted targets).
Code sequences are windows of the corpus stream, whose documents are joined by the
separator token; tasks are padded out with code behind a separator. No cross-document
masking (as SubQ trained): separators are ordinary tokens.
"""

from __future__ import annotations

import dataclasses

import grain
import jax
import numpy as np

from subq_jax.data import corpus, ruler, tasks
from subq_jax.data.tokenizer import get_tokenizer

SOURCES = ("code", "niah", "mqar", "ruler")
# The evaluation's RULER-style tasks in their evaluation format (`subq_jax.data.ruler`).
RULER_TASKS = ("niah_single_1", "niah_single_2", "niah_uuid", "niah_multikey_1", "vt", "qa_1")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Attributes:
  seed: data seed (independent of the model seed).
  tokenizer, tokenizer_path: `byte`, or `sentencepiece` / `hf` with a model file.
  corpus_root: directory of .py files; None = the interpreter's stdlib.
  val_fraction: share of corpus documents held out for validation / evaluation haystacks.
  mixture: weight per source in `SOURCES` (normalised).
  niah, mqar: task knobs.
  ruler_tasks: the `ruler` source draws one of these tasks (uniformly) per sample, built
    at the training length from the training split of the corpus: prompt, then the
    reference answer (the loss's answer tokens), a separator, and code to fill.
  task_min_len: 0: a task sample (niah, mqar, ruler) fills the sequence, so its queries
    always end at the last positions. N > 0: each task sample is built at a length drawn
    uniformly from [min(N, seq_len), seq_len] and placed at a random offset between code
    (joined by separators), so the queries sit anywhere in the sequence. A model trained
    only on full-length samples learns where in the sequence its queries are: the
    session-13 4K checkpoints find 0 of 16 needles in a 1,024-token sample and 16 of 16
    in the same sample after 3,072 tokens of code (experiments/results/niah_recipe_h100/).
  num_threads, prefetch: grain read options.
  """

  seed: int = 0
  tokenizer: str = "byte"
  tokenizer_path: str | None = None
  corpus_root: str | None = None
  val_fraction: float = 0.05
  mixture: tuple[tuple[str, float], ...] = (("code", 0.5), ("niah", 0.25), ("mqar", 0.25))
  niah: tasks.NIAHConfig = dataclasses.field(default_factory=tasks.NIAHConfig)
  mqar: tasks.MQARConfig = dataclasses.field(default_factory=tasks.MQARConfig)
  ruler_tasks: tuple[str, ...] = RULER_TASKS
  task_min_len: int = 0
  num_threads: int = 1
  prefetch: int = 4

  def __post_init__(self):
    mixture = self.mixture
    if isinstance(mixture, dict):
      mixture = tuple(mixture.items())
    object.__setattr__(self, "mixture", tuple((str(k), float(w)) for k, w in mixture))
    for name, weight in self.mixture:
      if name not in SOURCES:
        raise ValueError(f"data.mixture has source {name!r}, not one of {SOURCES}")
      if weight < 0:
        raise ValueError(f"data.mixture.{name}={weight} must be >= 0")
    if sum(w for _, w in self.mixture) <= 0:
      raise ValueError(f"data.mixture={dict(self.mixture)} has no positive weight")
    if isinstance(self.niah, dict):
      object.__setattr__(self, "niah", tasks.NIAHConfig(**self.niah))
    if isinstance(self.mqar, dict):
      object.__setattr__(self, "mqar", tasks.MQARConfig(**self.mqar))
    object.__setattr__(self, "ruler_tasks", tuple(self.ruler_tasks))
    unknown = [t for t in self.ruler_tasks if t not in ruler.TASKS]
    if unknown or not self.ruler_tasks:
      raise ValueError(
        f"data.ruler_tasks={list(self.ruler_tasks)}: {unknown or 'empty'} "
        f"(tasks: {sorted(ruler.TASKS)})"
      )
    if self.task_min_len < 0:
      raise ValueError(f"data.task_min_len={self.task_min_len} must be >= 0")
    if not 0.0 < self.val_fraction < 1.0:
      raise ValueError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")

  def make_tokenizer(self):
    return get_tokenizer(self.tokenizer, self.tokenizer_path)


def ruler_sample(
  cfg: DataConfig, tokenizer, stream, seq_len: int, rng, text_source
) -> tasks.Sample:
  """A `ruler` source sample of `seq_len + 1` tokens: one task of `cfg.ruler_tasks` built
  to `seq_len` (prompt + answer room), its reference answer, a separator, code to fill."""
  name = cfg.ruler_tasks[int(rng.integers(len(cfg.ruler_tasks)))]
  task = ruler.generate(name, seq_len, seed=rng.integers(1 << 31, size=2), source=text_source)
  body = task.to_sample(tokenizer)
  fill = seq_len - len(body.tokens)  # after the separator, to seq_len + 1 tokens
  if fill < 0:
    raise ValueError(f"ruler source: {name} built {len(body.tokens)} tokens for seq_len={seq_len}")
  sep = np.asarray([tokenizer.sep_id], np.int32)
  tokens = np.concatenate([body.tokens, sep, tasks.code_window(rng, stream, fill)])
  return tasks.Sample(tokens, np.concatenate([body.answer_mask, np.zeros(fill + 1, bool)]))


def make_sample(
  cfg: DataConfig,
  tokenizer,
  stream,
  seq_len: int,
  rng,
  source: str,
  text_source=None,
  needle_at: bool = False,
):
  """One packed sequence of `seq_len + 1` tokens from `source`, as a dict of arrays.
  `text_source` (a `ruler.Source`, default the training split) feeds the `ruler` source.
  `needle_at` (evaluation only: training batches keep one set of keys): a `niah` or
  `mqar` sample's dict also holds `tasks.Sample.needle_at`."""
  inner = seq_len  # the task's own length (see DataConfig.task_min_len)
  if source in ("niah", "mqar", "ruler") and cfg.task_min_len:
    inner = int(rng.integers(min(cfg.task_min_len, seq_len), seq_len + 1))
  if source == "ruler":
    if text_source is None:
      text_source = ruler.Source(tokenizer, "train", cfg.val_fraction, cfg.corpus_root)
    sample = ruler_sample(cfg, tokenizer, stream, inner, rng, text_source)
  elif source == "code":
    sample = tasks.Sample(tasks.code_window(rng, stream, seq_len + 1), np.zeros(seq_len + 1, bool))
  elif source == "niah":
    sample = tasks.niah(rng, tokenizer, stream, inner + 1, cfg.niah)
  elif source == "mqar":
    sample = tasks.mqar(rng, tokenizer, stream, inner + 1, cfg.mqar)
  else:
    raise ValueError(f"unknown source {source!r}")
  if inner < seq_len:
    sample = _between_code(sample, seq_len - inner, tokenizer.sep_id, rng, stream)
  out = {
    "tokens": sample.tokens.astype(np.int32),
    "answer_mask": sample.answer_mask,
    "source": np.int32(SOURCES.index(source)),
  }
  if needle_at and source in ("niah", "mqar"):
    out["needle_at"] = sample.needle_at
  return out


def _between_code(sample: tasks.Sample, extra: int, sep: int, rng, stream) -> tasks.Sample:
  """`sample` with `extra` tokens around it: code and a separator before it (a random
  share, possibly none), a separator and code after it."""
  before = int(rng.integers(0, extra + 1))
  after = extra - before

  sep_, none = np.asarray([sep], np.int32), np.zeros(0, np.int32)
  # Each side: n tokens, the separator next to the task and n - 1 of code beyond it.
  head = np.concatenate([tasks.code_window(rng, stream, before - 1), sep_]) if before else none
  tail = np.concatenate([sep_, tasks.code_window(rng, stream, after - 1)]) if after else none
  tokens = np.concatenate([head, sample.tokens, tail]).astype(np.int32)
  mask = np.concatenate([np.zeros(before, bool), sample.answer_mask, np.zeros(after, bool)])
  needle_at = None if sample.needle_at is None else sample.needle_at + before
  return tasks.Sample(tokens, mask, needle_at)


class _Sampler:
  """Index -> sample; picklable so grain may run it in worker threads."""

  def __init__(self, cfg: DataConfig, split: str, seq_len: int, stage: int):
    self.cfg, self.seq_len, self.stage = cfg, seq_len, stage
    self.tokenizer = cfg.make_tokenizer()
    self.stream = corpus.token_stream(self.tokenizer, split, cfg.val_fraction, cfg.corpus_root)
    self.text_source = ruler.Source(self.tokenizer, split, cfg.val_fraction, cfg.corpus_root)
    self.names = [n for n, _ in cfg.mixture]
    weights = np.asarray([w for _, w in cfg.mixture], np.float64)
    self.probs = weights / weights.sum()

  def __call__(self, index: int):
    rng = np.random.default_rng([self.cfg.seed, self.stage, int(index)])
    source = self.names[int(rng.choice(len(self.names), p=self.probs))]
    return make_sample(
      self.cfg, self.tokenizer, self.stream, self.seq_len, rng, source, self.text_source
    )


def make_dataset(
  cfg: DataConfig, *, seq_len: int, batch_size: int, stage: int = 0, split: str = "train"
):
  """An infinite grain IterDataset of batches {tokens [b, seq_len + 1], answer_mask, source}.

  Each process of a multi-host run reads its own slice of indices; `batch_size` is per
  process.
  """
  ds = grain.MapDataset.range(1 << 62)
  if jax.process_count() > 1:
    ds = ds[jax.process_index() :: jax.process_count()]
  ds = ds.map(_Sampler(cfg, split, seq_len, stage)).batch(batch_size, drop_remainder=True)
  return ds.to_iter_dataset(
    grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch)
  )

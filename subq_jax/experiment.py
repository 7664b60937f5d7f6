"""From an ml_collections ConfigDict to the frozen dataclasses the code reads.

Config files (`configs/*.py`) return a ConfigDict with sections `model`, `data`, `train`,
`eval` (plus `model.attention`) and `mesh` (mesh axes, sequence layout, logical-axis
rules); `resolve` turns it into an `ExperimentConfig`, failing at start with the dotted
name of an unknown key or a bad value. `parse_arg` reads the
big_vision-style variant string after the colon (`--config=configs/x.py:kind=dense,smoke`).
"""

from __future__ import annotations

import copy
import dataclasses
import json

import ml_collections

from subq_jax.config import SSAConfig
from subq_jax.data import tasks
from subq_jax.data.pipeline import DataConfig
from subq_jax.model import ModelConfig
from subq_jax.sharding import MeshConfig

LOSS_AGGREGATIONS = ("token", "sample")


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of a context-extension schedule."""

  seq_len: int
  steps: int
  rope_scale: float = 1.0  # YaRN scale factor for this stage (1 = plain RoPE)
  batch_size: int | None = None  # None = train.batch_size (e.g. fewer, longer sequences)
  # This stage's changes to `data` (None = none): DataConfig fields, with `niah` and `mqar`
  # changed field by field, e.g. {"mixture": {"code": 0.1, "mqar": 0.9}, "mqar":
  # {"pairs_at": 0.0}} (a short stage leaves out sources longer than it).
  data: dict | None = None
  # This stage's changes to `model.attention` (None = none): what and how much each layer
  # selects, e.g. {"top_k": 2} so that routing decides even at a short length, or
  # {"kind": "dense"} to train dense before converting to the model's kind. Fields the
  # layers' parameters depend on (indexer_heads, indexer_dim, a kind to or from `indexer`)
  # stay the model's.
  attention: dict | None = None

  def __post_init__(self):
    for name in ("data", "attention"):
      value = getattr(self, name)
      if value is not None:
        if not isinstance(value, dict):
          raise ValueError(f"stage {name}={value!r} must be a dict of {name} config changes")
        object.__setattr__(self, name, copy.deepcopy(value))  # the stage's own copy
    if not isinstance(self.seq_len, int) or self.seq_len < 2:
      raise ValueError(f"stage seq_len={self.seq_len!r} must be an integer >= 2")
    if not isinstance(self.steps, int) or self.steps < 1:
      raise ValueError(f"stage steps={self.steps!r} must be an integer >= 1")
    if self.rope_scale < 1.0:
      raise ValueError(f"stage rope_scale={self.rope_scale} must be >= 1")
    if self.batch_size is not None and self.batch_size < 1:
      raise ValueError(f"stage batch_size={self.batch_size} must be >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Attributes:
  seed: parameter-init seed.
  batch_size: sequences per step (global).
  lr, min_lr_ratio, warmup_steps: linear warm-up to `lr`, cosine to `lr * min_lr_ratio`
    over all stages.
  weight_decay, b1, b2, eps: AdamW (decay on matrices only).
  grad_clip: global-norm clipping (0 = off).
  loss_aggregation: `token` (mean over all target tokens) or `sample` (mean over
    documents of each document's mean: long and short documents weigh the same).
  answer_weight: loss weight of the synthetic tasks' answer tokens relative to the other
    tokens (1 = plain language modelling).
  indexer_loss_weight: weight of the `indexer` layers' KL(attention || indexer) loss,
    the only signal that trains the indexer (its input is detached from the model).
  stages: the context-extension schedule.
  checkpoint_every, keep_checkpoints: orbax CheckpointManager cadence and retention.
  log_every: progress line / metrics cadence.
  """

  seed: int = 0
  batch_size: int = 8
  lr: float = 3e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 100
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0
  loss_aggregation: str = "token"
  answer_weight: float = 1.0
  indexer_loss_weight: float = 1.0
  stages: tuple[Stage, ...] = (Stage(512, 1000),)
  checkpoint_every: int = 500
  keep_checkpoints: int = 2
  log_every: int = 50

  def __post_init__(self):
    object.__setattr__(
      self, "stages", tuple(s if isinstance(s, Stage) else Stage(**s) for s in self.stages)
    )
    if not self.stages:
      raise ValueError("train.stages is empty")
    if self.loss_aggregation not in LOSS_AGGREGATIONS:
      raise ValueError(
        f"train.loss_aggregation={self.loss_aggregation!r} is not one of {LOSS_AGGREGATIONS}"
      )
    for name in ("batch_size", "checkpoint_every", "log_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1")
    if self.answer_weight < 0:
      raise ValueError(f"train.answer_weight={self.answer_weight} must be >= 0")
    if self.indexer_loss_weight < 0:
      raise ValueError(f"train.indexer_loss_weight={self.indexer_loss_weight} must be >= 0")
    if self.lr <= 0:
      raise ValueError(f"train.lr={self.lr} must be > 0")
    if self.warmup_steps < 0 or self.warmup_steps > self.total_steps:
      raise ValueError(f"train.warmup_steps={self.warmup_steps} must be in [0, {self.total_steps}]")

  @property
  def total_steps(self) -> int:
    return sum(s.steps for s in self.stages)

  def stage_at(self, step: int) -> int:
    """Index of the stage that runs step `step` (0-based; the last stage past the end)."""
    end = 0
    for i, s in enumerate(self.stages):
      end += s.steps
      if step < end:
        return i
    return len(self.stages) - 1

  def stage_start(self, stage: int) -> int:
    return sum(s.steps for s in self.stages[:stage])


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Attributes:
  multipliers: evaluation lengths as multiples of the last stage's seq_len.
  tasks: synthetic tasks scored by teacher-forced exact match of the answer.
  num_samples: samples per (task, length).
  yarn: at lengths beyond training, scale RoPE with YaRN by length / trained length.
  """

  multipliers: tuple[int, ...] = (1, 4, 16)
  tasks: tuple[str, ...] = ("niah", "mqar")
  num_samples: int = 32
  yarn: bool = False
  seed: int = 1234

  def __post_init__(self):
    object.__setattr__(self, "multipliers", tuple(self.multipliers))
    object.__setattr__(self, "tasks", tuple(self.tasks))
    for t in self.tasks:
      if t not in ("niah", "mqar"):
        raise ValueError(f"eval.tasks has {t!r}, not one of ('niah', 'mqar')")
    if self.num_samples < 0:
      raise ValueError(f"eval.num_samples={self.num_samples} must be >= 0")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  model: ModelConfig
  data: DataConfig
  train: TrainConfig
  eval: EvalConfig
  # Mesh axes (data, fsdp, seq), sequence layout and the logical-axis rules that map the
  # model's parameter and activation axes onto the mesh (`subq_jax.sharding`).
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def _build(cls, values: dict, prefix: str, nested: dict | None = None):
  """cls(**values), naming unknown keys and bad values with their dotted path."""
  nested = nested or {}
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(
      f"unknown config key {prefix}.{unknown[0]} (known keys of {prefix}: {sorted(fields)})"
    )
  kwargs = {}
  for name, value in values.items():
    if name in nested:
      value = _build(nested[name], value, f"{prefix}.{name}")
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[name] = value
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f"bad value in config.{prefix}: {e}") from e


def resolve(config: ml_collections.ConfigDict) -> ExperimentConfig:
  """Validates a ConfigDict and returns the frozen dataclasses."""
  d = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  unknown = sorted(set(d) - {"model", "data", "train", "eval", "mesh"})
  if unknown:
    raise ValueError(
      f"unknown config key config.{unknown[0]} (known: model, data, train, eval, mesh)"
    )
  model = _build(ModelConfig, d.get("model", {}), "model", {"attention": SSAConfig})
  data = _build(
    DataConfig, d.get("data", {}), "data", {"niah": tasks.NIAHConfig, "mqar": tasks.MQARConfig}
  )
  if data.tokenizer == "byte" and model.vocab_size != data.make_tokenizer().vocab_size:
    raise ValueError(
      f"model.vocab_size={model.vocab_size} does not match the byte tokenizer's "
      f"{data.make_tokenizer().vocab_size}"
    )
  train_d = dict(d.get("train", {}))
  stages = train_d.get("stages", None)
  if stages is not None:
    for i, s in enumerate(stages):
      s = dict(s)
      unknown = sorted(set(s) - {f.name for f in dataclasses.fields(Stage)})
      if unknown:
        raise ValueError(f"unknown config key train.stages[{i}].{unknown[0]}")
  train = _build(TrainConfig, train_d, "train")
  ev = _build(EvalConfig, d.get("eval", {}), "eval")
  mesh = d.get("mesh", {})
  if "rules" in mesh:  # ConfigDict lists -> the rules' tuples
    rules = tuple((name, tuple(t) if isinstance(t, list) else t) for name, t in mesh["rules"])
    mesh = dict(mesh, rules=rules)
  mesh = _build(MeshConfig, mesh, "mesh")
  return ExperimentConfig(model=model, data=data, train=train, eval=ev, mesh=mesh)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'kind=dense,smoke' -> ConfigDict(kind='dense', smoke=True), typed like `defaults`.

  An unknown variant name fails, naming it.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config variant {key!r} (known: {sorted(defaults)})")
    default = defaults[key]
    if not value:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif default is None:
      out[key] = value
    else:
      out[key] = type(default)(value)
  return out


def default_config() -> ml_collections.ConfigDict:
  """Every key with its dataclass default: config files start here and override."""

  def plain(obj):
    d = dataclasses.asdict(obj)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

  data = plain(DataConfig())
  data["mixture"] = dict(DataConfig().mixture)
  train = plain(TrainConfig())
  return ml_collections.ConfigDict(
    {
      "model": plain(ModelConfig()),
      "data": data,
      "train": train,
      "eval": plain(EvalConfig()),
      "mesh": plain(MeshConfig()),
    }
  )

"""Training loop: exact resume, NaN guard, config errors, checkpoint safety."""

import dataclasses
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subq_jax import train as train_lib
from subq_jax.config import SSAConfig
from subq_jax.data import tasks
from subq_jax.data.pipeline import DataConfig
from subq_jax.experiment import (
  EvalConfig,
  ExperimentConfig,
  Stage,
  TrainConfig,
  default_config,
  resolve,
)
from subq_jax.model import ModelConfig

ROOT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "subq_jax")


def _cfg(steps=4, **train_kw):
  model = ModelConfig(
    num_layers=1,
    d_model=32,
    num_heads=2,
    num_kv_heads=1,
    mlp_dim=64,
    dtype="float32",
    attention=SSAConfig(kind="dense"),  # the loop does not depend on the kind: fastest compile
  )
  data = DataConfig(
    corpus_root=ROOT,
    val_fraction=0.3,
    niah=tasks.NIAHConfig(num_needles=1, num_queries=1, uuid_chars=8),
    mqar=tasks.MQARConfig(num_pairs=2, num_queries=1),
  )
  kw = dict(batch_size=2, warmup_steps=1, checkpoint_every=2, log_every=1)
  kw.update(train_kw)
  train = TrainConfig(stages=(Stage(64, steps),), **kw)
  return ExperimentConfig(model, data, train, EvalConfig(num_samples=0))


def _quiet(*_):
  pass


def test_exact_resume(tmp_path):
  """Stopped after 2 steps and resumed == uninterrupted, across a context-extension stage."""
  cfg = _cfg()
  cfg = dataclasses.replace(
    cfg, train=dataclasses.replace(cfg.train, stages=(Stage(64, 3), Stage(96, 2, rope_scale=1.5)))
  )
  full = train_lib.train(cfg, str(tmp_path / "full"), log=_quiet)
  part = train_lib.train(cfg, str(tmp_path / "resumed"), stop_after=2, log=_quiet)
  assert sorted(part.losses) == [1, 2]
  rest = train_lib.train(cfg, str(tmp_path / "resumed"), log=_quiet)
  assert sorted(rest.losses) == [3, 4, 5]
  resumed = part.losses | rest.losses
  assert sorted(full.losses) == sorted(resumed)
  for step, loss in full.losses.items():
    np.testing.assert_allclose(resumed[step], loss, rtol=0, atol=1e-6)
  chex.assert_trees_all_close(full.params, rest.params, atol=1e-6)
  # Metrics of the resumed run continue the same file; config saved beside checkpoints.
  rows = [json.loads(x) for x in open(tmp_path / "resumed" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
  assert json.load(open(tmp_path / "resumed" / "config.json"))["train"]["batch_size"] == 2


def test_nan_guard_names_step(tmp_path, monkeypatch):
  real = train_lib.lm_loss

  def poisoned(logits, tokens, **kw):
    loss, metrics = real(logits, tokens, **kw)
    return loss * jnp.nan, metrics | {"loss": loss * jnp.nan}

  monkeypatch.setattr(train_lib, "lm_loss", poisoned)
  with pytest.raises(train_lib.NonFiniteLossError, match=r"step 1: non-finite .*loss"):
    train_lib.train(_cfg(), str(tmp_path), log=_quiet)
  # Nothing non-finite was saved.
  assert not os.path.exists(tmp_path / "checkpoints" / "2")


def test_check_finite_names_parameters():
  metrics = {"loss": np.float32(1.0), "grad_norm": np.float32(np.inf)}
  metrics["grads_finite"] = {"embed": np.bool_(True), "wq": np.bool_(False)}
  with pytest.raises(train_lib.NonFiniteLossError, match=r"step 7: .*grad_norm.*wq"):
    train_lib.check_finite(7, metrics)


def test_incompatible_checkpoint_dir(tmp_path):
  train_lib.train(_cfg(steps=2), str(tmp_path), log=_quiet)
  other = _cfg(steps=2)
  other = dataclasses.replace(other, model=dataclasses.replace(other.model, d_model=48))
  with pytest.raises(train_lib.IncompatibleCheckpointError, match="d_model"):
    train_lib.train(other, str(tmp_path), log=_quiet)


def test_partial_checkpoint_is_not_latest(tmp_path):
  train_lib.train(_cfg(steps=2), str(tmp_path), log=_quiet)
  ckpt = tmp_path / "checkpoints"
  # What a crash during orbax's save of step 4 leaves behind: an unfinished temp dir.
  partial = ckpt / "4.orbax-checkpoint-tmp-1234"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "junk").write_bytes(b"\0" * 10)
  mngr = train_lib._checkpoint_manager(str(tmp_path), _cfg().train)
  assert mngr.latest_step() == 2
  result = train_lib.train(_cfg(steps=3), str(tmp_path), log=_quiet)
  assert sorted(result.losses) == [3]


def test_interrupt_saves_last_step(tmp_path):
  calls = []

  def log(msg):
    calls.append(msg)
    if msg.startswith("step      1/"):
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    train_lib.train(_cfg(steps=4, checkpoint_every=3), str(tmp_path), log=log)
  assert any("saved a checkpoint at step 1" in m for m in calls)
  assert train_lib._checkpoint_manager(str(tmp_path), _cfg().train).latest_step() == 1


@pytest.mark.parametrize("aggregation", ["token", "sample"])
def test_loss_aggregation(aggregation):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 9, 12)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 10, (2, 10)), jnp.int32).at[0, 3].set(11)
  loss, _ = train_lib.lm_loss(logits, tokens, aggregation=aggregation, sep_id=11, pad_id=-1)
  nll = -np.take_along_axis(
    np.asarray(jax_log_softmax(logits)), np.asarray(tokens[:, 1:, None]), -1
  )[..., 0]
  if aggregation == "token":
    expected = nll.mean()
  else:  # documents: row 0's first ends predicting the separator (target position 2)
    expected = np.mean([nll[0, :3].mean(), nll[0, 3:].mean(), nll[1].mean()])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_answer_accuracy_per_source():
  """answer_acc/<source> is the accuracy on that source's answer tokens; a source with no
  answer tokens in the batch logs nothing."""
  from subq_jax.data.pipeline import SOURCES

  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, 10, (3, 16)), jnp.int32)
  answer = jnp.asarray(rng.random((3, 16)) < 0.5)
  # Right on a different share of each row's targets: 0.9, 0.2, 0.6.
  right = rng.random((3, 15)) < np.array([[0.9], [0.2], [0.6]])
  logits = rng.normal(size=(3, 15, 12)) + 10.0 * right[..., None] * np.eye(12)[tokens[:, 1:]]
  logits = jnp.asarray(logits, jnp.float32)
  source = jnp.asarray([SOURCES.index(s) for s in ("mqar", "niah", "mqar")], jnp.int32)
  _, m = train_lib.lm_loss(
    logits, tokens, aggregation="token", sep_id=11, pad_id=-1, answer_mask=answer, source=source
  )
  correct = np.asarray(jnp.argmax(logits, -1) == tokens[:, 1:])
  am = np.asarray(answer[:, 1:])
  assert 0 < correct[am].mean() < 1
  for name, rows in (("mqar", [0, 2]), ("niah", [1])):
    expected = correct[rows][am[rows]].mean()
    assert abs(expected - correct[am].mean()) > 0.05  # differs from the pooled figure
    np.testing.assert_allclose(m[f"answer_acc/{name}"], expected, rtol=1e-6)
    assert int(m[f"answer_n/{name}"]) == am[rows].sum()
  np.testing.assert_allclose(m["answer_token_acc"], correct[am].mean(), rtol=1e-6)
  logged = train_lib._log_scalars(m)
  assert {k for k in logged if k.startswith("answer_")} == {
    "answer_token_acc",
    "answer_acc/mqar",
    "answer_acc/niah",
  }


def jax_log_softmax(x):
  import jax

  return jax.nn.log_softmax(x)


@pytest.mark.parametrize(
  "path,value,match",
  [
    ("model.d_modle", 3, "unknown config key model.d_modle"),
    ("train.loss_aggregation", "mean", "loss_aggregation"),
    ("model.num_kv_heads", 3, "num_heads=4 must be a multiple"),
    ("model.attention.kind", "flash", "kind='flash'"),
    ("data.mixture.books", 1.0, "books"),
  ],
)
def test_config_errors_name_the_key(path, value, match):
  c = default_config()
  c.model.num_heads = 4
  c.unlock()
  node = c
  *parents, leaf = path.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=match):
    resolve(c)


def test_stage_schedule_errors():
  cfg = _cfg()
  with pytest.raises(ValueError, match=r"stages\[0\].*cannot hold niah"):
    train_lib.check_schedule(
      dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stages=(Stage(16, 1),)))
    )
  with pytest.raises(ValueError, match="stages extend the context"):
    train_lib.check_schedule(
      dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, stages=(Stage(128, 1), Stage(64, 1)))
      )
    )


def test_stage_data_changes():
  """A stage's `data` changes its mixture and task knobs field by field; the loop's checks
  and batches use them; bad changes name the stage and the field."""
  from subq_jax.data.pipeline import SOURCES, make_dataset

  cfg = _cfg()
  short = Stage(32, 1, data={"mixture": {"mqar": 1.0}, "mqar": {"separator": "="}})
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stages=(short, Stage(64, 1))))
  d0, d1 = train_lib.stage_data_config(cfg, 0), train_lib.stage_data_config(cfg, 1)
  assert d0.mixture == (("mqar", 1.0),) and d1 == cfg.data
  assert d0.mqar.separator == "=" and d0.mqar.num_pairs == cfg.data.mqar.num_pairs == 2
  train_lib.check_schedule(cfg)  # 32 tokens hold MQAR, not the NIAH of data.mixture
  batch = next(iter(make_dataset(d0, seq_len=32, batch_size=4, stage=0)))
  assert {SOURCES[int(i)] for i in batch["source"]} == {"mqar"}
  no_change = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stages=(Stage(32, 1),)))
  with pytest.raises(ValueError, match=r"stages\[0\].*cannot hold niah"):
    train_lib.check_schedule(no_change)
  with pytest.raises(ValueError, match=r"stage data=\[\('mqar', 1.0\)\] must be a dict"):
    Stage(32, 1, data=[("mqar", 1.0)])
  for data, match in [
    ({"books": 1.0}, r"stages\[0\]\.data\.books"),
    ({"mqar": {"pairs": 3}}, r"stages\[0\]\.data=.*pairs"),
    ({"mixture": {"books": 1.0}}, r"stages\[0\]\.data=.*books"),
    ({"mqar": {"pairs_at": 0.5}}, r"stages\[0\]\.data=.*pairs_at=0.5 needs layout"),
  ]:
    bad = dataclasses.replace(cfg.train, stages=(Stage(32, 1, data=data), Stage(64, 1)))
    with pytest.raises(ValueError, match=match):
      train_lib.stage_data_config(dataclasses.replace(cfg, train=bad), 0)


def test_stage_attention_changes(tmp_path):
  """A stage's `attention` changes what the layers select in that stage only; the
  parameters carry across stages; bad changes name the stage, the field and the value."""
  cfg = _cfg()
  attn = SSAConfig(kind="ssa", block_size=8, top_k=4, fanout=2, beam=2, local_blocks=0)
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=attn))

  def with_stages(*stages):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stages=stages))

  # A routed stage with less selected, a dense stage (a dense model converted), the model's.
  three = with_stages(
    Stage(64, 1, attention={"top_k": 1, "beam": 1}),
    Stage(64, 1, attention={"kind": "dense"}),
    Stage(128, 1),
  )
  first, dense, last = (train_lib.stage_model_config(three, i).attention for i in range(3))
  assert (first.kind, first.top_k, first.beam, first.block_size) == ("ssa", 1, 1, 8)
  assert train_lib.stage_model_config(three, 0).layer_attention(0).keys_per_query == 3 * 8
  assert dense == dataclasses.replace(attn, kind="dense")
  assert last == attn
  train_lib.check_schedule(three)
  result = train_lib.train(three, str(tmp_path), log=_quiet)  # all stages, one parameter tree
  assert sorted(result.losses) == [1, 2, 3] and np.isfinite(result.losses[3])
  assert result.model_config.attention == attn
  with pytest.raises(ValueError, match=r"stage attention=\[\('top_k', 1\)\] must be a dict"):
    Stage(64, 1, attention=[("top_k", 1)])
  for change, match in [
    ({"topk": 1}, r"stages\[0\]\.attention\.topk: not an attention config field"),
    ({"kind": "indexer"}, r"stages\[0\]\.attention\.kind='indexer': the indexer's layers"),
    ({"indexer_dim": 8}, r"attention\.indexer_dim=8: .* keeps the model's \(32\)"),
    ({"top_k": 0}, r"stages\[0\]\.attention=\{'top_k': 0\}: top_k=0 must be an integer >= 1"),
  ]:
    bad = with_stages(Stage(64, 1, attention=change), Stage(128, 1))
    with pytest.raises(ValueError, match=match):
      train_lib.check_schedule(bad)
  # Per-layer kinds would override the stage's kind; an indexer model cannot go dense.
  for model, match in [
    (dict(attention_pattern=("ssa", "dense")), r"kind='dense': model\.attention_pattern="),
    (dict(attention=dataclasses.replace(attn, kind="indexer")), r"the model's kind is 'indexer'"),
  ]:
    bad = with_stages(Stage(64, 1, attention={"kind": "dense"}), Stage(128, 1))
    bad = dataclasses.replace(bad, model=dataclasses.replace(cfg.model, **model))
    with pytest.raises(ValueError, match=match):
      train_lib.check_schedule(bad)


def test_stage_rope_original_length():
  """YaRN's original length is the longest plain-RoPE stage so far: a 64 -> 256 curriculum
  trains RoPE at 256, so evaluation at 1024 with YaRN scales 4x from 256, not from 64."""
  from subq_jax import evaluate

  cfg = _cfg()

  def with_stages(*stages):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stages=stages))

  curriculum = with_stages(Stage(64, 1), Stage(256, 1))
  assert train_lib.stage_model_config(curriculum, 0).rope_original_length == 64
  last = train_lib.stage_model_config(curriculum, 1)
  assert (last.rope_scale, last.rope_original_length) == (1.0, 256)
  ev = evaluate.eval_model_config(last, 256, 1024, yarn=True)
  assert (ev.rope_scale, ev.rope_original_length) == (4.0, 256)
  # A YaRN stage after the plain ones scales from the longest plain stage.
  extended = with_stages(Stage(64, 1), Stage(256, 1), Stage(1024, 1, rope_scale=4.0))
  yarn = train_lib.stage_model_config(extended, 2)
  assert (yarn.rope_scale, yarn.rope_original_length) == (4.0, 256)
  ev = evaluate.eval_model_config(yarn, 1024, 4096, yarn=True)
  assert (ev.rope_scale, ev.rope_original_length) == (16.0, 256)


def test_indexer_learns_only_from_its_kl():
  """An `indexer` model's step reports the KL and its gradient reaches the indexer
  weights; with the KL's weight at 0 the indexer gets no gradient at all."""
  from flax import nnx

  from subq_jax.model import Transformer

  cfg = _cfg()
  attn = SSAConfig(kind="indexer", block_size=8, top_k=1, indexer_heads=2, indexer_dim=8)
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=attn))
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = np.random.default_rng(0).integers(0, 256, (2, 65)).astype(np.int32)
  batch = {"tokens": jnp.asarray(tokens), "answer_mask": jnp.zeros((2, 65), bool)}

  def indexer_grads(weight):
    train = dataclasses.replace(cfg.train, indexer_loss_weight=weight, grad_clip=0.0)
    c = dataclasses.replace(cfg, train=train)
    step = train_lib.make_train_step(graphdef, train_lib.make_optimizer(train), c, 0, 257)
    opt_state = train_lib.make_optimizer(train).init(params)
    _, _, metrics = step(jax.tree.map(jnp.copy, params), opt_state, batch)
    return metrics

  m1 = indexer_grads(1.0)
  assert float(m1["indexer_kl"]) > 0.0
  assert float(m1["indexer_grad_norm"]) > 0.0
  m0 = indexer_grads(0.0)
  assert float(m0["indexer_grad_norm"]) == 0.0

  # The indexer's input is detached: its KL reaches the indexer weights and nothing else.
  def kl(p):
    _, infos = nnx.merge(graphdef, p)(batch["tokens"][:, :-1], return_info=True)
    return sum(jnp.mean(i.indexer_loss) for i in infos)

  for path, g in jax.tree.leaves_with_path(jax.grad(kl)(params)):
    is_indexer = "idx_" in jax.tree_util.keystr(path)
    assert (float(jnp.abs(g).max()) > 0.0) == is_indexer, jax.tree_util.keystr(path)

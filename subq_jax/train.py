"""Training loop: AdamW, staged context extension, orbax checkpoints, exact resume.

`train(config, workdir)` runs (or resumes) the schedule of `config.train.stages`. The
orbax checkpoint holds {"state": params + optimizer, "data": grain iterator state and
stage, "meta": the model config}, written atomically (orbax renames a finished temporary
directory; a partial one is never listed as a step). Data is a pure function of the step
(see subq_jax/data/pipeline.py), so a resumed run reproduces the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from subq_jax.data.pipeline import SOURCES, DataConfig, make_dataset, make_sample
from subq_jax.experiment import ExperimentConfig, TrainConfig
from subq_jax.model import ModelConfig, Transformer, count_params


class IncompatibleCheckpointError(ValueError):
  pass


class NonFiniteLossError(FloatingPointError):
  pass


# ----------------------------------------------------------------------------- pieces


# Attention fields the layers' parameters depend on: a stage cannot change them. `kind`
# can change between the kinds without parameters of their own (all but `indexer`).
_PARAMETER_FIELDS = ("indexer_heads", "indexer_dim")


def _check_stage_kind(cfg: ExperimentConfig, stage: int, kind) -> None:
  """A stage's `kind` must leave the parameter tree as it is: no indexer on either side
  and one kind for every layer (no `attention_pattern`, which would override it)."""
  where = f"train.stages[{stage}].attention.kind={kind!r}"
  if cfg.model.attention_pattern:
    raise ValueError(
      f"{where}: model.attention_pattern={list(cfg.model.attention_pattern)} sets each "
      "layer's kind, so a stage cannot change it"
    )
  if "indexer" in (kind, cfg.model.attention.kind):
    raise ValueError(
      f"{where}: the indexer's layers have parameters of their own, so a stage cannot "
      f"switch between indexer and another kind (the model's kind is "
      f"{cfg.model.attention.kind!r})"
    )


def stage_model_config(cfg: ExperimentConfig, stage: int) -> ModelConfig:
  """The model config of a stage: its YaRN scale over the original RoPE length, and its
  changes to the attention's selection (`Stage.attention`).

  The original length (YaRN's L) is `model.rope_original_length` when set, else the
  longest stage up to this one trained with plain RoPE (rope_scale 1): a curriculum of
  plain stages (512 then 4096) has RoPE trained at 4096, and a YaRN stage after it scales
  from there."""
  s = cfg.train.stages[stage]
  stages = cfg.train.stages[: stage + 1]
  plain = [t.seq_len for t in stages if t.rope_scale == 1.0] or [stages[0].seq_len]
  changes = s.attention or {}
  fields = {f.name for f in dataclasses.fields(cfg.model.attention)}
  for name in sorted(changes):
    if name not in fields:
      raise ValueError(f"train.stages[{stage}].attention.{name}: not an attention config field")
    if name == "kind":
      _check_stage_kind(cfg, stage, changes[name])
    if name in _PARAMETER_FIELDS:
      raise ValueError(
        f"train.stages[{stage}].attention.{name}={changes[name]!r}: the layers' parameters "
        f"depend on {name}, so every stage keeps the model's "
        f"({getattr(cfg.model.attention, name)!r})"
      )
  try:
    attention = dataclasses.replace(cfg.model.attention, **changes)
  except (TypeError, ValueError) as e:
    raise ValueError(f"train.stages[{stage}].attention={s.attention}: {e}") from e
  return dataclasses.replace(
    cfg.model,
    attention=attention,
    rope_scale=s.rope_scale,
    rope_original_length=cfg.model.rope_original_length or max(plain),
  )


def stage_data_config(cfg: ExperimentConfig, stage: int) -> DataConfig:
  """The data config of a stage: `data` with the stage's changes (`Stage.data`)."""
  changes = dict(cfg.train.stages[stage].data or {})
  fields = {f.name for f in dataclasses.fields(DataConfig)}
  unknown = sorted(set(changes) - fields)
  if unknown:
    raise ValueError(f"train.stages[{stage}].data.{unknown[0]}: not a data config field")
  try:
    for name in ("niah", "mqar"):
      if name in changes:
        changes[name] = dataclasses.replace(getattr(cfg.data, name), **changes[name])
    return dataclasses.replace(cfg.data, **changes)
  except (TypeError, ValueError) as e:
    raise ValueError(f"train.stages[{stage}].data={cfg.train.stages[stage].data}: {e}") from e


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=tc.lr,
    warmup_steps=tc.warmup_steps,
    decay_steps=max(tc.total_steps, tc.warmup_steps + 1),
    end_value=tc.lr * tc.min_lr_ratio,
  )
  # Decay matrices only: norms' scales (vectors) keep their weight.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  chain = [optax.clip_by_global_norm(tc.grad_clip)] if tc.grad_clip > 0 else []
  chain.append(
    optax.adamw(
      schedule, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay, mask=decay_mask
    )
  )
  return optax.chain(*chain)


def lm_loss(
  logits_BxTxV,
  tokens_BxT1,
  *,
  aggregation: str,
  sep_id: int,
  pad_id: int,
  answer_mask=None,
  answer_weight: float = 1.0,
  source=None,
):
  """Next-token loss and metrics.

  `token`: mean NLL over all target tokens. `sample`: each document (a run of tokens up
  to and including a separator) gets its own mean NLL, and documents are averaged.
  `answer_weight` multiplies the weight of the synthetic tasks' answer tokens (1 = plain
  language modelling). `source` ([B], indices into the data pipeline's SOURCES) adds the
  answer accuracy of each source, `answer_acc/<source>`, with its answer-token count
  `answer_n/<source>` (0 where the batch has none of that source).
  """
  inputs, targets = tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]
  logp = jax.nn.log_softmax(logits_BxTxV)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  valid = (targets != pad_id).astype(jnp.float32)
  weight = valid
  if answer_mask is not None and answer_weight != 1.0:
    weight = valid * (1.0 + (answer_weight - 1.0) * answer_mask[:, 1:].astype(jnp.float32))
  if aggregation == "token":
    loss = jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)
  else:
    b, t = targets.shape
    doc = jnp.cumsum(inputs == sep_id, axis=1) + jnp.arange(b)[:, None] * (t + 1)
    doc = doc.reshape(-1)
    num = b * (t + 1)
    doc_nll = jax.ops.segment_sum((nll * weight).reshape(-1), doc, num_segments=num)
    doc_cnt = jax.ops.segment_sum(weight.reshape(-1), doc, num_segments=num)
    present = doc_cnt > 0
    loss = jnp.sum(jnp.where(present, doc_nll / jnp.maximum(doc_cnt, 1.0), 0.0)) / jnp.maximum(
      jnp.sum(present), 1
    )
  metrics = {"loss": loss, "token_nll": jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1.0)}
  if answer_mask is not None:
    am = answer_mask[:, 1:].astype(jnp.float32)
    correct = (jnp.argmax(logits_BxTxV, -1) == targets).astype(jnp.float32)
    metrics["answer_token_acc"] = jnp.sum(correct * am) / jnp.maximum(jnp.sum(am), 1.0)
    if source is not None:
      for i, name in enumerate(SOURCES):
        in_source = am * (source == i)[:, None]
        n = jnp.sum(in_source)
        metrics[f"answer_acc/{name}"] = jnp.sum(correct * in_source) / jnp.maximum(n, 1.0)
        metrics[f"answer_n/{name}"] = n
  return loss, metrics


def make_train_step(graphdef, tx, cfg: ExperimentConfig, sep_id: int, pad_id: int):
  """Jitted (params, opt_state, batch) -> (params, opt_state, metrics); donates the state."""

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params)
    logits, infos = model(batch["tokens"][:, :-1], return_info=True)
    loss, metrics = lm_loss(
      logits,
      batch["tokens"],
      aggregation=cfg.train.loss_aggregation,
      sep_id=sep_id,
      pad_id=pad_id,
      answer_mask=batch["answer_mask"],
      answer_weight=cfg.train.answer_weight,
      source=batch.get("source"),
    )
    kls = [jnp.mean(i.indexer_loss) for i in infos if i is not None and i.indexer_loss is not None]
    if kls:  # indexer layers: their KL to the attention trains the (detached) indexer
      metrics["indexer_kl"] = sum(kls) / len(kls)
      loss = loss + cfg.train.indexer_loss_weight * metrics["indexer_kl"]
    return loss, metrics

  def step(params, opt_state, batch):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    metrics["grad_norm"] = optax.tree.norm(grads)
    indexer = [
      g for path, g in jax.tree.leaves_with_path(grads) if "idx_" in jax.tree_util.keystr(path)
    ]
    if indexer:
      metrics["indexer_grad_norm"] = optax.tree.norm(indexer)
    # Per-parameter finiteness, so a NaN report can name where it started.
    metrics["grads_finite"] = jax.tree.map(lambda g: jnp.all(jnp.isfinite(g)), grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1))


def check_finite(step: int, metrics: dict):
  """Raises NonFiniteLossError naming the step and the non-finite values."""
  scalars = {k: v for k, v in metrics.items() if k != "grads_finite"}
  bad = {k: float(v) for k, v in scalars.items() if not np.isfinite(v)}
  if not bad:
    return
  grads = metrics.get("grads_finite")
  where = ""
  if grads is not None:
    names = [
      jax.tree_util.keystr(path)
      for path, ok in jax.tree_util.tree_flatten_with_path(grads)[0]
      if not bool(ok)
    ]
    if names:
      where = f"; non-finite gradients in {len(names)} parameters, first {names[:3]}"
  raise NonFiniteLossError(f"step {step}: non-finite {bad}{where}; stopping the run")


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def check_schedule(cfg: ExperimentConfig):
  """Fails before any compute when a stage cannot hold the data or the device batch."""
  tok = cfg.data.make_tokenizer()
  stream = np.arange(1000, dtype=np.int32) % 200  # stands in for the corpus
  for i, s in enumerate(cfg.train.stages):
    if i and s.seq_len < cfg.train.stages[i - 1].seq_len:
      raise ValueError(
        f"train.stages[{i}].seq_len={s.seq_len} is shorter than the stage before "
        f"({cfg.train.stages[i - 1].seq_len}): stages extend the context"
      )
    data = stage_data_config(cfg, i)  # DataConfig checks the stage's changes
    stage_model_config(cfg, i)  # and SSAConfig the stage's attention changes
    for source, weight in data.mixture:
      if weight > 0:
        try:
          length = s.seq_len
          make_sample(data, tok, stream, length, np.random.default_rng(0), source)
          if data.task_min_len and source != "code":  # the shortest task it may build
            length = min(data.task_min_len, s.seq_len)
            whole = dataclasses.replace(data, task_min_len=0)
            make_sample(whole, tok, stream, length, np.random.default_rng(0), source)
        except ValueError as e:
          raise ValueError(
            f"train.stages[{i}] (seq_len={s.seq_len}, data.task_min_len="
            f"{data.task_min_len}) cannot hold {source} at {length} tokens: {e}"
          ) from e
    batch = s.batch_size or cfg.train.batch_size
    if batch % jax.device_count():
      raise ValueError(
        f"train.stages[{i}] batch size {batch} is not a multiple of the "
        f"{jax.device_count()} devices"
      )


# ----------------------------------------------------------------------------- the loop


def _checkpoint_manager(workdir: str, tc: TrainConfig) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), "checkpoints"),
    item_names=("state", "data", "meta"),
    options=ocp.CheckpointManagerOptions(max_to_keep=tc.keep_checkpoints, create=True),
  )


def _meta(cfg: ExperimentConfig) -> dict:
  return {
    "model": json.loads(json.dumps(dataclasses.asdict(cfg.model))),
    "tokenizer": cfg.data.tokenizer,
  }


def _check_compatible(saved: dict, cfg: ExperimentConfig, path: str):
  now = _meta(cfg)
  diffs = [k for k in now["model"] if saved.get("model", {}).get(k) != now["model"][k]]
  if saved.get("tokenizer") != now["tokenizer"]:
    diffs.append("data.tokenizer")
  if diffs:
    detail = ", ".join(
      f"model.{k}: checkpoint {saved.get('model', {}).get(k)!r} vs config {now['model'][k]!r}"
      for k in diffs
      if k in now["model"]
    )
    raise IncompatibleCheckpointError(
      f"the checkpoints in {path} were written by an incompatible config ({detail or diffs}); "
      "use another --workdir or the matching config"
    )


@dataclasses.dataclass
class TrainResult:
  params: nnx.State
  model_config: ModelConfig  # of the last stage run
  losses: dict[int, float]  # step (1-based, after the update) -> loss of that step's batch
  steps_run: int
  wall_s: float


def train(
  cfg: ExperimentConfig,
  workdir: str,
  *,
  stop_after: int | None = None,
  log=print,
) -> TrainResult:
  """Trains (resuming from the latest checkpoint in `workdir`) to the end of the schedule.

  `stop_after` ends the run after that global step with a checkpoint (as a preemption
  would). Ctrl-C saves a checkpoint of the last finished step, then re-raises.
  """
  from subq_jax.metrics import MetricWriter

  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  check_schedule(cfg)
  tc = cfg.train
  tok = cfg.data.make_tokenizer()
  mngr = _checkpoint_manager(workdir, tc)
  latest = mngr.latest_step()
  if latest is not None:
    saved_meta = mngr.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    _check_compatible(saved_meta, cfg, mngr.directory)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(cfg.to_json())

  model = Transformer(stage_model_config(cfg, 0), rngs=nnx.Rngs(tc.seed))
  kinds = [cfg.model.layer_attention(i).kind for i in range(cfg.model.num_layers)]
  log(f"model: {count_params(model):,} parameters, attention per layer {kinds}")
  _, params = nnx.split(model)
  del model
  tx = make_optimizer(tc)
  opt_state = tx.init(params)
  step = 0
  data_state = None
  if latest is not None:
    abstract = jax.tree.map(
      ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state}
    )
    restored = mngr.restore(
      latest,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
      ),
    )
    params, opt_state = restored.state["params"], restored.state["opt_state"]
    data_state = restored.data
    step = latest
    log(f"resumed from {mngr.directory}/{latest}")

  writer = MetricWriter(workdir)
  writer.truncate_after(step)
  losses: dict[int, float] = {}
  total = tc.total_steps
  end = total if stop_after is None else min(total, stop_after)
  model_cfg = stage_model_config(cfg, tc.stage_at(step))

  def save(at_step, it_state, stage):
    mngr.save(
      at_step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
        data=ocp.args.JsonSave({"stage": stage, "iterator": it_state}),
        meta=ocp.args.JsonSave(_meta(cfg)),
      ),
      force=True,
    )

  pending = None  # (step, metrics) fetched after the next step is dispatched
  it, stage = None, tc.stage_at(step)
  last_saved = step
  t_log, steps_since_log, tokens_since_log = time.time(), 0, 0
  t_run, steps_run = time.time(), 0
  try:
    while step < end:
      stage = tc.stage_at(step)
      s = tc.stages[stage]
      model_cfg = stage_model_config(cfg, stage)
      graphdef = nnx.graphdef(nnx.eval_shape(lambda c=model_cfg: Transformer(c, rngs=nnx.Rngs(0))))
      train_step = make_train_step(graphdef, tx, cfg, tok.sep_id, tok.pad_id)
      batch_size = s.batch_size or tc.batch_size
      data = stage_data_config(cfg, stage)
      it = iter(make_dataset(data, seq_len=s.seq_len, batch_size=batch_size, stage=stage))
      if data_state is not None and data_state["stage"] == stage:
        it.set_state(data_state["iterator"])
      data_state = None
      stage_end = min(tc.stage_start(stage) + s.steps, end)
      log(
        f"stage {stage}: seq_len {s.seq_len}, rope_scale {s.rope_scale}, steps {step}..{stage_end}"
      )
      while step < stage_end:
        batch = next(it)
        params, opt_state, metrics = train_step(params, opt_state, batch)
        step += 1
        if pending is not None:
          _record(pending, losses)
        pending = (step, metrics)
        steps_since_log += 1
        steps_run += 1
        tokens_since_log += batch_size * s.seq_len
        if step % tc.log_every == 0 or step == stage_end:
          _record(pending, losses)
          m = jax.device_get(pending[1])
          pending = None
          now = time.time()
          tps = tokens_since_log / max(now - t_log, 1e-9)
          sec_per_step = (now - t_run) / max(steps_run, 1)
          scalars = _log_scalars(m) | {
            "tokens_per_s": tps,
            "seq_len": s.seq_len,
            "stage": stage,
            "lr": float(_lr(tc, step)),
          }
          writer.write(step, scalars)
          per_source = ", ".join(
            f"{k.split('/')[1]} {v:.2f}" for k, v in scalars.items() if k.startswith("answer_acc/")
          )
          log(
            f"step {step:>6}/{total} | loss {scalars['loss']:.4f} | answer acc "
            f"{scalars.get('answer_token_acc', float('nan')):.3f}"
            + (f" ({per_source})" if per_source else "")
            + f" | {tps:,.0f} tok/s | ETA {_fmt_time((total - step) * sec_per_step)}"
          )
          t_log, steps_since_log, tokens_since_log = now, 0, 0
        if step % tc.checkpoint_every == 0 or step == end:
          if pending is not None:
            _record(pending, losses)
            pending = None
          save(step, it.get_state(), stage)
          last_saved = step
      writer.flush()
  except KeyboardInterrupt:
    if pending is not None:
      _record(pending, losses)  # raises if the last step went non-finite: nothing saved
    if step > last_saved and it is not None:
      save(step, it.get_state(), stage)
      mngr.wait_until_finished()
      log(f"interrupted: saved a checkpoint at step {step}")
    raise
  finally:
    mngr.wait_until_finished()
    writer.close()
  mngr.close()
  if pending is not None:
    _record(pending, losses)
  return TrainResult(params, model_cfg, losses, steps_run, time.time() - t_start)


def _log_scalars(metrics: dict) -> dict:
  """A step's metrics as floats to log: per-source answer accuracy only for the sources
  with answer tokens in the batch; no counts, no per-parameter flags."""
  m = {k: float(v) for k, v in metrics.items() if k != "grads_finite"}
  for key in [k for k in m if k.startswith("answer_n/")]:
    if m.pop(key) == 0:
      m.pop("answer_acc/" + key.split("/", 1)[1])
  return m


def _record(pending, losses):
  step, metrics = pending
  m = jax.device_get(metrics)
  check_finite(step, m)
  losses[step] = float(m["loss"])


def _lr(tc: TrainConfig, step: int) -> float:
  if step < tc.warmup_steps:
    return tc.lr * step / max(tc.warmup_steps, 1)
  frac = (step - tc.warmup_steps) / max(tc.total_steps - tc.warmup_steps, 1)
  return tc.lr * (
    tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
  )


def train_and_evaluate(config, workdir: str, log=print) -> dict:
  """The main job: resolve and print the config, train, evaluate retrieval, plot."""
  from subq_jax import evaluate
  from subq_jax.experiment import resolve

  cfg = resolve(config)
  log("resolved config:\n" + cfg.to_json())
  result = train(cfg, workdir, log=log)
  log(f"training: {result.steps_run} steps in {_fmt_time(result.wall_s)}")
  train_len = cfg.train.stages[-1].seq_len
  t0 = time.time()
  out = {"train_wall_s": result.wall_s}
  if cfg.eval.num_samples and cfg.eval.tasks:
    res = evaluate.retrieval_eval(result.params, result.model_config, cfg, train_len, log=log)
    evaluate.save_results(res, workdir, train_len)
    table = evaluate.format_table(res, train_len)
    log(f"retrieval (teacher-forced exact match), kind={cfg.model.attention.kind}:\n{table}")
    evaluate.plot_accuracy(
      res, train_len, os.path.join(workdir, "accuracy_by_length.png"), cfg.model.attention.kind
    )
    out["eval"] = res
  metrics = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics):
    evaluate.plot_loss(metrics, os.path.join(workdir, "loss.png"))
  out["eval_wall_s"] = time.time() - t0
  log(f"evaluation: {_fmt_time(out['eval_wall_s'])}; plots and eval.json in {workdir}")
  return out

"""The mechanism comparison: one model, data and token budget; one attention kind per run.

`run(...)` trains every mechanism of `MECHANISMS` (variants of `configs/ablation.py`)
at each learning rate of a small sweep, keeps the rate with the highest held-out
retrieval accuracy at the training length (`retrieval_accuracy`), and evaluates that run
at multiples of the training length:
- the training-format retrieval tasks (`subq_jax.data.tasks` NIAH and MQAR packed with
  code, as trained; teacher-forced exact match), and
- a suite of `subq_jax.data.ruler` tasks with greedy KV-cache decoding
  (`subq_jax.evaluate.suite_eval`).
It writes `compare.json`, `compare.md` and two PNGs (accuracy and pairs attended against
length, one line per mechanism) to the output directory. Every run lives in
`out_dir/runs/<mechanism>/lr<lr>`; a finished run is not trained again, so an
interrupted comparison resumes.

Choosing the learning rate. The criterion is the pooled accuracy of the training-format
NIAH and MQAR at 1x the training length (`retrieval_accuracy`: sum(mean * n) / sum(n)
over the two tasks) on held-out samples; accuracies equal at two decimals go to the
lower held-out LM loss; a diverged rate is chosen only when every rate diverged. The
held-out LM loss alone, the earlier rule, is dominated by the code tokens and, on an H100,
picked a rate that never learned recall (lr 2e-3: loss 0.99, MQAR 0.12; lr 1e-3: loss
1.07, MQAR 0.90), while the comparison is about retrieval.
Caveat: the 1x training-format figure the table reports for the chosen rate measures the
very quantity the rate was chosen for, on the same kind of samples. In `run` they are
independent draws (selection seed `SELECTION_SEED`, the reported suite seed 0); in
`assemble` of older compare.json files (no `retrieval_acc` in the sweep) they are
literally the same samples, so there the figure is slightly optimistic (the best of a few
noisy estimates). The 4x and 16x figures and the RULER-format tasks are not selected on.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from subq_jax.data import ruler, scoring

# name: (variant of configs/ablation.py, the mechanism whose trained runs it reuses)
MECHANISMS = {
  "ssa_mean": ("kind=ssa,summary=mean", None),
  "ssa_bounds": ("kind=ssa,summary=bounds", None),
  "dense_rope": ("kind=dense", None),
  "dense_yarn": ("kind=dense,yarn", "dense_rope"),  # same training, YaRN at evaluation
  "ssa_yarn": ("kind=ssa,summary=bounds,yarn", "ssa_bounds"),  # likewise
  "sliding": ("kind=sliding", None),
  "block_topk": ("kind=block_topk", None),
  "indexer": ("kind=indexer", None),
  "indexer_yarn": ("kind=indexer,yarn", "indexer"),  # likewise
}
DEFAULT_TASKS = (
  "niah_single_1",
  "niah_single_2",
  "niah_uuid",
  "niah_multikey_1",
  "vt",
  "qa_1",
  "mqar",
)
# The rows whose pooled accuracy at the training length chooses the learning rate.
SELECTION_TASKS = ("niah (train format)", "mqar (train format)")
SELECTION_SEED = 1  # the selection's samples; the reported suite uses seed 0


def load_config_module(path: str):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _set(config, dotted: str, value):
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise ValueError(f"unknown config key {dotted}")
  node[leaf] = value


def parse_overrides(items) -> dict:
  """['train.batch_size=4', 'data.corpus_root=/x'] -> {dotted key: value}."""
  out = {}
  for item in items or ():
    key, sep, raw = item.partition("=")
    if not sep:
      raise ValueError(f"override {item!r} must look like key.sub=value")
    try:
      out[key] = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      out[key] = raw
  return out


def build_config(config_path: str, name: str, lr: float, variant: str = "", overrides=None):
  """The resolved ExperimentConfig of mechanism `name` at learning rate `lr`."""
  from subq_jax.experiment import resolve

  arg = ",".join(filter(None, [MECHANISMS[name][0], variant]))
  c = load_config_module(config_path).get_config(arg)
  c.train.lr = float(lr)
  for key, value in (overrides or {}).items():
    _set(c, key, value)
  return resolve(c)


def validation_loss(params, model_cfg, cfg, num_batches: int) -> float:
  """Mean next-token loss on `num_batches` held-out batches at the training length."""
  from subq_jax.data.pipeline import make_dataset
  from subq_jax.model import Transformer
  from subq_jax.train import lm_loss, stage_data_config

  tok = cfg.data.make_tokenizer()
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
  seq_len = cfg.train.stages[-1].seq_len
  data = stage_data_config(cfg, len(cfg.train.stages) - 1)
  ds = make_dataset(
    data, seq_len=seq_len, batch_size=cfg.train.batch_size, stage=0, split="validation"
  )

  @jax.jit
  def loss_fn(params, tokens):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return lm_loss(logits, tokens, aggregation="token", sep_id=tok.sep_id, pad_id=tok.pad_id)[0]

  it = iter(ds)
  losses = [float(loss_fn(params, jnp.asarray(next(it)["tokens"]))) for _ in range(num_batches)]
  return float(np.mean(losses))


def retrieval_accuracy(results: dict, length) -> float | None:
  """The learning-rate criterion: pooled accuracy of the `SELECTION_TASKS` rows of
  `results` ({task: {str(length): {"mean", "n", ...}}}, as in a compare.json entry) at
  `length`, i.e. sum(mean * n) / sum(n) over those tasks; None without samples."""
  rows = [results[t][str(length)] for t in SELECTION_TASKS if str(length) in results.get(t, {})]
  total = sum(r["n"] for r in rows)
  if not total:
    return None
  return sum(r["mean"] * r["n"] for r in rows) / total


def _choice_key(record: dict):
  """Sort key of a sweep record, best first: not diverged, then the higher retrieval
  accuracy at the tables' precision (two decimals: 0.154 and 0.152, one sample of 448
  apart, tie), then the lower held-out loss."""
  acc = record.get("retrieval_acc")
  acc = math.inf if acc is None else -round(acc, 2)
  return (math.isinf(record["val_loss"]), acc, record["val_loss"])


def _selection_accuracy(record: dict, workdir: str, samples: int, batch_size: int, log) -> dict:
  """Adds `retrieval_acc` to a finished run's record (the training-format NIAH and MQAR at
  1x only, `samples` each, seed `SELECTION_SEED`; report under `workdir/selection`) and
  saves the record again; a record that has it, or diverged, is returned as it is."""
  from subq_jax import evaluate

  if "retrieval_acc" in record or math.isinf(record["val_loss"]):
    return record
  suite = evaluate.evaluate_checkpoint(
    workdir,
    suites=(),
    lengths="1x",
    batch_size=batch_size,
    seed=SELECTION_SEED,
    out_dir=os.path.join(workdir, "selection"),
    label=f"lr {record['lr']:g} selection",
    train_tasks=("niah", "mqar"),
    train_samples=samples,
    log=lambda *_: None,
  )
  results = {}
  for (task, length), r in evaluate.pool(suite["cells"]).items():
    results.setdefault(task, {})[str(length)] = r
  record = dict(record, retrieval_acc=retrieval_accuracy(results, suite["train_len"]))
  acc = record["retrieval_acc"]
  log(f"  lr={record['lr']:g}: retrieval accuracy at 1x {'-' if acc is None else f'{acc:.3f}'}")
  with open(os.path.join(workdir, "compare_run.json"), "w") as f:
    json.dump(record, f, indent=1)
  return record


def _train_one(cfg, workdir: str, val_batches: int, log) -> dict:
  """Trains (or finds finished) one run; returns its record (val loss, wall time)."""
  from subq_jax import evaluate
  from subq_jax import train as train_lib

  record_path = os.path.join(workdir, "compare_run.json")
  if os.path.exists(record_path):
    with open(record_path) as f:
      return json.load(f)
  record = {"workdir": workdir, "lr": cfg.train.lr}
  try:
    result = train_lib.train(cfg, workdir, log=lambda *_: None)
    record["train_wall_s"] = round(result.wall_s, 1)
    record["steps_run"] = result.steps_run  # fewer than `step` when it resumed a cut run
    record["final_loss"] = result.losses.get(max(result.losses)) if result.losses else None
    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics):  # steady state: the last logging interval, compile excluded
      with open(metrics) as f:
        rows = [json.loads(line) for line in f if line.strip()]
      if rows:
        record["tokens_per_s"] = round(rows[-1]["tokens_per_s"], 1)
    params, model_cfg, _, step = evaluate.load_checkpoint(workdir)
    record["step"] = int(step)
    record["val_loss"] = validation_loss(params, model_cfg, cfg, val_batches)
  except train_lib.NonFiniteLossError as e:
    record["diverged"] = str(e)
    record["val_loss"] = math.inf
  log(
    f"  lr={cfg.train.lr:g}: val loss {record['val_loss']:.4f}, "
    f"train {record.get('train_wall_s', float('nan')):.0f}s"
  )
  with open(record_path, "w") as f:
    json.dump(record, f, indent=1)
  return record


def run(
  out_dir: str,
  *,
  config_path: str = "configs/ablation.py",
  mechanisms=tuple(MECHANISMS),
  lrs=(5e-4, 1e-3, 2e-3),
  variant: str = "",
  overrides=None,
  val_batches: int = 4,
  multipliers=(1, 4, 16),
  tasks=DEFAULT_TASKS,
  depths=(0.0, 0.5, 1.0),
  num_samples: int = 50,
  retrieval_samples: int = 32,
  batch_size: int = 8,
  log=print,
) -> dict:
  """Trains every rate, keeps the one with the highest held-out retrieval accuracy at the
  training length (ties: lower held-out loss; see the module docstring), evaluates it;
  returns and writes the summary. `retrieval_samples` sets the training-format samples
  per task of both the selection (1x) and the evaluation (every multiplier)."""
  from subq_jax import evaluate
  from subq_jax.train import stage_model_config

  for name in mechanisms:
    if name not in MECHANISMS:
      raise ValueError(f"mechanism {name!r} is not one of {sorted(MECHANISMS)}")
  os.makedirs(out_dir, exist_ok=True)
  t_start = time.time()
  summary = {"mechanisms": {}, "lrs": list(lrs), "variant": variant, "overrides": overrides}
  trained = {}  # training name -> (chosen record, cfg, sweep)
  for name in mechanisms:
    train_name = MECHANISMS[name][1] or name
    if train_name not in trained:
      log(f"training {train_name} over lr {list(lrs)}")
      sweep = []
      for lr in lrs:
        cfg = build_config(config_path, train_name, lr, variant, overrides)
        workdir = os.path.join(out_dir, "runs", train_name, f"lr{lr:g}")
        record = _train_one(cfg, workdir, val_batches, log)
        sweep.append(_selection_accuracy(record, workdir, retrieval_samples, batch_size, log))
      best = min(sweep, key=_choice_key)
      trained[train_name] = (best, sweep)
    best, sweep = trained[train_name]
    cfg = build_config(config_path, name, best["lr"], variant, overrides)
    attention = stage_model_config(cfg, len(cfg.train.stages) - 1).attention  # evaluated
    entry = {
      "trained_as": train_name,
      "lr": best["lr"],
      "sweep": [
        {
          k: r.get(k)
          for k in ("lr", "val_loss", "retrieval_acc", "train_wall_s", "tokens_per_s", "diverged")
        }
        for r in sweep
      ],
      "keys_per_query": attention.keys_per_query,
      "kind": attention.kind,
      "summary": attention.summary,
      "yarn": cfg.eval.yarn,
      "train_len": cfg.train.stages[-1].seq_len,
      "train_wall_s": best.get("train_wall_s"),
      "train_steps_run": best.get("steps_run"),
      "train_steps": best.get("step"),
    }
    if math.isinf(best["val_loss"]):
      entry["results"] = {}
      entry["note"] = "every learning rate diverged"
      summary["mechanisms"][name] = entry
      continue
    t0 = time.time()
    lengths = ",".join(f"{m}x" for m in multipliers)
    log(f"evaluating {name} (lr {best['lr']:g}, yarn={cfg.eval.yarn})")
    suite = evaluate.evaluate_checkpoint(
      best["workdir"],
      suites=tuple(tasks),
      lengths=lengths,
      depths=tuple(depths),
      num_samples=num_samples,
      batch_size=batch_size,
      yarn=cfg.eval.yarn,
      out_dir=os.path.join(out_dir, "eval", name),
      label=name,
      train_tasks=("niah", "mqar"),
      train_samples=retrieval_samples,
      log=log,
    )
    results = {}
    for (task, length), r in evaluate.pool(suite["cells"]).items():
      results.setdefault(task, {})[length] = r
    entry["results"] = {t: {str(n): r for n, r in by.items()} for t, by in results.items()}
    skipped = {}  # length -> tasks whose fixed text does not fit it
    for c in suite["cells"]:
      if "skipped" in c and c["task"] not in skipped.setdefault(str(c["length"]), []):
        skipped[str(c["length"])].append(c["task"])
    entry["skipped"] = skipped
    entry["eval_wall_s"] = round(time.time() - t0, 1)
    summary["mechanisms"][name] = entry
  summary["wall_s"] = round(time.time() - t_start, 1)
  return _write(summary, out_dir, log)


def assemble(paths, out_dir: str, log=print) -> dict:
  """Merges compare.json files of separate invocations (e.g. one mechanism or one learning
  rate per device command) into one comparison: per mechanism the sweeps are joined and
  the entry whose chosen rate is best by `_choice_key` is kept (the highest retrieval
  accuracy at the training length, ties to the lower held-out loss); entries of the same
  run (the chosen rate's sweep record equal) evaluated at other lengths are joined. An
  entry from an older compare.json, whose sweep has no `retrieval_acc`, gets it from its
  own `results` at its `train_len` (the same samples it reports; see the module
  docstring). A path written `FILE@LABEL` names its mechanisms `name@LABEL`: runs of one
  mechanism under different variants (e.g. `block=16`) stay separate columns. Writes
  compare.{json,md} and the PNGs to `out_dir`."""
  merged = {"mechanisms": {}, "sources": list(paths)}
  chosen_of = {}  # mechanism -> the sweep record of the kept entry's rate
  for source in paths:
    path, _, label = source.partition("@")
    with open(path) as f:
      part = json.load(f)
    for name, entry in part["mechanisms"].items():
      name = f"{name}@{label}" if label else name
      entry = dict(entry, sweep=[dict(r) for r in entry["sweep"]])
      chosen = min((r for r in entry["sweep"] if r["lr"] == entry["lr"]), key=_choice_key)
      if "retrieval_acc" not in chosen and not math.isinf(chosen["val_loss"]):
        chosen["retrieval_acc"] = retrieval_accuracy(entry["results"], entry["train_len"])
      have = merged["mechanisms"].get(name)
      sweep = (have["sweep"] if have else []) + [
        r for r in entry["sweep"] if not have or r not in have["sweep"]
      ]
      if have is not None and chosen == chosen_of[name]:  # the same run, other lengths
        merged["mechanisms"][name] = _merge_lengths(have, entry, path)
      elif have is None or _choice_key(chosen) < _choice_key(chosen_of[name]):
        merged["mechanisms"][name], chosen_of[name] = entry, chosen
      merged["mechanisms"][name]["sweep"] = sorted(sweep, key=lambda r: r["lr"])
  os.makedirs(out_dir, exist_ok=True)
  return _write(merged, out_dir, log)


def _merge_lengths(have: dict, entry: dict, path: str) -> dict:
  """One mechanism's entries of the same training run (equal chosen sweep records: the
  run was reused) evaluated at different lengths: their results joined."""
  results = {t: dict(by) for t, by in have["results"].items()}
  for task, by in entry["results"].items():
    for n, r in by.items():
      if n in results.get(task, {}) and results[task][n] != r:
        raise ValueError(f"{path}: {task} at {n} tokens differs from an earlier file's")
      results.setdefault(task, {})[n] = r
  skipped = {n: list(ts) for n, ts in have.get("skipped", {}).items()}
  for n, ts in entry.get("skipped", {}).items():
    skipped[n] = list(dict.fromkeys(skipped.get(n, []) + ts))
  walls = [e.get("eval_wall_s") for e in (have, entry)]
  return dict(have, results=results, skipped=skipped, eval_wall_s=sum(w for w in walls if w))


def _write(summary: dict, out_dir: str, log) -> dict:
  """compare.json, compare.md and the PNGs of a comparison; logs the table."""
  with open(os.path.join(out_dir, "compare.json"), "w") as f:
    json.dump(summary, f, indent=1)
  table = comparison_table(summary)
  with open(os.path.join(out_dir, "compare.md"), "w") as f:
    f.write(table + "\n")
  plot_comparison(summary, out_dir)
  log(table)
  return summary


def _fmt(r) -> str:
  if r is None:
    return ""
  return f"{r['mean']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}] n={r['n']}"


def _fmt_rate(r: dict) -> str:
  if math.isinf(r["val_loss"]):
    return f"{r['lr']:g}: diverged"
  acc = r.get("retrieval_acc")
  return f"{r['lr']:g}: acc {'-' if acc is None else f'{acc:.2f}'}, loss {r['val_loss']:.3f}"


def comparison_table(summary: dict) -> str:
  """Markdown: one summary table (the chosen learning rate with each rate's retrieval
  accuracy at 1x and held-out loss, budget, pairs attended, wall time), then
  per evaluation length a task x mechanism table of accuracy [95% interval] n, with the
  RULER average of the `ruler.RULER` tasks present (`scoring.task_average`) and its
  difference from the first dense mechanism (`scoring.difference`)."""
  mechs = summary["mechanisms"]
  names = list(mechs)
  lengths = sorted({int(n) for e in mechs.values() for by in e["results"].values() for n in by})
  lines = [
    "| mechanism | lr, chosen by held-out retrieval acc at 1x (per lr: acc, loss) "
    "| keys/query | pairs attended "
    + " / ".join(str(n) for n in lengths)
    + " | train wall | eval wall |",
    "| --- | --- | --- | --- | --- | --- |",
  ]
  for name in names:
    e = mechs[name]
    sweep = "; ".join(_fmt_rate(r) for r in e["sweep"])
    pairs = []
    for n in lengths:
      vals = [by[str(n)]["pairs_fraction"] for by in e["results"].values() if str(n) in by]
      pairs.append(f"{100 * np.mean(vals):.1f}%" if vals else "")
    kpq = "all" if e["kind"] == "dense" else str(e["keys_per_query"])
    tps = next((r.get("tokens_per_s") for r in e["sweep"] if r["lr"] == e["lr"]), None)
    ran, steps = e.get("train_steps_run"), e.get("train_steps")
    part = f" of the last {ran} of {steps} steps" if ran and steps and ran < steps else ""
    lines.append(
      f"| {name} | {e['lr']:g} ({sweep}) | {kpq} | {' / '.join(pairs)} | "
      f"{e.get('train_wall_s') or 0:.0f}s{part}{f' ({tps:,.0f} tok/s)' if tps else ''} | "
      f"{e.get('eval_wall_s', 0):.0f}s |"
    )
  tasks = list(dict.fromkeys(t for e in mechs.values() for t in e["results"]))
  train_len = next(iter(mechs.values()))["train_len"] if mechs else 1
  for n in lengths:
    lines += ["", f"**{n} tokens ({n / train_len:g}x the training length)**", ""]
    lines.append("| task | " + " | ".join(names) + " |")
    lines.append("|" + " --- |" * (len(names) + 1))
    for t in tasks:
      has = any(str(n) in mechs[m]["results"].get(t, {}) for m in names)
      row = [_cell(mechs[m], t, n, has) for m in names]
      lines.append(f"| {t} | " + " | ".join(row) + " |")
    lines += _ruler_average_rows(mechs, n)
  lines += [
    "",
    "not run: that mechanism was not evaluated on the task at that length; skipped: the "
    "task's fixed text does not fit that length.",
  ]
  return "\n".join(lines)


def ruler_averages(mechs: dict, n: int) -> tuple[list[str], dict]:
  """(RULER tasks, {mechanism: `scoring.task_average`}) at length n: the tasks of
  `ruler.RULER` some mechanism has there, averaged for each mechanism that has them all."""
  tasks = [t for t in ruler.RULER if any(str(n) in e["results"].get(t, {}) for e in mechs.values())]
  averages = {}
  for name, e in mechs.items():
    rows = [e["results"].get(t, {}).get(str(n)) for t in tasks]
    if tasks and all(rows):
      averages[name] = scoring.task_average(rows)
  return tasks, averages


def _ruler_average_rows(mechs: dict, n: int) -> list[str]:
  """The RULER average row (and, against the first dense mechanism, the difference row)."""
  tasks, averages = ruler_averages(mechs, n)
  if not averages:
    return []
  label = f"RULER average ({len(tasks)} tasks: {', '.join(tasks)})"
  lines = [f"| {label} | " + " | ".join(_fmt(averages.get(m)) or "not run" for m in mechs) + " |"]
  ref = next((m for m in mechs if mechs[m].get("kind") == "dense" and m in averages), None)
  if ref is not None and len(averages) > 1:
    cells = []
    for m in mechs:
      if m == ref or m not in averages:
        cells.append("")
        continue
      d = scoring.difference(averages[m], averages[ref])
      cells.append(f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]")
    lines.append(f"| RULER average minus {ref} | " + " | ".join(cells) + " |")
  return lines


def _cell(entry: dict, task: str, n: int, others_have: bool) -> str:
  """One mechanism's cell; `others_have`: some mechanism has the task at length n."""
  r = entry["results"].get(task, {}).get(str(n))
  if r is not None:
    return _fmt(r)
  if task in entry.get("skipped", {}).get(str(n), []):
    return "skipped"
  ran = any(str(n) in by for by in entry["results"].values())
  if "skipped" in entry or others_have or not ran:
    return "not run"
  return "skipped"  # a file from before skips were recorded: no mechanism has it there


def plot_comparison(summary: dict, out_dir: str):
  """compare_accuracy.png (a panel per task) and compare_pairs.png."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  mechs = {k: v for k, v in summary["mechanisms"].items() if v["results"]}
  if not mechs:
    return
  tasks = list(dict.fromkeys(t for e in mechs.values() for t in e["results"]))
  train_len = next(iter(mechs.values()))["train_len"]
  cols = min(3, len(tasks))
  rows = -(-len(tasks) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.3 * rows), squeeze=False)
  for ax, task in zip(axes.flat, tasks, strict=False):
    for name, e in mechs.items():
      by = e["results"].get(task, {})
      ns = sorted(by, key=int)
      if not ns:
        continue
      y = np.array([by[n]["mean"] for n in ns])
      err = [y - [by[n]["lo"] for n in ns], np.array([by[n]["hi"] for n in ns]) - y]
      ax.errorbar([int(n) for n in ns], y, yerr=err, marker="o", capsize=2, label=name)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.axvline(train_len, color="gray", ls=":")
    ax.set_title(task, fontsize=9)
    ax.set_xlabel("tokens")
  for ax in list(axes.flat)[len(tasks) :]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "compare_accuracy.png"), dpi=110)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, e in mechs.items():
    ns = sorted({int(n) for by in e["results"].values() for n in by})
    vals = [
      np.mean([by[str(n)]["pairs_fraction"] for by in e["results"].values() if str(n) in by])
      for n in ns
    ]
    ax.plot(ns, vals, "o-", label=name)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("fraction of causal token pairs attended")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "compare_pairs.png"), dpi=110)
  plt.close(fig)

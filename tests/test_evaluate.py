"""Long-context evaluation end to end on CPU: a tiny checkpoint, the suite, the comparison.

The generators and the scoring functions have their own tests (tests/test_ruler.py);
here: the suite's plumbing (prompt -> batched greedy decoding -> scoring, with an oracle
in place of the model), the reports, the command line, and the mechanism comparison on
two smoke-sized runs trained with the real training loop.
"""

import json
import os

import numpy as np
import pytest

from subq_jax import compare, evaluate
from subq_jax.data import ruler, scoring
from subq_jax.data.pipeline import DataConfig
from subq_jax.data.tokenizer import ByteTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ROOT = os.path.join(REPO, "subq_jax")  # a small corpus keeps data loading fast
SMOKE = {"data.corpus_root": ROOT, "data.val_fraction": 0.3}
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
  """dense with RoPE and with YaRN at evaluation (one training shared), a 2-rate sweep."""
  out = str(tmp_path_factory.mktemp("compare"))
  summary = compare.run(
    out,
    config_path=os.path.join(REPO, "configs", "ablation.py"),
    mechanisms=("dense_rope", "dense_yarn"),
    lrs=(1e-3, 1e-2),
    variant="smoke,steps=2",
    overrides=SMOKE,
    val_batches=1,
    multipliers=(4,),
    tasks=("niah_single_1", "mqar"),
    depths=(0.5,),
    num_samples=2,
    retrieval_samples=2,
    batch_size=2,
    log=lambda *_: None,
  )
  return out, summary


def test_comparison_trains_selects_and_tabulates(comparison):
  out, summary = comparison
  for name in ("compare.json", "compare.md", "compare_accuracy.png", "compare_pairs.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  rope, yarn = summary["mechanisms"]["dense_rope"], summary["mechanisms"]["dense_yarn"]
  # One training per rate, shared; the held-out loss picks the rate.
  assert yarn["trained_as"] == "dense_rope" and yarn["lr"] == rope["lr"]
  losses = {r["lr"]: r["val_loss"] for r in rope["sweep"]}
  assert sorted(losses) == [1e-3, 1e-2] and all(np.isfinite(list(losses.values())))
  assert rope["lr"] == min(losses, key=losses.get)
  assert sorted(os.listdir(os.path.join(out, "runs"))) == ["dense_rope"]
  # YaRN scales RoPE by 4 at 4x the training length; plain RoPE does not.
  for name, scale in (("dense_rope", 1.0), ("dense_yarn", 4.0)):
    cells = json.load(open(os.path.join(out, "eval", name, "suite.json")))["cells"]
    assert {c["rope_scale"] for c in cells} == {scale}
  for e in (rope, yarn):
    r = e["results"]["niah_single_1"]["512"]
    assert r["n"] == 2 and 0 <= r["lo"] <= r["mean"] <= r["hi"] <= 1
    assert r["pairs_fraction"] == pytest.approx(1.0)  # dense attends to every pair
    assert e["results"]["niah (train format)"]["512"]["n"] >= 1
    assert e["results"]["mqar (train format)"]["512"]["pairs_fraction"] == pytest.approx(1.0)
  table = open(os.path.join(out, "compare.md")).read()
  assert "dense_yarn" in table and "n=2" in table and "512 tokens (4x" in table
  # Finished runs are reused, not trained again.
  cfg = compare.build_config(
    os.path.join(REPO, "configs", "ablation.py"), "dense_rope", 1e-3, "smoke,steps=2", SMOKE
  )
  workdir = os.path.join(out, "runs", "dense_rope", "lr0.001")
  again = compare._train_one(cfg, workdir, 1, log=lambda *_: pytest.fail("trained again"))
  assert again["val_loss"] == losses[1e-3]
  # Separate invocations (one rate each, say) merge: the lowest held-out loss wins.
  first_path = os.path.join(out, "first.json")
  json.dump(summary, open(first_path, "w"))
  other = json.loads(json.dumps(summary))
  better = min(losses.values()) - 1.0
  other["mechanisms"] = {"dense_rope": dict(rope, lr=5e-3)}
  other["mechanisms"]["dense_rope"]["sweep"] = [{"lr": 5e-3, "val_loss": better}]
  other_path = os.path.join(out, "other.json")
  json.dump(other, open(other_path, "w"))
  merged = compare.assemble([first_path, other_path], os.path.join(out, "merged"), log=_quiet)
  assert merged["mechanisms"]["dense_rope"]["lr"] == 5e-3
  assert [r["lr"] for r in merged["mechanisms"]["dense_rope"]["sweep"]] == [1e-3, 5e-3, 1e-2]
  assert merged["mechanisms"]["dense_yarn"]["lr"] == rope["lr"]
  assert os.path.getsize(os.path.join(out, "merged", "compare.md")) > 0


def _quiet(*_):
  pass


def test_evaluate_command_line(comparison, tmp_path):
  from absl import flags

  from experiments import evaluate as cli

  out, summary = comparison
  workdir = os.path.join(
    out, "runs", "dense_rope", f"lr{summary['mechanisms']['dense_rope']['lr']:g}"
  )
  flags.FLAGS(
    [
      "evaluate",
      f"--workdir={workdir}",
      "--suite=niah_single_1,vt",
      "--lengths=4x,1K",
      "--depths=0,1",
      "--num_samples=2",
      "--batch_size=2",
      f"--out_dir={tmp_path}",
    ]
  )
  cli.main([])
  got = json.load(open(tmp_path / "suite.json"))
  assert got["step"] == 2 and got["train_len"] == 128
  cells = got["cells"]
  keys = {(c["task"], c["length"], c["depth"]) for c in cells}
  assert keys == {("niah_single_1", n, d) for n in (512, 1024) for d in (0.0, 1.0)} | {
    ("vt", n, None) for n in (512, 1024)
  }
  for c in cells:
    assert c["n"] == 2 == len(c["scores"]) and 0 <= c["lo"] <= c["mean"] <= c["hi"] <= 1
    assert c["filler"] == ["noise"] and c["filler_source"] == ["ruler-noise-sentence"]
    assert c["pairs_fraction"] == pytest.approx(1.0)
    assert c["scoring"].startswith("greedy decoding")
  for name in ("suite.md", "heatmap_niah_single_1.png", "accuracy_vs_length.png"):
    assert os.path.getsize(tmp_path / name) > 0
  assert os.path.getsize(tmp_path / "pairs_vs_length.png") > 0
  assert "| niah_single_1 | noise |" in open(tmp_path / "suite.md").read()


def test_suite_scores_an_oracle_perfectly(monkeypatch):
  """Prompt -> batched decoding -> scoring: a model that continues every prompt with its
  reference scores 1 on every task; one that always says "no" scores 0."""
  from subq_jax.model import ModelConfig

  source = ruler.Source(root=ROOT, val_fraction=0.3)
  suite = evaluate.SuiteConfig(
    tasks=("niah_single_1", "niah_multivalue", "vt", "qa_2", "mrcr_2", "mqar"),
    lengths=(3000,),
    depths=(0.3,),
    num_samples=3,
    batch_size=2,
    train_tasks=("niah", "mqar"),
    train_samples=3,
  )
  targets = {}
  for task in suite.tasks:
    d_idx, depth = (0, 0.3) if task in ruler.TAKES_DEPTH else (999, None)
    for i in range(suite.num_samples):
      s = ruler.generate(task, 3000, seed=[0, 3000, d_idx, i], source=source, depth=depth)
      targets[s.prompt] = s.target

  wrong = [None]  # what the broken model says

  def oracle(self, tokens, lengths, max_new):
    out = np.full((len(tokens), max_new), TOK.pad_id, np.int32)
    for r, (row, n) in enumerate(zip(tokens, lengths, strict=True)):
      want = TOK.encode(wrong[0] or targets[TOK.decode(row[:n])])[:max_new]
      out[r, : len(want)] = want
    return out, 0.5

  # The training-format sequences' last target is not among the inputs: record them.
  from subq_jax.data import pipeline

  whole, make_sample = {}, pipeline.make_sample

  def recording(*args):
    sample = make_sample(*args)
    whole[sample["tokens"][:-1].tobytes()] = sample["tokens"][1:]
    return sample

  def teacher_forced(self, tokens):
    shifted = np.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    for r, row in enumerate(tokens):
      target = whole.get(row[:3000].tobytes())
      if target is not None:
        shifted[r, :3000] = target
    return (shifted + (1 if wrong[0] else 0)), 0.5

  monkeypatch.setattr(pipeline, "make_sample", recording)
  monkeypatch.setattr(evaluate._Runner, "generate", oracle)
  monkeypatch.setattr(evaluate._Runner, "teacher_forced", teacher_forced)
  data_cfg = DataConfig(corpus_root=ROOT, val_fraction=0.3)
  kw = dict(corpus_root=ROOT, val_fraction=0.3, data_cfg=data_cfg, log=lambda *_: None)
  for wrong[0], expect in ((None, 1.0), ("no", 0.0)):
    cells = evaluate.suite_eval(None, ModelConfig(dtype="float32"), 1000, suite, **kw)
    trained = {"niah (train format)", "mqar (train format)"}
    assert {c["task"] for c in cells} == set(suite.tasks) | trained
    for c in cells:
      assert c["mean"] == expect, (c["task"], c["scores"])
      per_sample = {
        "mqar": ruler.tasks.MQARConfig().num_queries,
        "niah (train format)": data_cfg.niah.num_queries,
        "mqar (train format)": data_cfg.mqar.num_queries,
      }
      assert c["n"] == 3 * per_sample.get(c["task"], 1)
      lo, hi = scoring.wilson_interval(expect * c["n"], c["n"])
      assert (c["lo"], c["hi"]) == (lo, hi)
    mqar = next(c for c in cells if c["task"] == "mqar")
    assert sum(b["n"] for b in mqar["by_distance"]) == mqar["n"]


def test_parse_lengths_and_cut():
  assert evaluate.parse_lengths("1x,4x,16K,300", 128) == [128, 512, 16384, 300]
  with pytest.raises(ValueError, match="positive"):
    evaluate.parse_lengths("", 128)
  ids = np.concatenate([TOK.encode("1234567."), [TOK.sep_id], TOK.encode("junk")])
  assert evaluate._cut(ids, TOK) == "1234567."


def test_suite_table_hand_worked():
  cells = [
    {"task": "niah_single_2", "length": 1024, "depth": 0.0, "scores": [1, 1, 1, 0],
     "filler": ["code"], "pairs_fraction": 0.5},
    {"task": "niah_single_2", "length": 1024, "depth": 1.0, "scores": [1, 1, 1, 1],
     "filler": ["code"], "pairs_fraction": 0.5},
    {"task": "cwe", "length": 1024, "depth": None, "skipped": "too short"},
  ]  # fmt: skip
  table = evaluate.suite_table(cells, 512)
  lo, hi = scoring.wilson_interval(7, 8)
  assert f"| niah_single_2 | code | 0.88 [{lo:.2f}, {hi:.2f}] n=8 |" in table
  assert "1024 (2x)" in table and "50.00%" in table and "cwe at 1024" in table

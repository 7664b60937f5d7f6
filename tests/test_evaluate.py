"""Long-context evaluation end to end on CPU: a tiny checkpoint, the suite, the comparison.

The generators and the scoring functions have their own tests (tests/test_ruler.py);
here: the suite's plumbing (prompt -> batched greedy decoding -> scoring, with an oracle
in place of the model), the reports, the command line, and the mechanism comparison on
two smoke-sized runs trained with the real training loop.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

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


def test_load_checkpoint_saved_on_another_device(comparison, tmp_path):
  # A run trained on a GPU records its arrays' device (cuda:0) in orbax's sharding
  # metadata; loading it on a CPU must not fail with a topology mismatch.
  import shutil

  out, summary = comparison
  trained = os.path.join(
    out, "runs", "dense_rope", f"lr{summary['mechanisms']['dense_rope']['lr']:g}"
  )
  run = str(shutil.copytree(trained, tmp_path / "r"))
  meta = [os.path.join(d, "_sharding") for d, _, fs in os.walk(run) if "_sharding" in fs]
  assert meta
  for path in meta:
    saved = json.load(open(path))
    assert all("cuda" not in v for v in saved.values())
    gpu = {k: json.dumps(dict(json.loads(v), device_str="cuda:0")) for k, v in saved.items()}
    json.dump(gpu, open(path, "w"))
  params, _, _, step = evaluate.load_checkpoint(run)
  here, _, _, _ = evaluate.load_checkpoint(trained)
  assert step == 2
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(here), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_comparison_trains_selects_and_tabulates(comparison):
  out, summary = comparison
  for name in ("compare.json", "compare.md", "compare_accuracy.png", "compare_pairs.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  rope, yarn = summary["mechanisms"]["dense_rope"], summary["mechanisms"]["dense_yarn"]
  # One training per rate, shared; retrieval accuracy at 1x picks the rate (ties: loss).
  assert yarn["trained_as"] == "dense_rope" and yarn["lr"] == rope["lr"]
  losses = {r["lr"]: r["val_loss"] for r in rope["sweep"]}
  assert sorted(losses) == [1e-3, 1e-2] and all(np.isfinite(list(losses.values())))
  accs = {r["lr"]: r["retrieval_acc"] for r in rope["sweep"]}
  assert rope["lr"] == max(losses, key=lambda lr: (accs[lr], -losses[lr]))
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
  # Each rate's selection: the training-format tasks at 1x (128 tokens) only, its own
  # samples (seed 1), pooled over both tasks' queries; cached in compare_run.json.
  for lr in (1e-3, 1e-2):
    workdir = os.path.join(out, "runs", "dense_rope", f"lr{lr:g}")
    report = json.load(open(os.path.join(workdir, "selection", "suite.json")))
    assert report["suite"]["seed"] == compare.SELECTION_SEED != 0
    cells = report["cells"]
    assert sorted((c["task"], c["length"]) for c in cells) == [
      ("mqar (train format)", 128),
      ("niah (train format)", 128),
    ]
    scores = [x for c in cells for x in c["scores"]]
    assert len(scores) >= 4 and accs[lr] == pytest.approx(np.mean(scores))
    assert json.load(open(os.path.join(workdir, "compare_run.json")))["retrieval_acc"] == accs[lr]
  table = open(os.path.join(out, "compare.md")).read()
  assert "dense_yarn" in table and "n=2" in table and "512 tokens (4x" in table
  assert "chosen by held-out retrieval acc at 1x" in table
  assert f"0.001: acc {accs[1e-3]:.2f}, loss {losses[1e-3]:.3f}" in table
  # Finished runs are reused, not trained or evaluated again.
  cfg = compare.build_config(
    os.path.join(REPO, "configs", "ablation.py"), "dense_rope", 1e-3, "smoke,steps=2", SMOKE
  )
  workdir = os.path.join(out, "runs", "dense_rope", "lr0.001")
  fail = lambda *_: pytest.fail("trained or evaluated again")  # noqa: E731
  again = compare._train_one(cfg, workdir, 1, log=fail)
  assert again["val_loss"] == losses[1e-3] and again["retrieval_acc"] == accs[1e-3]
  assert compare._selection_accuracy(again, workdir, 2, 2, log=fail) == again
  # An older record without the figure gets it computed (same samples, same value) and saved.
  older = {k: v for k, v in again.items() if k != "retrieval_acc"}
  json.dump(older, open(os.path.join(workdir, "compare_run.json"), "w"))
  redone = compare._selection_accuracy(older, workdir, 2, 2, log=_quiet)
  assert redone["retrieval_acc"] == accs[1e-3]
  assert json.load(open(os.path.join(workdir, "compare_run.json"))) == redone
  # Separate invocations merge: a rate of higher retrieval accuracy wins despite its loss.
  first_path = os.path.join(out, "first.json")
  json.dump(summary, open(first_path, "w"))
  other = json.loads(json.dumps(summary))
  assert max(accs.values()) < 0.995  # so a rate of accuracy 1.0 wins outright
  rate = {"lr": 5e-3, "val_loss": max(losses.values()) + 1.0, "retrieval_acc": 1.0}
  other["mechanisms"] = {"dense_rope": dict(rope, lr=5e-3, sweep=[rate])}
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
      "--train_tasks=mqar",
      "--train_samples=1",
      f"--out_dir={tmp_path}",
    ]
  )
  cli.main([])
  got = json.load(open(tmp_path / "suite.json"))
  assert got["step"] == 2 and got["train_len"] == 128
  trained = [c for c in got["cells"] if c["task"] == "mqar (train format)"]
  assert [c["length"] for c in trained] == [512, 1024] and all(c["n"] >= 1 for c in trained)
  cells = [c for c in got["cells"] if c not in trained]
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

  whole, masks, needles, make_sample = {}, {}, {}, pipeline.make_sample

  def recording(*args, **kwargs):
    sample = make_sample(*args, **kwargs)
    whole[sample["tokens"][:-1].tobytes()] = sample["tokens"][1:]
    masks[sample["tokens"][:-1].tobytes()] = sample["answer_mask"][1:]
    needles[sample["tokens"][:-1].tobytes()] = sample["needle_at"]
    return sample

  def teacher_forced(self, tokens):
    shifted = np.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    for r, row in enumerate(tokens):
      target = whole.get(row[:3000].tobytes())
      if target is not None:
        shifted[r, :3000] = target
        spans = evaluate.answer_spans(masks[row[:3000].tobytes()])
        for q, ((a, _), at) in enumerate(zip(spans, needles[row[:3000].tobytes()], strict=True)):
          # "first": each answer's first token wrong; "far": answers 1,500 tokens or more
          # after their needle (pair) value wrong; "other": each answer's first token the
          # next answer's (a read from the wrong needle)
          shifted[r, a] += wrong[0] == "first" or (wrong[0] == "far" and a + 1 - at >= 1500)
          if wrong[0] == "other":
            shifted[r, a] = target[spans[(q + 1) % len(spans)][0]]
    return (shifted + (1 if wrong[0] == "no" else 0)), 0.5

  def select_all(self, tokens):  # every earlier block chosen by every tile
    cfg = self.model_cfg.attention
    tiles, blocks = tokens.shape[1] // cfg.tile, -(-tokens.shape[1] // cfg.block_size)
    sel = np.broadcast_to(np.arange(blocks), (len(tokens), cfg_kv, tiles, blocks))
    return [sel] * self.model_cfg.num_layers

  cfg_kv = ModelConfig(dtype="float32").num_kv_heads
  monkeypatch.setattr(pipeline, "make_sample", recording)
  monkeypatch.setattr(evaluate._Runner, "generate", oracle)
  monkeypatch.setattr(evaluate._Runner, "teacher_forced", teacher_forced)
  monkeypatch.setattr(evaluate._Runner, "selections", select_all)
  spread = ruler.tasks.MQARConfig(layout="spread")  # queries at any distance from the pairs
  data_cfg = DataConfig(corpus_root=ROOT, val_fraction=0.3, mqar=spread)
  kw = dict(corpus_root=ROOT, val_fraction=0.3, data_cfg=data_cfg, log=lambda *_: None)
  for wrong[0], expect in ((None, 1.0), ("no", 0.0), ("first", 0.0)):
    cells = evaluate.suite_eval(None, ModelConfig(dtype="float32"), 1000, suite, **kw)
    trained = {"niah (train format)", "mqar (train format)"}
    assert {c["task"] for c in cells} == set(suite.tasks) | trained
    for c in cells:
      if wrong[0] == "first" and c["task"] not in trained:
        continue  # "first" breaks only the training formats' first answer tokens
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
    for task in trained:  # every block selected: every needle (pair) value seen
      cell = next(c for c in cells if c["task"] == task)
      assert cell["needle_block_attended"] == [1.0] * ModelConfig().num_layers, task
    for c in cells:
      if c["task"] in trained:  # one entry per answer token: the value's characters
        after = 1.0 if wrong[0] != "no" else 0.0  # "first": the rest is still right
        task = c["task"].split()[0]
        size = data_cfg.niah.uuid_chars if task == "niah" else data_cfg.mqar.value_len
        assert c["answer_acc_by_position"] == [expect] + [after] * (size - 1), task
        misses = c["misses"]
        assert misses["n"] == round((1 - expect) * c["n"]), task
        if wrong[0] == "first":  # every query missed, at its first token
          assert misses["first_wrong"] == [c["n"]], task
          assert len(misses["records"]) == min(32, c["n"]), task  # the first 32 kept
          assert all(m["first_wrong"] == 0 for m in misses["records"]), task
  # "other": the misses are exactly the queries whose next answer starts otherwise, and
  # every one of them reads another answer's token.
  wrong[0] = "other"
  cells = evaluate.suite_eval(None, ModelConfig(dtype="float32"), 1000, suite, **kw)
  for task in trained:
    c = next(c for c in cells if c["task"] == task)
    misses = c["misses"]
    assert 0 < misses["n"] == c["n"] - sum(c["scores"]), task
    assert misses["first_wrong"] == [misses["n"]] and misses["other_answer"] == 1.0, task
    for m in misses["records"]:  # the next query's answer (others may share its token)
      assert (m["query"] + 1) % (c["n"] // 3) in m["others_matched"], m
    assert 0 < misses["other_answer_if_uniform"] < 1, task
    table = evaluate.suite_table(cells, 1000)
    assert f"| {task}: misses: how many" in table and f"| {misses['n']}: 1.00 (" in table
  # Accuracy by needle-query distance, in quarters of the 3,000 tokens: "far" breaks the
  # answers in the last two.
  wrong[0] = "far"
  cells = evaluate.suite_eval(None, ModelConfig(dtype="float32"), 1000, suite, **kw)
  for task in trained:
    c = next(c for c in cells if c["task"] == task)
    buckets = c["by_distance"]
    assert [(b["lo_distance"], b["hi_distance"]) for b in buckets] == [
      (0, 750),
      (750, 1500),
      (1500, 2250),
      (2250, 3001),
    ]
    assert sum(b["n"] for b in buckets) == c["n"] == len(c["scores"])
    near = {b["mean"] for b in buckets[:2] if b["n"]}
    far = {b["mean"] for b in buckets[2:] if b["n"]}
    assert near <= {1.0} and far <= {0.0}, (task, buckets)
    assert 0 < c["mean"] < 1, (task, buckets)  # both near and far queries were drawn
  table = evaluate.suite_table(cells, 1000)
  assert "mqar (train format): accuracy by needle-query distance" in table


def test_needle_block_attended_hand_worked():
  """Blocks of 4 tokens, tiles of 1, one sink and one local block; every needle value
  starts at position 9 (block 2) but the last, at 2 (block 0, the sink)."""
  from subq_jax.config import SSAConfig

  attn = SSAConfig(block_size=4, query_tile=1, top_k=2, sink_blocks=1, local_blocks=1)
  spans = [(14, 16), (22, 24), (30, 32), (38, 40), (38, 40)]
  needle_at = [9, 9, 9, 9, 2]
  selected = np.full((2, 40, 2), -1)
  selected[1, 22] = [2, 3]  # q=22 (block 5): block 2 chosen by the second KV head
  selected[0, 30] = [1, 3]  # q=30 (block 7): the chosen blocks miss block 2
  # q=14 (block 3): block 2 is its local block; q=38: nothing chosen, but a sink needle.
  got = evaluate.needle_block_attended(spans, needle_at, selected, attn)
  np.testing.assert_array_equal(got, [1.0, 1.0, 0.0, 0.0, 1.0])
  none = evaluate.needle_block_attended(spans, needle_at, np.full((2, 40, 2), -1), attn)
  np.testing.assert_array_equal(none, [1.0, 0.0, 0.0, 0.0, 1.0])


def test_needle_routing_of_a_real_ssa_model():
  """The real forward's selections: with `top_k` covering every block each layer sees
  every needle; with one chosen block of 16, no sinks and no local blocks, most needles
  lie elsewhere, so the fraction is below 1."""
  from subq_jax.config import SSAConfig
  from subq_jax.data.tasks import NIAHConfig
  from subq_jax.model import ModelConfig, Transformer

  niah = NIAHConfig(num_needles=4, num_queries=4, uuid_chars=8)  # the ablation's needles
  data_cfg = DataConfig(corpus_root=ROOT, val_fraction=0.3, niah=niah)
  suite = evaluate.SuiteConfig(tasks=(), lengths=(256,), train_tasks=("niah",), train_samples=2)
  out = {}
  for top_k, sink, local in ((16, 1, 1), (1, 0, 0)):
    attn = SSAConfig(block_size=16, query_tile=1, top_k=top_k, fanout=4, beam=16)
    attn = dataclasses.replace(attn, sink_blocks=sink, local_blocks=local)
    mcfg = ModelConfig(num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, mlp_dim=64,
                       dtype="float32", attention=attn)  # fmt: skip
    _, params = nnx.split(Transformer(mcfg, rngs=nnx.Rngs(0)))
    runner = evaluate._Runner(params, mcfg)
    got = evaluate._train_format(runner, data_cfg, TOK, "niah", 256, suite)
    scores, routing, dists = got["scores"], got["needle_block_attended"], got["distances"]
    assert got["misses"]["n"] == len(scores) - sum(scores)
    assert len(dists) == len(scores) and all(0 < d < 256 for d in dists), dists
    assert len(scores) == 2 * data_cfg.niah.num_queries
    out[top_k] = routing
  assert out[16] == [1.0, 1.0]
  assert all(0.0 <= r < 1.0 for r in out[1]), out[1]


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
  routed = dict(cells[0], task="niah (train format)", needle_block_attended=[None, 0.25, 1.0])
  table = evaluate.suite_table([*cells, routed], 512)
  assert "| niah (train format): needle block attended, by layer | | - 0.25 1.00 |" in table
  read = dict(routed, answer_acc_by_position=[0.5, 0.875, 1.0])
  one = dict(cells[0], task="mqar (train format)", answer_acc_by_position=[0.75])
  table = evaluate.suite_table([*cells, read, one], 512)
  assert "| niah (train format): answer token accuracy, by position | | 0.50 0.88 1.00 |" in table
  assert "mqar (train format): answer token" not in table  # one token: the row above says it
  assert "RULER average" not in table  # one RULER task: no average
  vt = {"task": "vt", "length": 1024, "depth": None, "scores": [1, 0], "filler": ["noise"],
        "pairs_fraction": 0.5}  # fmt: skip
  table = evaluate.suite_table([*cells, vt], 512)
  # The unweighted mean of 7/8 and 1/2, not the pooled 8/10; RULER's order of tasks.
  avg = scoring.task_average([{"mean": 7 / 8, "n": 8}, {"mean": 0.5, "n": 2}])
  assert avg["mean"] == pytest.approx(0.6875)
  row = f"| RULER average (2 tasks: niah_single_2, vt) | | {evaluate._fmt_cell(avg)} |"
  assert row in table, table
  longer = dict(vt, length=2048)
  table = evaluate.suite_table([*cells, vt, longer, dict(cells[0], length=2048)], 512)
  at_2048 = scoring.task_average([{"mean": 3 / 4, "n": 4}, {"mean": 0.5, "n": 2}])
  assert f"| {evaluate._fmt_cell(avg)} | {evaluate._fmt_cell(at_2048)} |" in table
  table = evaluate.suite_table([*cells, vt, longer], 512)  # niah_single_2 not at 2048: no row
  assert "RULER average" not in table


def _row(mean, n):
  return {"mean": mean, "n": n, "lo": 0.0, "hi": 1.0, "pairs_fraction": 0.25, "filler": ["code"]}


def _entry(lr, val_loss, niah, mqar, train_len=4096, **rate):
  """A compare.json entry evaluated at 1x only; `rate`: extra fields of its sweep record
  (`retrieval_acc`; absent as in older files)."""
  n = str(train_len)
  return {
    "trained_as": "ssa_bounds",
    "lr": lr,
    "sweep": [{"lr": lr, "val_loss": val_loss, **rate}],
    "keys_per_query": 448,
    "kind": "ssa",
    "summary": "bounds",
    "yarn": False,
    "train_len": train_len,
    "train_wall_s": 10.0,
    "results": {
      "niah_single_1": {n: _row(1.0, 8)},  # not a selection task
      "niah (train format)": {n: _row(*niah)},
      "mqar (train format)": {n: _row(*mqar)},
    },
  }


def _assemble(tmp_path, *entries, name="ssa_bounds"):
  paths = []
  for i, e in enumerate(entries):
    paths.append(str(tmp_path / f"part{i}.json"))
    json.dump({"mechanisms": {name: e}}, open(paths[-1], "w"))
  return compare.assemble(paths, str(tmp_path / "merged"), log=_quiet)["mechanisms"][name]


@pytest.mark.parametrize("name", [n for n, (_, src) in compare.MECHANISMS.items() if src])
def test_reused_training_differs_only_in_yarn_at_evaluation(name):
  path = os.path.join(REPO, "configs", "ablation.py")
  cfg = compare.build_config(path, name, 1e-3)
  trained = compare.build_config(path, compare.MECHANISMS[name][1], 1e-3)
  assert cfg.eval.yarn and not trained.eval.yarn
  assert (cfg.model, cfg.data, cfg.train) == (trained.model, trained.data, trained.train)


def test_retrieval_accuracy_hand_worked():
  results = {
    "niah (train format)": {"512": _row(0.25, 8), "2048": _row(1.0, 8)},  # 2 of 8 at 512
    "mqar (train format)": {"512": _row(0.75, 24)},  # 18 of 24
    "mqar": {"512": _row(1.0, 100)},  # the RULER-format task: not pooled
  }
  # (2 + 18) / (8 + 24); the unweighted mean of the two tasks would be 0.5.
  assert compare.retrieval_accuracy(results, 512) == 0.625
  assert compare.retrieval_accuracy(results, "512") == 0.625
  assert compare.retrieval_accuracy(results, 2048) == 1.0  # only niah at 2048
  assert compare.retrieval_accuracy(results, 1024) is None
  assert compare.retrieval_accuracy({"mqar": {"512": _row(1.0, 4)}}, 512) is None


@pytest.mark.parametrize("order", [1, -1])
def test_assemble_keeps_higher_retrieval_accuracy_not_lower_loss(tmp_path, order):
  # The H100 case: lr 2e-3 had the lower held-out loss but never learned recall.
  low_loss = _entry(2e-3, 0.99, (0.0, 64), (0.12, 384), retrieval_acc=0.12)
  recall = _entry(1e-3, 1.07, (0.0, 64), (0.90, 384), retrieval_acc=0.90)
  kept = _assemble(tmp_path, *[low_loss, recall][::order])
  assert kept["lr"] == 1e-3
  assert [(r["lr"], r["retrieval_acc"]) for r in kept["sweep"]] == [(1e-3, 0.90), (2e-3, 0.12)]
  table = open(tmp_path / "merged" / "compare.md").read()
  assert "| ssa_bounds | 0.001 (0.001: acc 0.90, loss 1.070; 0.002: acc 0.12, loss 0.990) |" in (
    table
  )


@pytest.mark.parametrize("order", [1, -1])
def test_assemble_breaks_accuracy_ties_by_loss(tmp_path, order):
  worse = _entry(1e-3, 1.10, (0.0, 64), (0.5, 384), retrieval_acc=0.5)
  better = _entry(3e-3, 1.00, (0.0, 64), (0.5, 384), retrieval_acc=0.5)
  assert _assemble(tmp_path, *[worse, better][::order])["lr"] == 3e-3


@pytest.mark.parametrize("order", [1, -1])
def test_assemble_never_keeps_a_diverged_or_unmeasured_rate_over_a_measured_one(tmp_path, order):
  diverged = _entry(1e-2, float("inf"), (0.0, 64), (0.0, 384), retrieval_acc=None)
  diverged["results"] = {}
  unmeasured = _entry(3e-3, 0.5, (0.0, 0), (0.0, 0), retrieval_acc=None)
  zero = _entry(1e-3, 1.5, (0.0, 64), (0.0, 384), retrieval_acc=0.0)
  assert _assemble(tmp_path, *[diverged, zero][::order])["lr"] == 1e-3
  assert _assemble(tmp_path, *[unmeasured, zero][::order])["lr"] == 1e-3
  assert _assemble(tmp_path, *[diverged, unmeasured][::order])["lr"] == 3e-3
  table = open(tmp_path / "merged" / "compare.md").read()
  assert "0.003: acc -, loss 0.500; 0.01: diverged" in table


@pytest.mark.parametrize("order", [1, -1])
def test_assemble_joins_lengths_of_the_same_run(tmp_path, order):
  # One run evaluated at 1x in one invocation and at 4x in another (reused, so its sweep
  # record is equal): the lengths are joined. Another run at the same rate (another
  # record) is a competing entry, not joined.
  at_1x = _entry(1e-3, 1.07, (0.0, 64), (0.82, 384), retrieval_acc=0.7, train_wall_s=328.0)
  at_4x = _entry(1e-3, 1.07, (0.0, 64), (0.26, 384), retrieval_acc=0.7, train_wall_s=328.0)
  at_4x["results"] = {t: {"16384": by["4096"]} for t, by in at_4x["results"].items()}
  at_1x["eval_wall_s"], at_4x["eval_wall_s"] = 30.0, 60.0
  kept = _assemble(tmp_path, *[at_1x, at_4x][::order])
  assert kept["results"]["mqar (train format)"] == {
    "4096": _row(0.82, 384),
    "16384": _row(0.26, 384),
  }
  assert kept["eval_wall_s"] == 90.0 and kept["sweep"] == at_1x["sweep"]
  table = open(tmp_path / "merged" / "compare.md").read()
  assert "| mqar (train format) | 0.26 [0.00, 1.00] n=384 |" in table
  other = _entry(1e-3, 1.05, (0.0, 64), (0.5, 384), retrieval_acc=0.5, train_wall_s=300.0)
  assert "16384" not in _assemble(tmp_path, *[at_1x, other][::order])["results"]["niah_single_1"]
  # The same cell twice with other figures is an error, not a silent choice.
  clash = json.loads(json.dumps(at_1x))
  clash["results"]["mqar (train format)"]["4096"]["mean"] = 0.5
  with pytest.raises(ValueError, match="mqar \\(train format\\) at 4096 tokens differs"):
    _assemble(tmp_path, at_1x, clash)


def test_assemble_labels_keep_variants_of_one_mechanism_apart(tmp_path):
  # ssa_bounds with 64- and 16-token blocks: without labels one would replace the other.
  blocks64 = _entry(1e-3, 0.78, (0.52, 64), (1.0, 384), retrieval_acc=0.9)
  blocks16 = _entry(1e-3, 0.75, (0.88, 64), (1.0, 384), retrieval_acc=0.98)
  paths = []
  for i, e in enumerate([blocks64, blocks16]):
    paths.append(str(tmp_path / f"part{i}.json"))
    json.dump({"mechanisms": {"ssa_bounds": e}}, open(paths[-1], "w"))
  merged = compare.assemble([paths[0], paths[1] + "@b16"], str(tmp_path / "m"), log=_quiet)
  assert list(merged["mechanisms"]) == ["ssa_bounds", "ssa_bounds@b16"]
  niah = {
    k: e["results"]["niah (train format)"]["4096"]["mean"] for k, e in merged["mechanisms"].items()
  }
  assert niah == {"ssa_bounds": 0.52, "ssa_bounds@b16": 0.88}
  assert merged["sources"] == [paths[0], paths[1] + "@b16"]
  assert (
    "| niah (train format) | 0.52 [0.00, 1.00] n=64 | 0.88 [0.00, 1.00] n=64 |"
    in open(tmp_path / "m" / "compare.md").read()
  )
  unlabelled = compare.assemble(paths, str(tmp_path / "u"), log=_quiet)
  assert list(unlabelled["mechanisms"]) == ["ssa_bounds"]


def test_comparison_table_marks_lengths_a_mechanism_was_not_run_at():
  full = _entry(1e-3, 1.0, (0.0, 64), (0.9, 384))
  full["results"]["mqar (train format)"]["16384"] = _row(0.3, 384)
  short = _entry(1e-3, 1.0, (0.0, 64), (0.8, 384))
  table = compare.comparison_table({"mechanisms": {"ssa_yarn": full, "indexer": short}})
  assert "| mqar (train format) | 0.30 [0.00, 1.00] n=384 | not run |" in table
  assert "| niah_single_1 | 1.00 [0.00, 1.00] n=8 | 1.00 [0.00, 1.00] n=8 |" in table


def test_comparison_table_says_when_the_wall_time_is_a_resumed_part():
  whole = _entry(1e-3, 1.0, (0.0, 64), (0.9, 384), train_wall_s=300.0)
  whole.update(train_wall_s=300.0, train_steps_run=1400, train_steps=1400)
  cut = dict(whole, train_wall_s=120.0, train_steps_run=600)
  table = compare.comparison_table({"mechanisms": {"ssa_bounds": whole, "ssa_yarn": cut}})
  assert "| 300s |" in table and "| 120s of the last 600 of 1400 steps |" in table


def test_comparison_table_tells_tasks_not_run_from_tasks_skipped():
  a = _entry(1e-3, 1.0, (0.0, 64), (0.9, 384))
  b = _entry(1e-3, 1.0, (0.5, 8), (0.8, 384))
  del b["results"]["niah_single_1"]  # b was evaluated on a narrower task list
  a["results"]["vt"] = {"4096": _row(0.25, 8)}
  b["skipped"] = {"4096": ["vt"]}  # recorded: vt's text did not fit b's run
  table = compare.comparison_table({"mechanisms": {"ssa_bounds": a, "indexer": b}})
  assert "| niah_single_1 | 1.00 [0.00, 1.00] n=8 | not run |" in table
  assert "| vt | 0.25 [0.00, 1.00] n=8 | skipped |" in table
  # A file from before skips were recorded: a task nobody has at that length was skipped.
  del a["results"]["vt"]
  a["results"]["cwe"] = {"16384": _row(0.5, 8)}
  a["results"]["mqar (train format)"]["16384"] = _row(0.3, 384)
  table = compare.comparison_table({"mechanisms": {"ssa_bounds": a}})
  # At 4096 a ran but nobody has cwe: skipped; at 16384 a has it.
  assert "| cwe | skipped |" in table and "| cwe | 0.50 [0.00, 1.00] n=8 |" in table


def test_comparison_table_averages_ruler_tasks_and_compares_with_dense():
  dense = _entry(1e-3, 1.0, (0.9, 64), (1.0, 384))
  dense["kind"] = "dense"
  ssa = _entry(1e-3, 1.0, (0.9, 64), (1.0, 384))
  partial = _entry(1e-3, 1.0, (0.9, 64), (1.0, 384))
  # niah_single_1 at 1.0 n=8 in every entry (_entry); add vt (RULER) and niah_uuid (not).
  dense["results"]["vt"] = {"4096": _row(0.5, 8)}
  ssa["results"]["vt"] = {"4096": _row(0.25, 8)}
  for e in (dense, ssa, partial):
    e["results"]["niah_uuid"] = {"4096": _row(0.0, 8)}
  mechs = {"dense_rope": dense, "ssa_bounds": ssa, "block_topk": partial}
  tasks, averages = compare.ruler_averages(mechs, 4096)
  assert tasks == ["niah_single_1", "vt"]  # RULER's order; niah_uuid is not a RULER task
  assert set(averages) == {"dense_rope", "ssa_bounds"}  # block_topk lacks vt
  assert averages["dense_rope"]["mean"] == 0.75 and averages["ssa_bounds"]["mean"] == 0.625
  table = compare.comparison_table({"mechanisms": mechs})
  a, b = averages["dense_rope"], averages["ssa_bounds"]
  row = (
    f"| RULER average (2 tasks: niah_single_1, vt) | 0.75 [{a['lo']:.2f}, {a['hi']:.2f}] n=16 "
    f"| 0.62 [{b['lo']:.2f}, {b['hi']:.2f}] n=16 | not run |"
  )
  assert row in table
  d = scoring.difference(b, a)
  assert (
    f"| RULER average minus dense_rope |  | -0.125 [{d['lo']:+.3f}, {d['hi']:+.3f}] |  |" in table
  )
  # No RULER task at 16384: no average row there.
  assert table.count("RULER average (") == 1


@pytest.mark.parametrize("order", [1, -1])
def test_assemble_computes_missing_accuracy_from_results(tmp_path, order):
  # Older files: no retrieval_acc; pooled from the entry's own results at train_len
  # (lr 3e-3: (16 + 0) / 64 = 0.25; lr 1e-3: (0 + 96) / 448 = 0.214; lower loss too).
  older_a = _entry(3e-3, 1.2, (0.25, 64), (0.0, 384), train_len=512)
  older_b = _entry(1e-3, 1.0, (0.0, 64), (0.25, 384), train_len=512)
  older_a["results"]["mqar (train format)"] = {"2048": _row(1.0, 384)}  # 4x: not selected on
  kept = _assemble(tmp_path, *[older_a, older_b][::order])
  assert kept["lr"] == 3e-3
  assert {r["lr"]: r["retrieval_acc"] for r in kept["sweep"]} == {3e-3: 0.25, 1e-3: 96 / 448}
  # A recorded figure is used as it is, not recomputed from the results.
  recorded = _entry(1e-2, 1.3, (0.0, 64), (0.0, 384), train_len=512, retrieval_acc=0.3)
  assert _assemble(tmp_path, *[older_a, recorded][::order])["lr"] == 1e-2


def test_assemble_real_h100_comparisons(tmp_path):
  """The committed H100 results (older files, one rate each): the kept entries differ from
  what the held-out loss kept for ssa_bounds and sliding."""
  results = os.path.join(REPO, "experiments", "results")
  paths = [
    os.path.join(results, "compare_h100", "compare.json"),  # lr 3e-3, MQAR about 0.1
    os.path.join(results, "compare_h100_curriculum", "steps200", "compare.json"),
    os.path.join(results, "compare_h100_curriculum", "tile1_kernels", "compare.json"),
  ]
  parts = [json.load(open(p))["mechanisms"] for p in paths]
  merged = compare.assemble(paths, str(tmp_path), log=_quiet)["mechanisms"]
  assert set(merged) == set(parts[0]) | set(parts[1]) | set(parts[2])
  loss = lambda e: e["sweep"][0]["val_loss"]  # noqa: E731
  # ssa_bounds: tile1_kernels (MQAR 345 of 384, NIAH 0 of 64) over compare_h100's lower loss.
  assert loss(parts[0]["ssa_bounds"]) < loss(parts[2]["ssa_bounds"])
  assert merged["ssa_bounds"]["results"] == parts[2]["ssa_bounds"]["results"]
  assert merged["ssa_bounds"]["lr"] == 1e-3
  kept = [r for r in merged["ssa_bounds"]["sweep"] if r["val_loss"] == loss(parts[2]["ssa_bounds"])]
  assert kept[0]["retrieval_acc"] == pytest.approx(345 / 448)
  # sliding: steps200 (MQAR 74 of 384) over compare_h100 (39 of 384, lower loss).
  assert loss(parts[0]["sliding"]) < loss(parts[1]["sliding"])
  assert merged["sliding"]["results"] == parts[1]["sliding"]["results"]
  # ssa_mean only in the first two: steps200's MQAR 51 of 384 over 38 of 384.
  assert merged["ssa_mean"]["results"] == parts[1]["ssa_mean"]["results"]
  assert "0.001: acc 0.77, loss 1.062" in open(tmp_path / "compare.md").read()


def test_with_beam_changes_the_descent_only():
  """`--beam` at evaluation: a beam covering every tree node finds exactly the flat top-k
  of block_topk over the same summaries (the descent prunes nothing), a beam of 1 does
  not, and the number of blocks attended stays top_k."""
  from subq_jax.config import SSAConfig
  from subq_jax.model import ModelConfig
  from subq_jax.ssa import ssa_attention

  attn = SSAConfig(block_size=8, query_tile=1, top_k=3, fanout=2, beam=1, summary="bounds")
  mcfg = ModelConfig(num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, mlp_dim=64,
                     dtype="float32", attention=attn)  # fmt: skip
  wide = evaluate.with_beam(mcfg, 64)
  assert wide.attention == dataclasses.replace(attn, beam=64)
  assert dataclasses.replace(wide, attention=attn) == mcfg
  q, k, v = jax.random.normal(jax.random.key(5), (3, 1, 256, 2, 16))
  k, v = k[:, :, :1], v[:, :, :1]

  def selected(a):
    _, info = ssa_attention(q, k, v, a, implementation="xla", return_info=True)
    return np.asarray(info.selected_blocks)

  flat = selected(dataclasses.replace(attn, kind="block_topk"))
  np.testing.assert_array_equal(selected(wide.attention), flat)
  narrow = selected(attn)
  assert (narrow != flat).any() and ((narrow >= 0).sum(-1) == (flat >= 0).sum(-1)).all()
  with pytest.raises(ValueError, match=r"beam=0"):
    evaluate.with_beam(mcfg, 0)
  dense = dataclasses.replace(mcfg, attention=dataclasses.replace(attn, kind="dense"))
  with pytest.raises(ValueError, match=r"beam=8 needs an `ssa` layer.*\['dense'\]"):
    evaluate.with_beam(dense, 8)


def test_training_format_evaluation_asks_at_the_end_whatever_task_min_len(monkeypatch):
  """A run trained with `task_min_len` (tasks placed anywhere among code) is still
  evaluated on samples whose queries end the sequence: the length is the evaluated one."""
  from subq_jax.config import SSAConfig
  from subq_jax.data import pipeline
  from subq_jax.data.tasks import NIAHConfig
  from subq_jax.model import ModelConfig, Transformer

  niah = NIAHConfig(num_needles=2, num_queries=2, uuid_chars=8)
  data_cfg = DataConfig(corpus_root=ROOT, val_fraction=0.3, niah=niah, task_min_len=64)
  last_answer, make_sample = [], pipeline.make_sample

  def recording(*args, **kwargs):
    sample = make_sample(*args, **kwargs)
    last_answer.append(int(np.flatnonzero(sample["answer_mask"])[-1]))
    return sample

  monkeypatch.setattr(pipeline, "make_sample", recording)
  suite = evaluate.SuiteConfig(tasks=(), lengths=(256,), train_tasks=("niah",), train_samples=4)
  attn = SSAConfig(kind="dense", block_size=16)
  mcfg = ModelConfig(num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, mlp_dim=64,
                     dtype="float32", attention=attn)  # fmt: skip
  _, params = nnx.split(Transformer(mcfg, rngs=nnx.Rngs(0)))
  evaluate._train_format(evaluate._Runner(params, mcfg), data_cfg, TOK, "niah", 256, suite)
  assert last_answer == [256] * 4

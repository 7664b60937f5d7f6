"""RULER-style, MRCR-style and MQAR generators (subq_jax.data.ruler) and their scoring."""

import json
import math
import os
import re
from collections import Counter
from difflib import SequenceMatcher

import numpy as np
import pytest

from subq_jax.data import ruler, scoring, tasks
from subq_jax.data.tokenizer import ByteTokenizer

# A small corpus (this package's own source) keeps the tests fast.
ROOT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "subq_jax")
SRC = ruler.Source(root=ROOT, val_fraction=0.3)
TOK = ByteTokenizer()
LENGTH = 4096
# The prompt falls short of the target by less than one filler unit; the longest units
# are MRCR turns and QA documents (a few hundred bytes).
SLACK = 400


def gen(name, length=LENGTH, seed=0, **kw):
  return ruler.generate(name, length, seed=seed, source=SRC, **kw)


@pytest.mark.parametrize("name", sorted(ruler.TASKS))
@pytest.mark.parametrize("length", [LENGTH, 12000])
def test_every_task_fits_parses_and_scores_its_target(name, length):
  s = gen(name, length)
  assert s.task == name and s.metric in scoring.METRICS
  assert s.answers and all(isinstance(a, str) and a for a in s.answers)
  used = SRC.count(s.prompt) + s.max_new_tokens
  assert length - SLACK <= used <= length, (name, used)
  assert s.meta["prompt_tokens"] == SRC.count(s.prompt)
  assert s.meta["filler"] and s.meta["filler_source"]
  json.dumps(s.meta)  # results files carry the metadata
  # The reference continuation scores full marks.
  if s.metric != "exact":
    assert scoring.score(s.metric, s.target, s.answers, s.meta.get("prefix", "")) == 1.0
  # Teacher-forced form: the mask covers exactly the answers.
  sample = s.to_sample(TOK, length)
  assert sample.tokens.shape == (length,) and sample.answer_mask.shape == (length,)
  text = s.prompt + s.target
  assert TOK.decode(sample.tokens) == text
  marked = TOK.decode(sample.tokens[sample.answer_mask])
  assert marked == "".join(s.answers)


@pytest.mark.parametrize("name", sorted(ruler.TASKS))
def test_deterministic_per_seed_and_different_across_seeds(name):
  a, b, c = gen(name, seed=3), gen(name, seed=3), gen(name, seed=4)
  assert a == b
  assert a.prompt != c.prompt and a.answers != c.answers
  # [seed, index] seeds the cells of an evaluation grid.
  assert gen(name, seed=[3, 0]) == gen(name, seed=[3, 0]) != gen(name, seed=[3, 1])


def test_suites():
  assert len(ruler.suite("ruler")) == 13 and set(ruler.suite("ruler")) <= set(ruler.TASKS)
  assert ruler.suite("niah")[:3] == ("niah_single_1", "niah_single_2", "niah_single_3")
  assert ruler.suite("mrcr") and ruler.suite("mqar") == ("mqar", "mqar_code")
  assert ruler.suite("vt") == ("vt",)
  with pytest.raises(ValueError, match="suite"):
    ruler.suite("longbench")
  with pytest.raises(ValueError, match="depth"):
    gen("cwe", depth=0.5)
  with pytest.raises(ValueError, match="too short"):
    gen("niah_single_2", length=200)


def _needles(text):
  return re.findall(r"One of the special magic (\w+) for (\S+) is: (\S+)\.", text)


@pytest.mark.parametrize(
  "name, filler, keys, values_per_key, queries",
  [
    ("niah_single_1", "noise", 1, 1, 1),
    ("niah_single_2", "code", 1, 1, 1),
    ("niah_single_3", "code", 1, 1, 1),
    ("niah_multikey_1", "code", 4, 1, 1),
    ("niah_multikey_2", "needle", None, 1, 1),
    ("niah_multikey_3", "needle", None, 1, 1),
    ("niah_multivalue", "code", 1, 4, 1),
    ("niah_multiquery", "code", 4, 1, 4),
    ("niah_uuid", "code", 1, 1, 1),
  ],
)
def test_niah_needles_answers_and_filler(name, filler, keys, values_per_key, queries):
  s = gen(name, seed=5)
  assert s.meta["filler"] == filler
  needles = _needles(s.context)
  table = {}
  for _, k, v in needles:
    table.setdefault(k, []).append(v)
  if keys is not None:
    assert len(table) == keys and len(needles) == keys * values_per_key
  else:  # a haystack of distractor needles
    assert len(needles) > 20
  asked = s.meta["keys"]
  assert len(asked) == queries
  assert sorted(s.answers) == sorted(v for k in asked for v in table[k])
  for a in s.answers:
    assert s.prompt.count(a) == 1  # only in its needle
  for k in asked:
    assert len(table[k]) == values_per_key  # no distractor needle reuses a queried key
  # The question names the keys; RULER's singular wording for one answer.
  assert all(k in s.query for k in asked)
  one = queries * values_per_key == 1
  assert s.context.startswith("A special magic" if one else "Some special magic")
  if filler == "noise":
    assert ruler.NOISE in s.context and "def " not in s.context
  if "3" in name or "uuid" in name:
    assert all(re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", a) for a in s.answers)
  else:
    assert all(re.fullmatch(r"[1-9]\d{6}", a) for a in s.answers)


@pytest.mark.parametrize("name", ["niah_single_1", "niah_single_2", "niah_multikey_2"])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_niah_depth_placement(name, depth):
  s = gen(name, seed=1, depth=depth)
  i = s.meta["needle_is_answer"].index(True)
  assert s.meta["depth"] == depth
  # Line granularity: the needle moves at most one line (< 100 bytes) from the depth.
  assert abs(s.meta["needle_depths"][i] - depth) < 0.03
  line = f"{s.answers[0]}."
  at = s.context.index(line) / len(s.context)
  assert abs(at - depth) < 0.06  # the instruction before the haystack shifts it a little


def test_qa_depth_places_the_gold_document():
  for depth in (0.0, 0.5, 1.0):
    s = gen("qa_1", length=12000, depth=depth)
    gold, n = s.meta["gold_docs"][0], s.meta["num_docs"]
    assert abs((gold - 1) / (n - 1) - depth) < 0.1


def test_variable_tracking_chain_resolves():
  s = gen("vt", seed=2)
  assign = dict(re.findall(r"VAR ([A-Z]{5}) = (\S+(?: [A-Z]{5})?)", s.context))
  value = s.meta["initial_value"]
  assert s.context.count(value) == 1 and len(assign) == s.meta["num_hops"] + 1

  def resolve(v):
    rhs = assign[v]
    return resolve(rhs[4:]) if rhs.startswith("VAR ") else rhs

  assert sorted(v for v in assign if resolve(v) == value) == sorted(s.answers)
  assert f"{len(s.answers)} variables are assigned the value {value}" in s.query
  # Hops appear in chain order.
  positions = [s.context.index(f"VAR {v} =") for v in s.answers]
  assert positions == sorted(positions)
  many = gen("vt", num_chains=3, num_hops=2)
  assert len(re.findall(r"VAR [A-Z]{5} = ", many.context)) == 9 and len(many.answers) == 3


@pytest.mark.parametrize("length", [LENGTH, 20000])
def test_common_words_counts(length):
  s = gen("cwe", length=length)
  listing = s.context.split("\n")[-1] if length >= 16384 else s.context.rsplit("\n", 1)[-1]
  words = re.findall(r"\d+\. (\w+)", listing)
  counts = Counter(words)
  fc, fu = s.meta["freq_cw"], s.meta["freq_ucw"]
  assert (fc, fu) == ((6, 1) if length < 16384 else (30, 3))
  assert {w for w, c in counts.items() if c == fc} == set(s.answers)
  assert all(c == fu for w, c in counts.items() if w not in s.answers)
  assert len(counts) == s.meta["num_words"]
  # One solved example comes first, with other words.
  shot = s.context.split("\n")[1]
  assert not set(re.findall(r"\d+\. (\w+)", shot)) & set(words)


def test_freq_words_ranks():
  s = gen("fwe")
  counts = Counter(s.context.split("\n")[0].split(" words. ", 1)[1].split())
  top = [w for w, _ in counts.most_common() if w != "..."][:3]
  assert top == list(s.answers)
  assert counts.most_common(1)[0][0] == "..."


def test_qa_single_hop_and_bridge():
  s = gen("qa_1", seed=4)
  assert s.metric == "part" and s.prompt.count(s.answers[0]) == 1
  entity = s.meta["entity"]
  assert entity in s.query
  gold = s.context.split("Document ")[s.meta["gold_docs"][0]]
  assert entity in gold and s.answers[0] in gold
  assert s.context.count(entity.split()[0]) >= 2 * 2  # a distractor shares the first name
  t = gen("qa_2", seed=4)
  docs = t.context.split("Document ")[1:]
  bridge = t.meta["bridge"]
  holding = [i + 1 for i, d in enumerate(docs) if bridge in d]
  assert sorted(holding) == sorted(t.meta["gold_docs"])  # the two hops, nowhere else
  person = re.search(r"that (\w+ \w+) works for", t.query).group(1)
  assert person in docs[t.meta["gold_docs"][0] - 1]
  assert t.answers[0] in docs[t.meta["gold_docs"][1] - 1] and t.prompt.count(t.answers[0]) == 1


@pytest.mark.parametrize("name, needles", [("mrcr_2", 2), ("mrcr", 4), ("mrcr_8", 8)])
def test_mrcr_kth_response(name, needles):
  s = gen(name, seed=6)
  m = s.meta
  ask = f"User: Write a {m['form']} about {m['topic']}.\nAssistant: "
  assert s.context.count(ask) == needles == m["num_needles"]
  responses = [part.split("\n\nUser: ")[0] for part in s.context.split(ask)[1:]]
  prefix = m["prefix"]
  assert s.target == prefix + responses[m["k"] - 1].rstrip("\n")
  assert s.context.count(s.target[len(prefix) :]) == 1 and prefix not in s.context
  assert f"to the {ruler._ordinal(m['k'])} (1 indexed) {m['form']} about" in s.query
  assert len(s.context.split("User: ")) - 1 > needles  # distractor requests around them
  k3 = gen(name, k=1)
  assert k3.meta["k"] == 1


def test_mqar_pairs_queries_and_distances():
  cfg = tasks.MQARConfig(num_pairs=12, num_queries=6)
  for name, seed in [("mqar", 2)] + [("mqar_code", seed) for seed in range(6)]:
    s = gen(name, cfg=cfg, seed=seed)
    text = s.prompt
    assert SRC.count(text) == LENGTH and s.max_new_tokens == 0
    table = dict(p.split(":") for p in text[len("mqar ") : text.index(" |")].split())
    assert len(table) == 12 and len(set(table.values())) == 12
    assert [text[a:b] for a, b in s.spans] == list(s.answers)
    for key, value, (a, _), dist, pos in zip(
      s.meta["keys"], s.answers, s.spans, s.meta["distances"], s.meta["query_positions"],
      strict=True,
    ):  # fmt: skip
      assert table[key] == value
      assert text.count(f"{key}:") == 2  # its pair and its query, nothing in the filler
      # Positions are in tokens, spans in characters: the code filler is not all ASCII.
      key_char = a - len(key) - 1
      assert key_char == text.index(f"\n{key}:") + 1
      assert pos == SRC.count(text[:key_char])
      assert dist == pos - SRC.count(text[: text.index(f"{key}:")])
    assert s.meta["query_positions"] == sorted(s.meta["query_positions"])


def test_mqar_gaps_are_uniform():
  cfg = tasks.MQARConfig(num_pairs=8, num_queries=8)
  where = (
    np.concatenate([gen("mqar", cfg=cfg, seed=i).meta["query_positions"] for i in range(40)])
    / LENGTH
  )
  # Uniform offsets: each quarter of the sequence holds about a quarter of the queries.
  hist = np.histogram(where, bins=4, range=(0, 1))[0] / where.size
  assert np.all(np.abs(hist - 0.25) < 0.08), hist


def test_string_match_hand_worked():
  assert scoring.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == (
    pytest.approx(2 / 3)
  )
  assert scoring.string_match_all("APPLE pie", ["apple", "Pie"]) == 1.0
  assert scoring.string_match_all("", ["a"]) == 0.0
  assert scoring.string_match_part("It is paris.", ["Paris", "London"]) == 1.0
  assert scoring.string_match_part("Rome", ["Paris", "London"]) == 0.0
  # RULER's batch numbers: mean over samples x 100, rounded to 2 decimals.
  preds = ["alpha beta", "gamma", "nothing"]
  refs = [["alpha", "beta"], ["gamma", "delta"], ["x"]]
  all_ = [scoring.string_match_all(p, r) for p, r in zip(preds, refs, strict=True)]
  part = [scoring.string_match_part(p, r) for p, r in zip(preds, refs, strict=True)]
  assert round(np.mean(all_) * 100, 2) == 50.0  # (1 + 0.5 + 0) / 3
  assert round(np.mean(part) * 100, 2) == 66.67  # (1 + 1 + 0) / 3


def test_mrcr_grade_hand_worked():
  assert scoring.mrcr("PRabcd", "PRabce", "PR") == pytest.approx(0.75)  # 2 * 3 / 8
  assert scoring.mrcr("abcd", "PRabcd", "PR") == 0.0  # the prefix is required
  assert scoring.mrcr("prabcd", "PRabcd", "PR") == 0.0  # case-sensitive, as OpenAI's
  assert scoring.mrcr("PRabcd", "PRabcd", "PR") == 1.0
  ref = "PRThe quiet owl sings."
  pred = "PRThe quiet owl sleeps."
  want = SequenceMatcher(None, pred[2:], ref[2:]).ratio()
  assert scoring.score("mrcr", pred, [ref], "PR") == want
  assert scoring.exact(" 123 ", ["123"]) == 1.0 and scoring.exact("1234", ["123"]) == 0.0
  with pytest.raises(ValueError, match="metric"):
    scoring.score("bleu", "a", ["a"])


def test_wilson_interval_hand_worked():
  lo, hi = scoring.wilson_interval(50, 100)
  assert (lo, hi) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
  lo, hi = scoring.wilson_interval(10, 10)
  assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1.0
  lo, hi = scoring.wilson_interval(0, 50)
  assert lo == 0.0 and hi == pytest.approx(0.0714, abs=1e-4)
  r = scoring.mean_score([1, 1, 0, 1])
  assert r["mean"] == 0.75 and r["n"] == 4 and r["lo"] < 0.75 < r["hi"]
  with pytest.raises(ValueError, match="n=0"):
    scoring.wilson_interval(0, 0)
  buckets = scoring.bucket_by_distance([5, 15, 25, 12], [1, 0, 1, 1], [0, 10, 20, 30])
  assert [b["n"] for b in buckets] == [1, 2, 1]
  assert [b["mean"] for b in buckets] == [1.0, 0.5, 1.0]


def test_task_average_and_difference_hand_worked():
  # Task 1: 5/10 -> adjusted p (5 + 2) / 14 = 0.5, variance 0.25 / 14.
  # Task 2: 20/20 -> adjusted p 22 / 24, variance (22/24)(2/24) / 24.
  # Mean 0.75, se = sqrt(0.25/14 + 22*2/24**3) / 2 = 0.07252.
  r = scoring.task_average([{"mean": 0.5, "n": 10}, {"mean": 1.0, "n": 20}])
  se = math.sqrt(0.25 / 14 + 22 * 2 / 24**3) / 2
  assert r["mean"] == 0.75 and r["n"] == 30 and r["tasks"] == 2
  assert r["se"] == pytest.approx(se) and se == pytest.approx(0.07252, abs=1e-5)
  assert (r["lo"], r["hi"]) == (
    pytest.approx(0.75 - 1.96 * se, abs=1e-4),
    pytest.approx(0.75 + 1.96 * se, abs=1e-4),
  )
  # Every task at 0: the interval still has width, and is clipped at 0.
  z = scoring.task_average([{"mean": 0.0, "n": 48}, {"mean": 0.0, "n": 16}])
  assert z["lo"] == 0.0 and 0.0 < z["hi"] < 0.1
  d = scoring.difference(r, z)
  assert d["mean"] == 0.75 and d["se"] == pytest.approx(math.hypot(r["se"], z["se"]))
  assert d["lo"] < 0.75 < d["hi"]
  with pytest.raises(ValueError, match="n >= 1"):
    scoring.task_average([{"mean": 0.5, "n": 0}])
  with pytest.raises(ValueError, match="at least one"):
    scoring.task_average([])


@pytest.mark.parametrize("name", ["niah_single_2", "niah_multivalue", "niah_multikey_2", "qa_2"])
def test_answers_unique_over_many_seeds(name):
  for seed in range(15):
    s = gen(name, length=8000, seed=seed)
    assert all(s.prompt.count(a) == 1 for a in s.answers), (name, seed)


def test_to_sample_unpadded_and_too_long():
  s = gen("niah_single_1", length=1000)
  sample = s.to_sample(TOK)
  assert len(sample.tokens) == SRC.count(s.prompt + s.target) < 1000
  assert TOK.decode(sample.tokens[sample.answer_mask]) == s.answers[0]
  with pytest.raises(ValueError, match="do not fit"):
    s.to_sample(TOK, length=100)

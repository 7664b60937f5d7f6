"""Data: tokenizer, corpus split, task generators, packing, determinism of the pipeline."""

import dataclasses
import os
import re

import numpy as np
import pytest

from subq_jax.data import corpus, ruler, tasks
from subq_jax.data.pipeline import DataConfig, make_dataset, make_sample
from subq_jax.data.tokenizer import ByteTokenizer, get_tokenizer

# A small corpus (this package's own source) keeps the tests fast.
ROOT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "subq_jax")
CFG = DataConfig(
  corpus_root=ROOT,
  val_fraction=0.3,
  niah=tasks.NIAHConfig(num_needles=3, num_queries=2, uuid_chars=36),
  mqar=tasks.MQARConfig(num_pairs=6, num_queries=3),
)
TOK = ByteTokenizer()


def test_byte_tokenizer_roundtrip():
  text = "def f(x):\n  return x  # ünïcode"
  ids = TOK.encode(text)
  assert ids.dtype == np.int32 and ids.max() < 256
  assert TOK.decode(ids) == text
  assert TOK.decode([TOK.sep_id, *TOK.encode("a")]) == "a"
  assert TOK.vocab_size == 258


def test_other_tokenizers_need_a_file():
  with pytest.raises(ValueError, match="tokenizer_path"):
    get_tokenizer("sentencepiece")
  with pytest.raises(ValueError, match="not one of"):
    get_tokenizer("wordpiece", "x")


def test_corpus_split_is_deterministic_and_disjoint():
  docs = corpus.load_documents(ROOT)
  assert all(text.startswith("# ===== file: ") for _, text in docs)
  train = {n for n, _ in docs if corpus.split_of(n, 0.3) == "train"}
  val = {n for n, _ in docs if corpus.split_of(n, 0.3) == "validation"}
  assert train and val and not train & val
  assert corpus.split_of("json#0", 0.05) == corpus.split_of("json#0", 0.05)
  stream = corpus.token_stream(TOK, "train", 0.3, ROOT)
  assert np.sum(stream == TOK.sep_id) == len(train)  # one separator per document


def test_stdlib_corpus_found():
  root = corpus.stdlib_root()
  assert os.path.exists(os.path.join(root, "json", "__init__.py"))


def test_niah_answers_are_the_needle_values():
  stream = corpus.token_stream(TOK, "train", 0.3, ROOT)
  rng = np.random.default_rng(7)
  s = tasks.niah(rng, TOK, stream, 1000, CFG.niah)
  assert s.tokens.shape == (1000,) and s.answer_mask.shape == (1000,)
  text = TOK.decode(s.tokens)
  spans = np.flatnonzero(np.diff(np.concatenate([[0], s.answer_mask.astype(int), [0]])))
  assert len(spans) == 2 * CFG.niah.num_queries
  for a, b in zip(spans[::2], spans[1::2], strict=True):
    value = TOK.decode(s.tokens[a:b])
    assert len(value) == 36
    assert text.count(f"holds {value}\n") == 1  # the needle carrying this value
    key = text[text.index(f"holds {value}") - 37 : text.index(f"holds {value}") - 1]
    assert f"recall {key} -> {value}" in text


@pytest.mark.parametrize(
  "fmt",
  [
    {},
    dict(key_alphabet="greek", value_alphabet="digits", uuid_chars=2, together=True),
    dict(needle_format="\n# {key}{value}\n", query_format="\n# {key}", uuid_chars=8),
  ],
)
def test_niah_needle_at_is_each_querys_needle_value(fmt):
  """`needle_at[i]` is where query i's needle value starts: the value there equals the
  answer, and the needle's key is the key the query asks for."""
  cfg = dataclasses.replace(CFG.niah, num_needles=5, num_queries=4, **fmt)
  stream = corpus.token_stream(TOK, "train", 0.3, ROOT)
  s = tasks.niah(np.random.default_rng(11), TOK, stream, 1500, cfg)
  spans = np.flatnonzero(np.diff(np.concatenate([[0], s.answer_mask.astype(int), [0]])))
  assert len(s.needle_at) == cfg.num_queries
  before = cfg.needle_format.split("{value}")[0]  # the needle's text up to its value
  q_head, q_tail = cfg.query_format.split("{key}")
  for (a, b), at in zip(zip(spans[::2], spans[1::2], strict=True), s.needle_at, strict=True):
    assert at < a and np.array_equal(s.tokens[at : at + b - a], s.tokens[a:b])
    key = TOK.decode(s.tokens[max(0, a - 60) : a]).rsplit(q_head, 1)[1]
    key = key[: len(key) - len(q_tail)]
    needle = TOK.decode(s.tokens[max(0, at - 60) : at])
    assert needle.endswith(before.format(key=key)), (needle, key)


@pytest.mark.parametrize(
  "fmt",
  [
    {},  # "block": the queries right after the pairs
    dict(
      layout="spread",
      pairs_at=0.5,
      key_alphabet="greek",
      key_len=1,
      value_len=1,
      separator="",
      num_pairs=24,
      num_queries=24,
    ),  # "spread": the training recipe's MQAR (sessions 12-20)
  ],
)
def test_mqar_needle_at_is_each_querys_pair_value(fmt):
  """`needle_at[i]` is where query i's pair value starts: the value there equals the
  answer and the key before it is the key the query asks for, and no other pair holds it."""
  cfg = dataclasses.replace(CFG.mqar, **fmt)
  stream = corpus.token_stream(TOK, "train", 0.3, ROOT)
  for seed in range(4):
    s = tasks.mqar(np.random.default_rng(seed), TOK, stream, 1500, cfg)
    spans = np.flatnonzero(np.diff(np.concatenate([[0], s.answer_mask.astype(int), [0]])))
    assert len(s.needle_at) == cfg.num_queries == len(set(s.needle_at.tolist()))
    key = tasks.KEY_ALPHABETS[cfg.key_alphabet][0] * cfg.key_len
    before = len(TOK.encode(key + cfg.separator))  # the key and separator, in tokens
    for (a, b), at in zip(zip(spans[::2], spans[1::2], strict=True), s.needle_at, strict=True):
      assert at < a and np.array_equal(s.tokens[at : at + b - a], s.tokens[a:b])
      assert np.array_equal(s.tokens[at - before : at], s.tokens[a - before : a])


def test_niah_greek_keys():
  cfg = tasks.NIAHConfig(
    num_needles=6, num_queries=6, uuid_chars=2, key_alphabet="greek", value_alphabet="digits"
  )
  stream = corpus.token_stream(TOK, "train", 0.3, ROOT)
  s = tasks.niah(np.random.default_rng(5), TOK, stream, 400, cfg)
  text = TOK.decode(s.tokens)
  needles = re.findall(r"# key (\S+) holds (\S+)\n", text)
  assert len(needles) == 6 and len({k for k, _ in needles}) == 6
  for key, value in needles:
    assert len(key) == 2 and set(key) <= set(tasks.KEY_ALPHABETS["greek"])
    assert len(value) == 2 and value.isdigit()
    assert text.count(f"recall {key} -> {value}") == 1  # every needle asked once
  assert s.answer_mask.sum() == len(TOK.encode("".join(v for _, v in needles)))
  with pytest.raises(ValueError, match="niah.value_alphabet='hex' is not one of"):
    tasks.NIAHConfig(value_alphabet="hex")
  with pytest.raises(ValueError, match="niah.key_alphabet='cyrillic' is not one of"):
    tasks.NIAHConfig(key_alphabet="cyrillic")
  with pytest.raises(ValueError, match="num_needles=30 distinct keys do not exist"):
    tasks.NIAHConfig(num_needles=30, num_queries=1, uuid_chars=1, key_alphabet="greek")


def test_niah_needles_together():
  cfg = tasks.NIAHConfig(num_needles=5, num_queries=3, uuid_chars=4, together=True)
  stream = corpus.token_stream(TOK, "train", 0.3, ROOT)
  text = TOK.decode(tasks.niah(np.random.default_rng(6), TOK, stream, 600, cfg).tokens)
  block = re.search(r"(\n# key \S+ holds \S+\n){5}", text)
  assert block is not None, text  # the five needles one after another
  assert len(re.findall(r"# key \S+ holds \S+\n", text)) == 5
  assert text.index("# recall") > block.end()
  # Scattered (the default), five needles of the same seed are not all adjacent.
  apart = dataclasses.replace(cfg, together=False)
  text = TOK.decode(tasks.niah(np.random.default_rng(6), TOK, stream, 600, apart).tokens)
  assert re.search(r"(\n# key \S+ holds \S+\n){5}", text) is None


def test_mqar_answers_match_pairs():
  stream = corpus.token_stream(TOK, "train", 0.3, ROOT)
  s = tasks.mqar(np.random.default_rng(3), TOK, stream, 400, CFG.mqar)
  assert s.tokens.shape == (400,)
  assert np.sum(s.tokens == TOK.sep_id) >= 2  # packed between separators
  # The document between its separators (code packed after it may hold ":" too).
  docs = np.split(s.tokens, np.flatnonzero(s.tokens == TOK.sep_id))
  (doc,) = [d for d in (TOK.decode(d[d != TOK.sep_id]) for d in docs) if "mqar " in d]
  doc = doc[doc.index("mqar ") :]
  pairs, queries = doc.split(" |", 1)
  table = dict(p.split(":") for p in pairs[len("mqar ") :].split(" "))
  asked = [q.split(":") for q in queries.split(" ")[1 : 1 + CFG.mqar.num_queries]]
  assert len(asked) == CFG.mqar.num_queries
  assert all(table[k] == v[: CFG.mqar.value_len] for k, v in asked)
  assert s.answer_mask.sum() == CFG.mqar.num_queries * CFG.mqar.value_len


def test_mqar_spread_layout_scatters_queries():
  """layout="spread": the pairs first, every queried key right before its own answer, and
  the queries spread through the sequence (the last one far from the pairs)."""
  stream = corpus.token_stream(TOK, "train", 0.3, ROOT)
  cfg = tasks.MQARConfig(
    num_pairs=6, num_queries=6, key_len=1, value_len=1, separator="", key_alphabet="greek",
    layout="spread",
  )  # fmt: skip
  s = tasks.mqar(np.random.default_rng(5), TOK, stream, 2000, cfg)
  assert s.tokens.shape == (2000,) and s.answer_mask.sum() == 6
  text = TOK.decode(s.tokens)
  head = text[text.index("mqar ") : text.index(" |")]
  table = dict((p[:-1], p[-1]) for p in head[len("mqar ") :].split(" "))
  answers = np.flatnonzero(s.answer_mask)
  for a in answers:
    key = TOK.decode(s.tokens[a - 2 : a])  # a Greek letter is two bytes
    assert table[key] == TOK.decode(s.tokens[a : a + 1])
  assert answers[-1] - answers[0] > 500  # scattered over the 2,000 tokens
  # pairs_at: the pairs move into the sequence, the queries stay after them.
  late = dataclasses.replace(cfg, pairs_at=0.9)
  starts = []
  for seed in range(6):
    s = tasks.mqar(np.random.default_rng(seed), TOK, stream, 2000, late)
    assert s.tokens.shape == (2000,) and s.answer_mask.sum() == 6
    pat = TOK.encode("mqar ")
    start = next(i for i in range(len(s.tokens)) if np.array_equal(s.tokens[i : i + 5], pat))
    assert np.flatnonzero(s.answer_mask)[0] > start
    starts.append(start)
  assert max(starts) > 300  # beyond any sink of a few blocks
  with pytest.raises(ValueError, match="pairs_at=1.5"):
    dataclasses.replace(cfg, pairs_at=1.5)
  with pytest.raises(ValueError, match="pairs_at=0.5 needs layout='spread'"):
    dataclasses.replace(cfg, pairs_at=0.5, layout="block")


def test_task_too_long_names_the_task():
  with pytest.raises(ValueError, match="niah"):
    make_sample(CFG, TOK, np.arange(100, dtype=np.int32), 50, np.random.default_rng(0), "niah")


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_pipeline_deterministic_packed_and_resumable():
  kw = dict(seq_len=600, batch_size=3)
  a = _take(iter(make_dataset(CFG, **kw)), 4)
  b = _take(iter(make_dataset(CFG, **kw)), 4)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
    np.testing.assert_array_equal(x["answer_mask"], y["answer_mask"])
  assert a[0]["tokens"].shape == (3, 601) and a[0]["tokens"].dtype == np.int32
  assert not np.array_equal(a[0]["tokens"], a[1]["tokens"])
  # Another seed or stage gives other data.
  other = next(iter(make_dataset(dataclasses.replace(CFG, seed=1), **kw)))
  assert not np.array_equal(other["tokens"], a[0]["tokens"])
  # The iterator state resumes exactly.
  it = iter(make_dataset(CFG, **kw))
  _take(it, 2)
  state = it.get_state()
  resumed = iter(make_dataset(CFG, **kw))
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["tokens"], a[2]["tokens"])


def test_mixture_weights():
  cfg = dataclasses.replace(CFG, mixture={"code": 0.0, "niah": 1.0, "mqar": 0.0})
  batch = next(iter(make_dataset(cfg, seq_len=512, batch_size=4)))
  assert (batch["source"] == 1).all() and batch["answer_mask"].any(axis=1).all()
  with pytest.raises(ValueError, match="mixture"):
    dataclasses.replace(CFG, mixture={"code": 1.0, "books": 1.0})


def test_ruler_source_packs_a_task_in_its_evaluation_format():
  cfg = dataclasses.replace(CFG, mixture={"ruler": 1.0}, ruler_tasks=("niah_single_1", "vt"))
  batch = next(iter(make_dataset(cfg, seq_len=700, batch_size=6)))
  assert batch["tokens"].shape == (6, 701) and (batch["source"] == 3).all()
  for tokens, mask in zip(batch["tokens"], batch["answer_mask"], strict=True):
    text = TOK.decode(tokens[: np.flatnonzero(tokens == TOK.sep_id)[0]])
    answers = TOK.decode(tokens[mask])
    if "magic number" in text:  # niah_single_1: the needle's value, asked once at the end
      key = text.rsplit("special magic number for ", 1)[1].split(" ")[0]
      needle = text.split(f"One of the special magic numbers for {key} is: ")[1][:7]
      assert answers == needle and needle.isdigit()
    else:  # vt: the variables that hold the asked value, each assigned in the text
      value = text.rsplit("are assigned the value ", 1)[1].split(",")[0]
      names = [answers[i : i + 5] for i in range(0, len(answers), 5)]  # five letters each
      assert names and all(f"VAR {v} = " in text for v in names)
      assert value.isdigit()
    # The answer is the end of the task: a separator follows, then code fills the row.
    last = np.flatnonzero(mask)[-1]
    assert TOK.sep_id in tokens[last + 1 : last + 3]
  with pytest.raises(ValueError, match="niah_single_9"):
    dataclasses.replace(CFG, ruler_tasks=("niah_single_9",))
  assert set(CFG.ruler_tasks) <= set(ruler.TASKS)


def test_task_min_len_places_whole_tasks_anywhere_among_code():
  """With `task_min_len`, a task sample keeps its own answers and needles (each answer
  equals the value at its `needle_at`, shifted with the task) but ends anywhere in the
  sequence, behind separators; 0 keeps the full-length layout."""
  cfg = dataclasses.replace(CFG, task_min_len=200, niah=dataclasses.replace(CFG.niah, uuid_chars=8))
  stream = corpus.token_stream(TOK, "train", 0.3, ROOT)
  ends, starts = [], []
  for i in range(24):
    for source in ("niah", "mqar"):
      s = make_sample(cfg, TOK, stream, 600, np.random.default_rng([5, i]), source, needle_at=True)
      assert s["tokens"].shape == (601,) and s["answer_mask"].shape == (601,)
      answers = np.flatnonzero(s["answer_mask"])
      ends.append(answers[-1])
      if source == "niah":
        starts.append(s["needle_at"].min())
      spans = np.flatnonzero(np.diff(np.concatenate([[0], s["answer_mask"].astype(int), [0]])))
      for (a, b), at in zip(zip(spans[::2], spans[1::2], strict=True), s["needle_at"], strict=True):
        assert at < a and np.array_equal(s["tokens"][at : at + b - a], s["tokens"][a:b])
      if answers[-1] < 599:  # code behind the task, after a separator
        assert TOK.sep_id in s["tokens"][answers[-1] + 1 : answers[-1] + 3]
  assert min(ends) < 450 and max(ends) >= 580, (min(ends), max(ends))
  whole = make_sample(CFG, TOK, stream, 600, np.random.default_rng([5, 0]), "niah")
  assert np.flatnonzero(whole["answer_mask"])[-1] == 600
  with pytest.raises(ValueError, match=r"task_min_len=-1"):
    dataclasses.replace(CFG, task_min_len=-1)

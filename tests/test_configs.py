"""Every configs/*.py builds, resolves, and trains one step in its smallest variant."""

import dataclasses
import glob
import importlib.util
import os

import numpy as np
import pytest

from subq_jax import train as train_lib
from subq_jax.experiment import parse_arg, resolve

CONFIGS = sorted(
  p
  for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py"))
  if not p.endswith("__init__.py")
)


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_there_are_configs():
  names = {os.path.basename(p) for p in CONFIGS}
  assert {"quickstart.py", "ablation.py", "gpu.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_full_config_resolves(path):
  cfg = resolve(_load(path).get_config())
  assert cfg.train.total_steps > 0
  train_lib.check_schedule(cfg)


@pytest.mark.parametrize("kind", ["dense", "sliding", "block_topk", "indexer"])
def test_ablation_differs_only_in_attention(kind):
  module = _load([p for p in CONFIGS if p.endswith("ablation.py")][0])
  base, other = resolve(module.get_config("kind=ssa")), resolve(module.get_config(f"kind={kind}"))
  assert other.model.attention.kind == kind
  assert other.train == base.train and other.data == base.data

  assert dataclasses.replace(other.model, attention=base.model.attention) == base.model
  if kind != "dense":
    assert other.model.attention.keys_per_query == base.model.attention.keys_per_query


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_one_step_smoke(path, tmp_path):
  cfg = resolve(_load(path).get_config("smoke"))
  result = train_lib.train(cfg, str(tmp_path), stop_after=1, log=lambda *_: None)
  assert list(result.losses) == [1] and np.isfinite(result.losses[1])


def test_variants_are_checked():
  with pytest.raises(ValueError, match="unknown config variant 'knd'"):
    parse_arg("knd=dense", kind="ssa")
  assert parse_arg("kind=dense,smoke", kind="ssa", smoke=False).to_dict() == {
    "kind": "dense",
    "smoke": True,
  }


def test_ablation_first_stage_niah_share_and_tile():
  module = _load([p for p in CONFIGS if p.endswith("ablation.py")][0])
  cfg = resolve(module.get_config("short_niah=0.5,short_chars=4,tile=2"))
  first = cfg.train.stages[0]
  assert first.data["mixture"] == pytest.approx({"code": 0.1, "niah": 0.5, "mqar": 0.4})
  assert train_lib.stage_data_config(cfg, 0).niah.uuid_chars == 4
  assert train_lib.stage_data_config(cfg, 1).niah.uuid_chars == cfg.data.niah.uuid_chars == 8
  assert cfg.train.stages[-1].data is None  # the 4096 stage keeps the full mixture
  assert cfg.model.attention.query_tile == 2
  assert resolve(module.get_config()).model.attention.query_tile == 1
  assert not train_lib.stage_data_config(cfg, 0).niah.together
  together = resolve(module.get_config("short_together=True"))
  assert train_lib.stage_data_config(together, 0).niah.together
  assert train_lib.stage_data_config(together, 0).niah.uuid_chars == 8
  assert not train_lib.stage_data_config(together, 1).niah.together
  with pytest.raises(ValueError, match=r"short_niah=0.95 must be in \[0, 0.9\]"):
    module.get_config("short_niah=0.95")
  with pytest.raises(ValueError, match=r"stages\[0\].*uuid_chars=40 must be in \[1, 36\]"):
    train_lib.stage_data_config(resolve(module.get_config("short_chars=40")), 0)


def test_ablation_key_length_ladder_and_niah_share():
  module = _load([p for p in CONFIGS if p.endswith("ablation.py")][0])
  cfg = resolve(module.get_config("short_chars=4-8,short_steps=2000-1500,steps=600,niah=0.3"))
  assert [(s.seq_len, s.steps) for s in cfg.train.stages] == [(512, 2000), (512, 1500), (4096, 600)]
  assert [train_lib.stage_data_config(cfg, i).niah.uuid_chars for i in range(3)] == [4, 8, 8]
  mixture = dict(cfg.data.mixture)
  assert mixture == pytest.approx({"code": 0.15, "niah": 0.3, "mqar": 0.3, "ruler": 0.25})
  assert sum(mixture.values()) == pytest.approx(1.0)
  one_count = resolve(module.get_config("short_chars=2-4-8,short_steps=300"))
  assert [s.steps for s in one_count.train.stages[:3]] == [300, 300, 300]
  default = resolve(module.get_config())
  assert [(s.seq_len, s.steps) for s in default.train.stages] == [(512, 1200), (4096, 200)]
  assert dict(default.data.mixture)["niah"] == 0.15
  assert dict(default.data.mixture)["mqar"] == 0.45
  with pytest.raises(ValueError, match=r"short_steps='1-2-3' needs one count or one per"):
    module.get_config("short_chars=4-8,short_steps=1-2-3")
  with pytest.raises(ValueError, match=r"short_chars='4-x' and short_steps='1200' must be"):
    module.get_config("short_chars=4-x")
  with pytest.raises(ValueError, match=r"niah=0.7 must be in \[0, 0.6\]"):
    module.get_config("niah=0.7")


@pytest.mark.parametrize("block,top_k,local", [(64, 4, 1), (32, 10, 2), (16, 22, 4)])
def test_ablation_block_size_keeps_the_key_budget(block, top_k, local):
  module = _load([p for p in CONFIGS if p.endswith("ablation.py")][0])
  attn = resolve(module.get_config(f"block={block}")).model.attention
  got = (attn.block_size, attn.top_k, attn.local_blocks, attn.sink_blocks)
  assert got == (block, top_k, local, 1)
  assert attn.keys_per_query == 448
  assert attn.local_blocks * attn.block_size == 64


def test_ablation_block_size_must_divide_the_local_window():
  module = _load([p for p in CONFIGS if p.endswith("ablation.py")][0])
  with pytest.raises(ValueError, match="block=48 must divide 64"):
    module.get_config("block=48")


def test_ablation_short_ruler_share_and_tasks_that_fit_512():
  from subq_jax.data import corpus, pipeline, ruler

  module = _load([p for p in CONFIGS if p.endswith("ablation.py")][0])
  cfg = resolve(module.get_config("short_chars=4-8,short_niah=0.45,short_ruler=0.2"))
  for stage in (0, 1):
    data = train_lib.stage_data_config(cfg, stage)
    assert dict(data.mixture) == pytest.approx(
      {"code": 0.1, "niah": 0.45, "mqar": 0.25, "ruler": 0.2}
    )
    assert data.ruler_tasks == module.SHORT_RULER_TASKS
  last = train_lib.stage_data_config(cfg, 2)
  assert last.ruler_tasks == pipeline.RULER_TASKS  # the 4096 stage keeps every task
  without = resolve(module.get_config("short_chars=4-8,short_niah=0.45"))
  assert "ruler" not in dict(train_lib.stage_data_config(without, 0).mixture)
  # The list is exact: these build in a 512-token stage, the other training tasks do not.
  data = train_lib.stage_data_config(resolve(module.get_config("short_ruler=0.3")), 0)
  data = dataclasses.replace(
    data, corpus_root=os.path.join(os.path.dirname(__file__), "..", "subq_jax")
  )
  tok = data.make_tokenizer()
  stream = corpus.token_stream(tok, "train", data.val_fraction, data.corpus_root)
  source = ruler.Source(tok, "train", data.val_fraction, data.corpus_root)
  for name in module.SHORT_RULER_TASKS:
    one = dataclasses.replace(data, ruler_tasks=(name,))
    for seed in range(8):
      rng = np.random.default_rng(seed)
      sample = pipeline.make_sample(one, tok, stream, 512, rng, "ruler", text_source=source)
      assert len(sample["tokens"]) == 513 and 7 <= sample["answer_mask"].sum() <= 40
  for name in set(pipeline.RULER_TASKS) - set(module.SHORT_RULER_TASKS):
    with pytest.raises(ValueError):
      ruler.generate(name, 512, seed=0, source=source)
  with pytest.raises(ValueError, match=r"short_ruler=0.5 must be in \[0, 0.9 - short_niah=0.45\]"):
    module.get_config("short_niah=0.45,short_ruler=0.5")
  with pytest.raises(ValueError, match="short_ruler=0.2 needs short >= 512, got short=256"):
    module.get_config("short=256,short_ruler=0.2")


def test_ablation_task_min_places_the_4096_stage_tasks():
  module = _load([p for p in CONFIGS if p.endswith("ablation.py")][0])
  cfg = resolve(module.get_config("smoke,task_min=1024"))
  assert all(
    train_lib.stage_data_config(cfg, i).task_min_len == 1024 for i in range(len(cfg.train.stages))
  )
  real = resolve(module.get_config("task_min=1024"))
  real = dataclasses.replace(
    real,
    data=dataclasses.replace(
      real.data, corpus_root=os.path.join(os.path.dirname(__file__), "..", "subq_jax")
    ),
  )
  train_lib.check_schedule(real)  # every source builds at 4096 and at 1024
  with pytest.raises(ValueError, match=r"task_min_len=64\) cannot hold .* at 64 tokens"):
    train_lib.check_schedule(
      dataclasses.replace(real, data=dataclasses.replace(real.data, task_min_len=64))
    )
  with pytest.raises(ValueError, match="task_min=-1 must be >= 0"):
    module.get_config("task_min=-1")


def test_ablation_short_top_k_routes_in_the_short_stages():
  module = _load([p for p in CONFIGS if p.endswith("ablation.py")][0])
  cfg = resolve(module.get_config("block=16,short_chars=4-8,short_steps=2-2,short_top_k=2"))
  top_k = [train_lib.stage_model_config(cfg, i).attention.top_k for i in range(3)]
  assert top_k == [2, 2, 22]  # the 4096 stage keeps 448 keys
  assert train_lib.stage_model_config(cfg, 0).attention.keys_per_query == 128
  base = resolve(module.get_config("block=16,short_chars=4-8,short_steps=2-2"))
  assert [train_lib.stage_model_config(base, i).attention.top_k for i in range(3)] == [22] * 3
  for arg in ("short_top_k=-1", "short=0,short_top_k=-1"):  # checked with or without short stages
    with pytest.raises(ValueError, match="short_top_k=-1 must be an integer >= 0"):
      module.get_config(arg)


def test_ablation_coarse_grad_routes_with_the_coarse_gradient():
  module = _load([p for p in CONFIGS if p.endswith("ablation.py")][0])
  cfg = resolve(module.get_config("summary=bounds,short_steps=2,steps=5,coarse_grad=0.5"))
  assert [train_lib.stage_model_config(cfg, i).attention.coarse_grad for i in range(2)] == [
    0.5,
    0.5,
  ]
  # Converted: the dense stages run without it, the converted stage with it.
  cfg = resolve(module.get_config("short_steps=2,steps=5,convert=2,coarse_grad=1"))
  attention = [train_lib.stage_model_config(cfg, i).attention for i in range(3)]
  assert [(a.kind, a.coarse_grad) for a in attention] == [
    ("dense", 0.0),
    ("dense", 0.0),
    ("ssa", 1.0),
  ]
  # The frontier branch by override: the dense stages reset it (dense has no tree).
  cfg = module.get_config("short_steps=2,steps=5,convert=2,coarse_grad=1")
  cfg.model.attention.coarse_nodes = "frontier"
  attention = [train_lib.stage_model_config(resolve(cfg), i).attention for i in range(3)]
  assert [a.coarse_nodes for a in attention] == ["blocks", "blocks", "frontier"]
  with pytest.raises(ValueError, match=r"coarse_grad=1.0 .* kind='sliding' does not route"):
    resolve(module.get_config("kind=sliding,coarse_grad=1"))
  # short_coarse=0: the 4096 stage alone, with the short stages' other attention knobs kept.
  arg = "block=16,short_chars=4-8,short_steps=2-2,steps=5,coarse_grad=1,short_coarse=0"
  cfg = resolve(module.get_config(arg + ",short_top_k=2"))
  attention = [train_lib.stage_model_config(cfg, i).attention for i in range(3)]
  assert [(a.top_k, a.coarse_grad) for a in attention] == [(2, 0.0), (2, 0.0), (22, 1.0)]
  for arg in ("short_coarse=0", "coarse_grad=1,short=0,short_coarse=0", "convert=1,short_coarse=0"):
    with pytest.raises(ValueError, match="short_coarse=0 has no effect"):
      module.get_config(arg)


def test_ablation_far_places_far_blocks_in_every_block_stage():
  module = _load([p for p in CONFIGS if p.endswith("ablation.py")][0])
  cfg = resolve(module.get_config("block=16,short_steps=2,steps=5,far=80"))
  attention = [train_lib.stage_model_config(cfg, i).attention for i in range(2)]
  assert [(a.kind, a.far_distance) for a in attention] == [("ssa", 80), ("ssa", 80)]
  cfg = resolve(module.get_config("block=16,short_steps=2,steps=5,convert=2,far=80"))
  attention = [train_lib.stage_model_config(cfg, i).attention for i in range(3)]
  assert [(a.kind, a.far_distance) for a in attention] == [("dense", 0), ("dense", 0), ("ssa", 80)]
  for arg, match in (
    ("kind=dense,far=80", "kind='dense' attends no blocks"),
    ("far=-1", "far_distance=-1"),
  ):
    with pytest.raises(ValueError, match=match):
      resolve(module.get_config(arg))


def test_ablation_convert_trains_dense_first():
  module = _load([p for p in CONFIGS if p.endswith("ablation.py")][0])
  arg = "block=16,summary=bounds,short_chars=4-8,short_steps=2-2,steps=5,convert=2"
  cfg = resolve(module.get_config(arg))
  stages = cfg.train.stages
  assert [(s.seq_len, s.steps) for s in stages] == [(512, 2), (512, 2), (4096, 3), (4096, 2)]
  kinds = [train_lib.stage_model_config(cfg, i).attention.kind for i in range(4)]
  assert kinds == ["dense", "dense", "dense", "ssa"]
  last = train_lib.stage_model_config(cfg, 3).attention
  assert (last.summary, last.keys_per_query) == ("bounds", 448)
  assert [
    s.niah.uuid_chars for s in map(lambda i: train_lib.stage_data_config(cfg, i), range(4))
  ] == [4, 8, 8, 8]
  train_lib.check_schedule(cfg)
  # convert=steps: only the short stages are dense.
  every = resolve(module.get_config("short_steps=2,steps=5,convert=5"))
  assert [train_lib.stage_model_config(every, i).attention.kind for i in range(2)] == [
    "dense",
    "ssa",
  ]
  for arg, match in [
    ("steps=5,convert=6", r"convert=6 must be an integer in \[0, steps=5\]"),
    ("kind=dense,convert=1", r"kind='dense', mix=0 cannot"),
    ("kind=indexer,convert=1", r"kind='indexer', mix=0 cannot"),
    ("mix=4,convert=1", r"kind='ssa', mix=4 cannot"),
    ("convert=1,short_top_k=2", r"short_top_k=2 has no effect with convert"),
    ("short=0,steps=5,convert=5", r"convert=5 with short=0 leaves no dense step"),
  ]:
    with pytest.raises(ValueError, match=match):
      module.get_config(arg)


def test_ablation_needles_change_the_4096_stages_only():
  from subq_jax.data import pipeline
  from subq_jax.data.tokenizer import ByteTokenizer

  module = _load([p for p in CONFIGS if p.endswith("ablation.py")][0])
  cfg = resolve(module.get_config("short_chars=4-8,short_steps=2-2,steps=5,convert=2,needles=8"))
  niah = [train_lib.stage_data_config(cfg, i).niah for i in range(4)]
  assert [(n.num_needles, n.num_queries, n.uuid_chars) for n in niah] == [
    (4, 4, 4),
    (4, 4, 8),
    (8, 8, 8),
    (8, 8, 8),
  ]
  assert (cfg.data.niah.num_needles, cfg.data.niah.num_queries) == (4, 4)  # what evaluation uses
  # A 4096-token training sample of the stage holds eight answers, one per needle.
  tokenizer = ByteTokenizer()
  stream = np.random.default_rng(0).integers(32, 127, 20_000).astype(np.int32)
  data = train_lib.stage_data_config(cfg, 3)
  rng = np.random.default_rng(3)
  sample = pipeline.make_sample(data, tokenizer, stream, 4096, rng, "niah", needle_at=True)
  assert len(sample["needle_at"]) == 8
  with pytest.raises(ValueError, match="needles=-1 must be an integer >= 0"):
    module.get_config("needles=-1")

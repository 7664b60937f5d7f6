"""The mechanism comparison: train each attention kind of configs/ablation.py over a small
learning-rate sweep (same model, data and tokens; every sparse kind at the same
attended-key budget), keep the rate with the highest held-out retrieval accuracy at the
training length (training-format NIAH and MQAR pooled, 1x only; ties to the lower held-out
loss), evaluate at 1x, 4x and 16x the training length, write one combined table.

One H100, 4K-token training (the lead decides when to spend device time):
  python -m experiments.compare_mechanisms --out_dir=runs/compare
CPU smoke run (minutes):
  python -m experiments.compare_mechanisms --out_dir=/tmp/compare --variant=smoke \
      --lrs=1e-3,3e-3 --multipliers=4,8,16 --num_samples=2 --retrieval_samples=2 \
      --set=data.corpus_root=subq_jax

A device command runs at most 10 minutes: run one mechanism (or one rate) per command
(`--mechanisms=ssa_mean --lrs=1e-3`; dense_rope,dense_yarn share one training, as do
ssa_bounds,ssa_yarn and indexer,indexer_yarn), keep each compare.json, then merge them
on any machine (per mechanism the best rate by the same rule; one run evaluated at other
lengths in another invocation, e.g. `--multipliers=16` reusing it, is joined; a run cut
by the time limit resumes from its last checkpoint when the command runs again):
  python -m experiments.compare_mechanisms --out_dir=experiments/results/compare \
      --assemble=a/compare.json,b/compare.json,...

Mechanisms: ssa_mean, ssa_bounds, dense_rope, dense_yarn, ssa_yarn and indexer_yarn
(the dense, ssa_bounds and indexer runs, YaRN at evaluation), sliding, block_topk,
indexer. Writes OUT_DIR/compare.{json,md}, compare_accuracy.png, compare_pairs.png, the runs under
OUT_DIR/runs/<mechanism>/lr<lr> (a finished run is reused) and each mechanism's suite
report under OUT_DIR/eval/<name>.
Logic: subq_jax/compare.py.
"""

from absl import app, flags, logging

from subq_jax import compare

_OUT = flags.DEFINE_string("out_dir", None, "runs, evaluations and the combined table")
_CONFIG = flags.DEFINE_string("config", "configs/ablation.py", "config file with the grid")
_VARIANT = flags.DEFINE_string("variant", "", "extra config variant, e.g. smoke or steps=1000")
_SET = flags.DEFINE_multi_string("set", [], "config override key.sub=value (repeatable)")
_MECHS = flags.DEFINE_list("mechanisms", list(compare.MECHANISMS), "mechanisms to compare")
_LRS = flags.DEFINE_list("lrs", ["5e-4", "1e-3", "2e-3"], "learning-rate sweep")
_VAL = flags.DEFINE_integer("val_batches", 4, "held-out LM-loss batches (break accuracy ties)")
_MULTS = flags.DEFINE_list("multipliers", ["1", "4", "16"], "evaluation lengths / training length")
_TASKS = flags.DEFINE_list("tasks", list(compare.DEFAULT_TASKS), "ruler tasks or suite names")
_DEPTHS = flags.DEFINE_list("depths", ["0", "0.5", "1"], "needle depths")
_N = flags.DEFINE_integer("num_samples", 50, "samples per (task, length, depth) cell")
_NR = flags.DEFINE_integer(
  "retrieval_samples", 32, "training-format NIAH/MQAR samples per length (1x picks the rate)"
)
_BATCH = flags.DEFINE_integer("batch_size", 8, "sequences decoded together")
_ASSEMBLE = flags.DEFINE_list(
  "assemble", [], "compare.json files of separate invocations: merge them into OUT_DIR, no runs"
)
flags.mark_flags_as_required(["out_dir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _ASSEMBLE.value:
    compare.assemble(_ASSEMBLE.value, _OUT.value)
    return
  compare.run(
    _OUT.value,
    config_path=_CONFIG.value,
    mechanisms=tuple(_MECHS.value),
    lrs=tuple(float(x) for x in _LRS.value),
    variant=_VARIANT.value,
    overrides=compare.parse_overrides(_SET.value),
    val_batches=_VAL.value,
    multipliers=tuple(int(m) for m in _MULTS.value),
    tasks=tuple(_TASKS.value),
    depths=tuple(float(d) for d in _DEPTHS.value),
    num_samples=_N.value,
    retrieval_samples=_NR.value,
    batch_size=_BATCH.value,
  )


if __name__ == "__main__":
  app.run(main)

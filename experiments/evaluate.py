"""Long-context evaluation of a trained checkpoint: NIAH, RULER-style, MRCR-style, MQAR.

python -m experiments.evaluate --workdir=runs/abl_ssa --suite=niah,ruler --lengths=1x,4x,16x
python -m experiments.evaluate --workdir=runs/quickstart --suite=niah_single_2 \
    --lengths=256,1K,4K --depths=0,0.5,1 --num_samples=20 --yarn
python -m experiments.evaluate --workdir=runs/np --suite= --train_tasks=niah --yarn
python -m experiments.evaluate --workdir=runs/np --suite= --train_tasks=niah --yarn --beam=64

The last form scores the run's own training-format tasks; for models whose layers select
blocks, its NIAH cells also say, per layer, how often the needle's block was attended.
`--beam` re-runs an `ssa` model with a wider (or narrower) routing descent: the blocks
attended per query (`top_k`) and so the pairs attended are unchanged.

Greedy decoding with a KV cache (MQAR: teacher-forced exact match), batched; writes
suite.json (every cell with its sample count, 95% Wilson interval, filler and the fraction
of token pairs attended), suite.md and PNGs (depth x length heatmaps of the NIAH tasks,
accuracy and pairs attended against length) to --out_dir (default WORKDIR/eval).
Logic: subq_jax/evaluate.py.
"""

from absl import app, flags, logging

from subq_jax import evaluate

_WORKDIR = flags.DEFINE_string(
  "workdir", None, "a training run's workdir (config.json, checkpoints)"
)
_SUITE = flags.DEFINE_list("suite", ["niah"], "suite names (ruler, niah, mrcr, mqar) or task names")
_LENGTHS = flags.DEFINE_string(
  "lengths", "1x,4x,16x", "multiples of the training length (Nx) or tokens (4096, 16K)"
)
_DEPTHS = flags.DEFINE_list("depths", ["0", "0.25", "0.5", "0.75", "1"], "needle depths in [0, 1]")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 50, "samples per (task, length, depth) cell")
_BATCH = flags.DEFINE_integer("batch_size", 8, "sequences decoded together")
_YARN = flags.DEFINE_bool(
  "yarn", None, "YaRN-scale RoPE beyond the training length (default: the run's eval.yarn)"
)
_BEAM = flags.DEFINE_integer(
  "beam", None, "routing beam of the ssa layers at evaluation (default: the run's); top_k unchanged"
)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_SEED = flags.DEFINE_integer("seed", 0, "sample seed")
_OUT = flags.DEFINE_string("out_dir", None, "output directory (default WORKDIR/eval)")
_TRAIN_TASKS = flags.DEFINE_list(
  "train_tasks", [], "the run's own training-format tasks (niah, mqar), teacher-forced"
)
_TRAIN_SAMPLES = flags.DEFINE_integer("train_samples", 32, "sequences per training-format cell")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  evaluate.evaluate_checkpoint(
    _WORKDIR.value,
    suites=tuple(_SUITE.value),
    lengths=_LENGTHS.value,
    depths=tuple(float(d) for d in _DEPTHS.value),
    num_samples=_NUM_SAMPLES.value,
    batch_size=_BATCH.value,
    yarn=_YARN.value,
    seed=_SEED.value,
    step=_STEP.value,
    out_dir=_OUT.value,
    train_tasks=tuple(_TRAIN_TASKS.value),
    train_samples=_TRAIN_SAMPLES.value,
    beam=_BEAM.value,
  )


if __name__ == "__main__":
  app.run(main)

"""Train, then evaluate retrieval at 1x/4x/16x the training length.

python -m experiments.train --config=configs/quickstart.py --workdir=runs/quickstart
python -m experiments.train --config=configs/quickstart.py:kind=dense --workdir=runs/qs_dense
python -m experiments.train --config=configs/ablation.py:kind=sliding --config.train.lr=1e-3 ...
"""

from absl import app, flags, logging
from ml_collections import config_flags

from subq_jax.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "configs/<name>.py[:variant]", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics, plots (resumed if present)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)

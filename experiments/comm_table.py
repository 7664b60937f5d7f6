"""Prints bytes communicated and held per device per layer, SSA vs ring attention.

  python -m experiments.comm_table [--out_dir=experiments/results/comm]

One layer with the Llama-3-8B head configuration (flags), DESIGN.md §6's budget of 8,192
keys per query for SSA, the sequence split over P `seq` shards (striped and zigzag), bf16.
Columns: one shard's K/V chunk; bytes sent per device forward and forward + backward;
activations held per device; the SSA routing tree held; forward attention FLOPs per
device (`subq_jax.flops`) and their ratio to the bytes sent (the ring hides its
transfers when this exceeds the device's FLOP/s over link bytes/s, about 1,800 on
H100/H200 NVLink); the share of remote blocks an all-to-all would still move. The
counting lives in `subq_jax.comm`.
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags

from subq_jax import comm, flops

_OUT_DIR = flags.DEFINE_string("out_dir", "experiments/results/comm", "Where to write outputs.")
_MIN_LOG2 = flags.DEFINE_integer("min_log2", 15, "Shortest sequence: 2**min_log2 tokens.")
_MAX_LOG2 = flags.DEFINE_integer("max_log2", 24, "Longest sequence: 2**max_log2 tokens.")
_SHARDS = flags.DEFINE_list("shards", ["1", "2", "8", "64"], "Sequence shard counts.")
_LAYOUTS = flags.DEFINE_list("layouts", ["striped", "zigzag"], "Sequence layouts to tabulate.")
_Q_HEADS = flags.DEFINE_integer("q_heads", 32, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "KV heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences per batch.")


def main(argv):
  del argv
  heads = flops.HeadConfig(_Q_HEADS.value, _KV_HEADS.value, _HEAD_DIM.value, _BATCH.value)
  configs = {"ssa": flops.benchmark_config("ssa"), "dense": flops.benchmark_config("dense")}
  seq_lens = [2**e for e in range(_MIN_LOG2.value, _MAX_LOG2.value + 1)]
  shards = [int(s) for s in _SHARDS.value]
  rows, lines = [], []
  for layout in _LAYOUTS.value:
    layout_rows = comm.comm_table(seq_lens, shards, heads, configs, layout=layout)
    rows += [dict(r, layout=layout) for r in layout_rows]
    lines += [
      f"{heads}, bf16, layout {layout}; bytes per device, one layer",
      comm.format_table(layout_rows),
      "",
    ]
  report = "\n".join(lines)
  print(report)
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  with open(os.path.join(_OUT_DIR.value, "comm.json"), "w") as f:
    json.dump(
      {
        "heads": dataclasses.asdict(heads),
        "configs": {kind: dataclasses.asdict(c) for kind, c in configs.items()},
        "conventions": comm.__doc__,
        "rows": rows,
      },
      f,
      indent=1,
    )
  with open(os.path.join(_OUT_DIR.value, "comm.txt"), "w") as f:
    f.write(report + "\n")
  print(f"\nwrote comm.txt and comm.json to {_OUT_DIR.value}")


if __name__ == "__main__":
  app.run(main)

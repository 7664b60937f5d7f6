"""Prints the cost table of every attention kind from 4K to 16M tokens and plots it.

  python -m experiments.cost_table [--out_dir=experiments/results/cost]

One layer with the Llama-3-8B head configuration (flags) and DESIGN.md §6's budget of
8,192 keys per query for every sparse kind. Writes `cost.txt` (what it prints),
`cost.json` (every number) and `cost.png` (log-log total forward FLOPs vs T; selector
and attention drawn separately for the kinds with a selector). The counting lives in
`subq_jax.flops`.
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags

from subq_jax import flops

_OUT_DIR = flags.DEFINE_string("out_dir", "experiments/results/cost", "Where to write outputs.")
_MIN_LOG2 = flags.DEFINE_integer("min_log2", 12, "Shortest sequence: 2**min_log2 tokens.")
_MAX_LOG2 = flags.DEFINE_integer("max_log2", 24, "Longest sequence: 2**max_log2 tokens.")
_Q_HEADS = flags.DEFINE_integer("q_heads", 32, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "KV heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences per batch.")

# SubQ's published attention-FLOP reductions at the 8,192-key budget (DESIGN.md §6).
SUBQ_REDUCTIONS = {2**15: 2.0, 2**17: 8.0, 2**19: 32.0, 2**20: 64.0}
SELECTOR_KINDS = ("block_topk", "indexer", "ssa")
COLORS = {
  "dense": "black",
  "sliding": "tab:gray",
  "block_topk": "tab:orange",
  "indexer": "tab:red",
  "ssa": "tab:blue",
}


def _tokens(t: int | None) -> str:
  return "never (up to 2^40 tokens)" if t is None else f"{t:,}"


def plot(rows: list[dict], crossovers: dict[str, int | None], path: str):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 6))
  for kind, color in COLORS.items():
    kind_rows = [r for r in rows if r["kind"] == kind]
    ts = [r["seq_len"] for r in kind_rows]
    # sliding attends as many pairs as ssa: drawn wide underneath so both stay visible.
    style = {"lw": 5, "alpha": 0.4} if kind == "sliding" else {"ms": 3, "marker": "o"}
    ax.plot(ts, [r["total_flops"] for r in kind_rows], color=color, label=kind, **style)
    if kind in SELECTOR_KINDS:
      ax.plot(
        ts, [r["attention_flops"] for r in kind_rows], ":", color=color, label=f"{kind} attention"
      )
      ax.plot(
        ts, [r["selector_flops"] for r in kind_rows], "--", color=color, label=f"{kind} selector"
      )
  ts = sorted({r["seq_len"] for r in rows})
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xticks(ts, [flops.format_tokens(t) for t in ts])
  ax.set_xlabel("sequence length T (tokens)")
  ax.set_ylabel("forward FLOPs, one layer")
  ax.set_title("Attention layer cost at 8,192 keys per query (Llama-3-8B heads)")
  bottom = ax.get_ylim()[0]
  for kind, t in crossovers.items():
    if t is not None:
      ax.axvline(t, color=COLORS[kind], lw=0.8, alpha=0.5)
      ax.annotate(
        f"{kind} selector > attention, T={t:,}",
        (t, bottom),
        xytext=(-10, 10),
        textcoords="offset points",
        rotation=90,
        fontsize=7,
        color=COLORS[kind],
      )
  ax.grid(True, which="major", alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  heads = flops.HeadConfig(_Q_HEADS.value, _KV_HEADS.value, _HEAD_DIM.value, _BATCH.value)
  configs = flops.benchmark_configs()
  seq_lens = [2**e for e in range(_MIN_LOG2.value, _MAX_LOG2.value + 1)]
  rows = flops.cost_table(seq_lens, heads, configs)
  lines = [
    f"{heads}, {flops.BENCHMARK_KEYS_PER_QUERY} keys per query; forward FLOPs, one layer",
    flops.format_table(rows),
    "",
    "Attention-FLOP reduction of ssa vs dense, against SubQ's published figures:",
  ]
  for t, published in SUBQ_REDUCTIONS.items():
    got = flops.cost(t, heads, configs["dense"]).attention_flops / (
      flops.cost(t, heads, configs["ssa"]).attention_flops
    )
    lines.append(
      f"  {flops.format_tokens(t):>5}: {got:6.1f}x "
      f"(SubQ {published:g}x, ratio {got / published:.2f})"
    )
  lines += ["", "Where the selector's FLOPs overtake the sparse attention's it feeds:"]
  crossovers, crossovers_train = {}, {}
  for kind in SELECTOR_KINDS:
    crossovers[kind] = flops.crossover_seq_len(heads, configs[kind])
    crossovers_train[kind] = flops.crossover_seq_len(heads, configs[kind], train=True)
    lines.append(
      f"  {kind:<10}: T = {_tokens(crossovers[kind])} (forward); "
      f"T = {_tokens(crossovers_train[kind])} (vs forward+backward attention)"
    )
  report = "\n".join(lines)
  print(report)

  os.makedirs(_OUT_DIR.value, exist_ok=True)
  with open(os.path.join(_OUT_DIR.value, "cost.json"), "w") as f:
    json.dump(
      {
        "heads": dataclasses.asdict(heads),
        "configs": {kind: dataclasses.asdict(c) for kind, c in configs.items()},
        "conventions": flops.__doc__,
        "crossover_seq_len": crossovers,
        "crossover_seq_len_train": crossovers_train,
        "rows": rows,
      },
      f,
      indent=1,
    )
  with open(os.path.join(_OUT_DIR.value, "cost.txt"), "w") as f:
    f.write(report + "\n")
  plot(rows, crossovers, os.path.join(_OUT_DIR.value, "cost.png"))
  print(f"\nwrote cost.txt, cost.json and cost.png to {_OUT_DIR.value}")


if __name__ == "__main__":
  app.run(main)

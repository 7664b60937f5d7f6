"""Scoring of generated answers: RULER's string match, MRCR's similarity, accuracy intervals.

Per-sample functions return a score in [0, 1]; `mean_score` and `wilson_interval` turn a
list of them into the number reported with its sample count and 95% interval;
`task_average` averages tasks (RULER's headline number) and `difference` compares two
such averages, each with a 95% interval.

- `string_match_all` (RULER niah, vt, cwe, fwe): the fraction of the references found in
  the prediction, case-insensitively.
- `string_match_part` (RULER qa): 1 if any reference is found.
- `mrcr` (OpenAI MRCR): 0 unless the prediction starts with the required random prefix;
  otherwise difflib's SequenceMatcher ratio of prediction and reference, prefix removed.
- `exact`: the prediction, stripped, equals a reference (teacher-forced or MQAR values).

RULER scores a batch as the mean over samples times 100, rounded to 2 decimals; here the
means stay in [0, 1] and rounding is left to the report.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence

import numpy as np

Z_95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def string_match_all(prediction: str, references: Sequence[str]) -> float:
  if not references:
    raise ValueError("string_match_all needs at least one reference")
  pred = prediction.lower()
  return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
  if not references:
    raise ValueError("string_match_part needs at least one reference")
  pred = prediction.lower()
  return float(max(r.lower() in pred for r in references))


def mrcr(prediction: str, reference: str, prefix: str) -> float:
  """OpenAI MRCR's grade: case-sensitive, and the prefix must open the prediction."""
  if not prediction.startswith(prefix):
    return 0.0
  response = prediction.removeprefix(prefix)
  answer = reference.removeprefix(prefix)
  return float(difflib.SequenceMatcher(None, response, answer).ratio())


def exact(prediction: str, references: Sequence[str]) -> float:
  return float(prediction.strip() in {r.strip() for r in references})


METRICS = ("all", "part", "mrcr", "exact")


def score(metric: str, prediction: str, references: Sequence[str], prefix: str = "") -> float:
  """Dispatch on a sample's `metric` name (see `ruler.TaskSample`)."""
  if metric == "all":
    return string_match_all(prediction, references)
  if metric == "part":
    return string_match_part(prediction, references)
  if metric == "mrcr":
    return mrcr(prediction, references[0], prefix)
  if metric == "exact":
    return exact(prediction, references)
  raise ValueError(f"metric={metric!r} is not one of {METRICS}")


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
  """Wilson score interval for a proportion of `successes` out of `n`.

  `successes` may be a sum of fractional scores (string_match_all, MRCR ratios); the
  interval then treats their mean as a proportion, which is conservative for scores
  that are not all 0 or 1 (their variance is at most p (1 - p)).
  """
  if n <= 0:
    raise ValueError(f"n={n} must be positive")
  if not 0 <= successes <= n:
    raise ValueError(f"successes={successes} must be in [0, n={n}]")
  p = successes / n
  z2 = z * z
  denom = 1 + z2 / n
  center = (p + z2 / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
  # At p = 0 or 1 the bound is exactly 0 or 1; the formula leaves rounding residue.
  lo = 0.0 if successes == 0 else max(0.0, center - half)
  hi = 1.0 if successes == n else min(1.0, center + half)
  return lo, hi


def mean_score(scores: Sequence[float]) -> dict:
  """{"mean", "n", "lo", "hi"}: the accuracy and its 95% Wilson interval."""
  scores = np.asarray(scores, np.float64)
  n = int(scores.size)
  if n == 0:
    return {"mean": float("nan"), "n": 0, "lo": float("nan"), "hi": float("nan")}
  lo, hi = wilson_interval(float(scores.sum()), n)
  return {"mean": float(scores.mean()), "n": n, "lo": lo, "hi": hi}


def _adjusted_variance(mean: float, n: int) -> float:
  """Variance of one task's mean, from the Agresti-Coull proportion (x + 2) / (n + 4):
  a task at 0/n or n/n still contributes its uncertainty."""
  p = (mean * n + 2) / (n + 4)
  return p * (1 - p) / (n + 4)


def task_average(rows: Sequence[dict], z: float = Z_95) -> dict:
  """The unweighted mean of per-task accuracies (RULER's average), with a 95% interval.

  rows: one {"mean", "n"} per task (samples of different tasks independent). The interval
  is normal over the tasks' summed variances (`_adjusted_variance`), clipped to [0, 1].
  Returns {"mean", "lo", "hi", "se", "n" (samples in all), "tasks"}.
  """
  if not rows:
    raise ValueError("task_average needs at least one task")
  bad = [r for r in rows if r["n"] < 1 or not 0 <= r["mean"] <= 1]
  if bad:
    raise ValueError(f"task_average: rows need n >= 1 and mean in [0, 1], got {bad}")
  k = len(rows)
  mean = sum(r["mean"] for r in rows) / k
  se = math.sqrt(sum(_adjusted_variance(r["mean"], r["n"]) for r in rows)) / k
  return {
    "mean": mean,
    "lo": max(0.0, mean - z * se),
    "hi": min(1.0, mean + z * se),
    "se": se,
    "n": int(sum(r["n"] for r in rows)),
    "tasks": k,
  }


def difference(a: dict, b: dict, z: float = Z_95) -> dict:
  """a - b of two `task_average` results, with a 95% interval treating them as
  independent (conservative when they are positively correlated, as two models scored
  on the same samples usually are)."""
  se = math.hypot(a["se"], b["se"])
  d = a["mean"] - b["mean"]
  return {"mean": d, "lo": d - z * se, "hi": d + z * se, "se": se}


def bucket_by_distance(distances, scores, edges) -> list[dict]:
  """MQAR accuracy per key-query distance bucket [edges[i], edges[i+1]).

  Returns one `mean_score` dict per bucket, with its "lo_distance" and "hi_distance".
  """
  distances = np.asarray(distances)
  scores = np.asarray(scores, np.float64)
  if distances.shape != scores.shape:
    raise ValueError(f"{distances.shape=} and {scores.shape=} differ")
  out = []
  for lo, hi in zip(edges[:-1], edges[1:], strict=True):
    sel = (distances >= lo) & (distances < hi)
    out.append({"lo_distance": int(lo), "hi_distance": int(hi), **mean_score(scores[sel])})
  return out

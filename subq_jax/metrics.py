"""Metric sinks: JSONL lines and TensorBoard event files (tensorboard imported lazily)."""

from __future__ import annotations

import json
import os
import time


class MetricWriter:
  """Appends {"step": ..., **scalars} to `workdir/metrics.jsonl` and TensorBoard events."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if tensorboard:
      try:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
      except ImportError:
        print("tensorboard is not installed: metrics go to metrics.jsonl only")
      else:
        self._tb = EventFileWriter(os.path.join(workdir, "tensorboard"))

  def truncate_after(self, step: int):
    """Drops lines past `step` (written after the checkpoint a resumed run starts from)."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    with open(self.path, "w") as f:
      f.writelines(lines)

  def write(self, step: int, scalars: dict):
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **scalars}) + "\n")
    if self._tb is not None:
      from tensorboard.compat.proto import event_pb2, summary_pb2

      values = [
        summary_pb2.Summary.Value(tag=k, simple_value=float(v))
        for k, v in scalars.items()
        if isinstance(v, int | float)
      ]
      self._tb.add_event(
        event_pb2.Event(
          wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
        )
      )

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(ln) for ln in f if ln.strip()]

"""Metric output: `metrics.jsonl` lines and TensorBoard event files, from process 0 only."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import jax


def truncate_jsonl(path: str, step: int) -> None:
  """Keeps the lines of `path` up to `step` (and drops a torn last line), atomically: what a
  run resumed from checkpoint `step` must start from, so each step appears once, in order."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue  # A line torn by a kill.
      if isinstance(row, dict) and row.get("step", step + 1) <= step:
        kept.append(line.rstrip("\n") + "\n")
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and to TensorBoard events in `workdir/tb`.

  `resume_step`: the step the run restarts from (0 for a fresh start). Lines after it are
  dropped from metrics.jsonl, and TensorBoard is told to purge its events after it, so both
  read as one uninterrupted run however often it was restarted.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # Writes event files without TensorFlow.

    path = os.path.join(workdir, "metrics.jsonl")
    truncate_jsonl(path, resume_step)
    self._jsonl = open(path, "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      if math.isfinite(value):
        self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()

"""Learning curves of runs, from their `metrics.jsonl`, to a PNG (`distill-jax plot`).

One panel per metric, one line per run (labelled by its workdir), x = training step. A
born-again chain's workdir draws its last generation (`gen*/` with the highest number).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence


def metrics_file(workdir: str) -> str:
  """`workdir/metrics.jsonl`, or the last generation's for a born-again chain."""
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    return path
  generations = sorted(glob.glob(os.path.join(workdir, "gen*", "metrics.jsonl")),
                       key=lambda p: int(os.path.basename(os.path.dirname(p))[3:] or 0))
  if generations:
    return generations[-1]
  raise FileNotFoundError(f"No metrics.jsonl in {workdir!r}: is it a run's workdir?")


def read_curve(workdir: str, metric: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `metric` in the run's metrics.jsonl, in step order (the last value
  written for a step wins, e.g. after a resume)."""
  points: dict[int, float] = {}
  with open(metrics_file(workdir)) as f:
    for line in f:
      row = json.loads(line)
      if metric in row:
        points[int(row["step"])] = float(row[metric])
  steps = sorted(points)
  return steps, [points[s] for s in steps]


def plot_runs(workdirs: Sequence[str], metrics: Sequence[str], out: str):
  """Draws `metrics` (one panel each) of every run in `workdirs` and saves the figure to `out`.

  Returns the matplotlib Figure. A metric that no run has fails naming the run's metrics.
  """
  import matplotlib

  matplotlib.use("Agg")  # Files only; no display needed.
  import matplotlib.pyplot as plt

  labels = _labels(workdirs)
  fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
  for ax, metric in zip(axes[0], metrics, strict=True):
    drawn = 0
    for i, (workdir, label) in enumerate(zip(workdirs, labels, strict=True)):
      steps, values = read_curve(workdir, metric)
      if steps:  # A run keeps its colour in every panel, even where another run has no line.
        ax.plot(steps, values, color=f"C{i % 10}", marker="." if len(steps) < 30 else None,
                label=label)
        drawn += 1
    if not drawn:
      plt.close(fig)
      raise ValueError(f"No run has metric {metric!r}; {workdirs[0]!r} has "
                       f"{', '.join(available_metrics(workdirs[0]))}.")
    ax.set(title=metric, xlabel="step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)
  return fig


def available_metrics(workdir: str) -> list[str]:
  keys: set[str] = set()
  with open(metrics_file(workdir)) as f:
    for line in f:
      keys.update(json.loads(line))
  return sorted(keys - {"step"})


def _labels(workdirs: Sequence[str]) -> list[str]:
  """The shortest distinct path tails of the workdirs (`kd_seed0`, not the whole path)."""
  parts = [os.path.abspath(w).rstrip(os.sep).split(os.sep) for w in workdirs]
  for n in range(1, max(len(p) for p in parts) + 1):
    labels = [os.sep.join(p[-n:]) for p in parts]
    if len(set(labels)) == len(labels):
      return labels
  return [os.path.abspath(w) for w in workdirs]

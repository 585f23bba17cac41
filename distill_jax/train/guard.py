"""The non-finite guard: what a run does when a step's loss or update is NaN or infinite.

The compiled step only flags such a step (`step.nonfinite_mask`; with 'skip' it also drops the
step's update); `NonFiniteGuard` reads the flags on the host, at the steps where the loop waits
anyway, and stops the run or counts the skipped steps.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from absl import logging

from distill_jax.train import step as step_lib


class NonFiniteLossError(FloatingPointError):
  """A step's loss or update became NaN or infinite; the message names the step and terms."""


def host_scalars(metrics: Any) -> dict[str, float]:
  """A step's metrics {name: scalar device array} as Python floats."""
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


@dataclasses.dataclass
class NonFiniteGuard:
  """Reads the steps' `nonfinite` flags (see `step.nonfinite_mask`) and acts on them.

  The flags of the steps since the last check are fetched together, at the next log, eval or
  checkpoint step (so the host does not wait on every step), and always before a checkpoint
  is written: with 'stop' the run ends naming the first bad step, and nothing after the step
  before it is ever saved; with 'skip' the step dropped its update (in the compiled step) and
  is counted, and `max_consecutive` bad steps in a row stop the run.
  """

  action: str
  max_consecutive: int
  skipped: int = 0
  consecutive: int = 0
  pending: list = dataclasses.field(default_factory=list)

  def add(self, step: int, metrics: Any) -> None:
    self.pending.append((step, metrics))

  def check(self, last_saved: int | None) -> None:
    flags = jax.device_get([m["nonfinite"] for _, m in self.pending])
    pending, self.pending = self.pending, []
    for (step, metrics), flag in zip(pending, flags, strict=True):
      if not flag:
        self.consecutive = 0
        continue
      what = self.describe(step, int(flag), host_scalars(metrics))
      if self.action == "skip":
        self.skipped += 1
        self.consecutive += 1
        logging.warning("%s; the update was skipped (%d in a row, %d in all).", what,
                        self.consecutive, self.skipped)
        if self.consecutive < self.max_consecutive:
          continue
        what += f" ({self.consecutive} skipped steps in a row)"
      kept = ("no checkpoint was written" if last_saved is None else
              f"the last checkpoint (step {last_saved}) is finite and kept")
      raise NonFiniteLossError(
          f"{what}. Training stopped; {kept}. Lower the learning rate, check the loss "
          "terms' settings, or set --config.train.on_nonfinite=skip.")

  @staticmethod
  def describe(step: int, flag: int, scalars: dict[str, float]) -> str:
    terms = [f"{k}={scalars[k]}" for k in sorted(scalars)
             if k.startswith("loss") and not math.isfinite(scalars[k])]
    parts = [p for p in step_lib.nonfinite_parts(flag) if p != "loss"]
    said = []
    if terms:
      said.append("loss " + ", ".join(terms))
    if parts:
      said.append("new " + ", ".join(parts))
    return f"Non-finite values at step {step}: " + "; ".join(said)

"""The calibrated decision: is the student closer to a candidate than students that never saw it?

For one candidate c and one score, every model m (the student and the M controls, students
trained on the same data without c) gets a score s_m = mean over probe inputs of the per-input
score against c, oriented so that larger means closer. Under the null hypothesis "the student
was not distilled from c" the student is one more control, so its score is a new draw from the
controls' distribution. The test is the prediction-interval t-test for that draw:

    t = (s_student - mean(s_controls)) / (sd(s_controls) * sqrt(1 + 1/M)),   df = M - 1,
    p = P(T_{M-1} >= t)   (one-sided: only *closer* than the controls is evidence),

exact when control scores are normal, and with an effect size (Glass's delta) =
(s_student - mean) / sd. `sd` is floored by the student's bootstrap standard error over probe
inputs (seeded), so that controls that happen to agree exactly do not give an infinite t. The
rank p-value (1 + #controls at least as close) / (M + 1) is reported beside it: it assumes
nothing about the distribution but can never go below 1 / (M + 1).

Several scores (e.g. one score on several probes) decide as one pre-registered statistic:
each model's mean of its scores, each oriented so that higher = closer, with equal weights fixed
in advance (`combine`). A fixed linear combination of jointly normal scores is normal, so the
same t-test stays exact however the scores are correlated; standardising each score by the
controls' sd first would let the weights fit the controls' noise and make it anti-conservative
(in simulation, up to 2-3x the nominal false-accusation rate with 4 controls, 1.5x with 11).

The multiple-choice answer tests every candidate on one pre-specified (probe, score) pair, adjusts
the K p-values with Holm's method (so the chance of accusing any innocent candidate stays <=
alpha), and answers the candidate with the largest effect among those whose adjusted p < alpha,
or "none" when no candidate is significant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import special

NONE = "none"


@dataclasses.dataclass(frozen=True)
class Comparison:
  """The student's score against one candidate, compared with the controls' scores."""

  student: float  # As computed (e.g. a KL stays a KL), like `controls`.
  controls: tuple[float, ...]
  higher_is_closer: bool
  effect: float  # Glass's delta, oriented: > 0 means closer than the controls.
  t: float
  p_value: float  # The one-sided prediction-interval t-test (see the module docstring).
  p_rank: float  # (1 + #controls at least as close) / (M + 1).
  student_se: float  # Bootstrap standard error of the student's mean over probe inputs.


def bootstrap_se(per_input: np.ndarray, num_samples: int, seed: int | Sequence[int]) -> float:
  """Standard error of the nan-mean of `per_input` [N] over `num_samples` seeded resamples of
  the inputs (0.0 with fewer than 2 defined values)."""
  values = np.asarray(per_input, np.float64)
  values = values[~np.isnan(values)]
  if len(values) < 2 or num_samples < 2:
    return 0.0
  rng = np.random.default_rng(seed)  # An int or a tuple of ints.
  idx = rng.integers(0, len(values), size=(num_samples, len(values)))
  return float(values[idx].mean(axis=1).std(ddof=1))


def compare(student: float, controls: Sequence[float], higher_is_closer: bool,
            student_se: float = 0.0) -> Comparison:
  """Tests whether `student` is closer to the candidate than `controls` (M >= 2 scores)."""
  controls = np.asarray(controls, np.float64)
  m = len(controls)
  if m < 2:
    raise ValueError(f"The decision needs at least 2 control students, got {m}.")
  sign = 1.0 if higher_is_closer else -1.0
  oriented, s = sign * controls, sign * float(student)
  if not np.isfinite(s) or not np.all(np.isfinite(oriented)):
    nan = float("nan")
    return Comparison(float(student), tuple(controls), higher_is_closer, nan, nan, nan, nan,
                      student_se)
  sd = max(float(oriented.std(ddof=1)), float(student_se), 1e-12)
  effect = (s - oriented.mean()) / sd
  t = effect / np.sqrt(1.0 + 1.0 / m)
  p = float(special.stdtr(m - 1, -t))  # P(T_{m-1} >= t).
  p_rank = (1.0 + np.sum(oriented >= s)) / (m + 1.0)
  return Comparison(float(student), tuple(float(c) for c in controls), higher_is_closer,
                    float(effect), float(t), p, float(p_rank), float(student_se))


def combine(student: Sequence[float], controls: np.ndarray, higher_is_closer: Sequence[bool],
            student_bootstrap: np.ndarray | None = None) -> Comparison:
  """`compare` on the equal-weight mean of J oriented scores: `student` [J], `controls` [M, J],
  `higher_is_closer` [J]; `student_bootstrap` [B, J] the student's scores on resampled
  inputs (for its standard error). The comparison's values are the oriented means (higher =
  closer); a NaN among a model's scores makes its statistic NaN."""
  sign = np.where(np.asarray(higher_is_closer, bool), 1.0, -1.0)
  student = float(np.mean(sign * np.asarray(student, np.float64)))
  controls = (sign * np.asarray(controls, np.float64)).mean(axis=1)
  se = 0.0
  if student_bootstrap is not None:
    boot = (sign * np.asarray(student_bootstrap, np.float64)).mean(axis=1)
    boot = boot[~np.isnan(boot)]
    se = float(boot.std(ddof=1)) if len(boot) > 1 else 0.0
  return compare(student, controls, True, se)


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
  """Holm-Bonferroni adjusted p-values (family-wise error control over the names); NaN stays
  NaN and counts as a test."""
  names = sorted(p_values, key=lambda n: (np.nan_to_num(p_values[n], nan=2.0), n))
  k, running, out = len(names), 0.0, {}
  for i, name in enumerate(names):
    p = p_values[name]
    if np.isnan(p):
      out[name] = float("nan")
      continue
    running = max(running, min(1.0, (k - i) * p))
    out[name] = running
  return out


@dataclasses.dataclass(frozen=True)
class Decision:
  answer: str  # A candidate's name, or NONE.
  alpha: float
  adjusted: dict[str, float]  # Holm-adjusted p-value per candidate.
  # 1 - the answer's adjusted p; for NONE, None (then `closest` says how near a candidate came).
  confidence: float | None
  closest: tuple[str, float] | None  # (candidate, adjusted p) of the smallest adjusted p.


def decide(comparisons: Mapping[str, Comparison], alpha: float = 0.05) -> Decision:
  """The multiple-choice answer over the candidates' comparisons on the primary score."""
  adjusted = holm({name: c.p_value for name, c in comparisons.items()})
  defined = {n: p for n, p in adjusted.items() if not np.isnan(p)}
  closest = min(defined.items(), key=lambda item: (item[1], item[0])) if defined else None
  significant = [n for n, p in defined.items() if p < alpha]
  if not significant:
    return Decision(NONE, alpha, adjusted, None, closest)
  answer = max(significant, key=lambda n: (comparisons[n].effect, n))
  return Decision(answer, alpha, adjusted, 1.0 - adjusted[answer], closest)

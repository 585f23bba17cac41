"""The calibrated decision: which candidate, if any, taught the student, with bounded errors.

The building block first. For one candidate c and one score, every model m (the student and
the M controls, students trained on the same data without c) gets a score s_m = mean over
probe inputs of the per-input score against c, oriented so that larger means closer. Under the
null hypothesis "the student was not distilled from c" the student is one more control, so its
score is a new draw from the controls' distribution. The test is the prediction-interval
t-test for that draw:

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

The answer (`attribute`) is over *sources*: the K candidates and any decoys (teachers that are
no candidate, queried like them). Every reference model (a control) carries its teacher: None
(trained alone), a decoy (a decoy control) or a candidate (a shadow student of it). Each model
m has a closeness x_m[s] to every source s (higher = closer). Three tests, each at level alpha:

1. Per source (accusation): for candidate A, the student's contrast x[A] - mean of x over the
   other candidates against the references that no candidate taught (trained alone or
   distilled from a decoy; shadows of candidates are left out, else a twin's shadows would
   hide its sibling's students); Holm over the K candidates. The null is "distilled or not,
   but from no candidate". Bounds: accusing any candidate of a student exchangeable with
   those references, at most alpha per audit (family-wise).
2. Pairwise, for candidate A and every other source B: "closer to A than to B", the statistic
   x[A] - x[B], tested under the null "the teacher is B" against B's shadow students (when there
   are >= 2: the prediction t-test around their mean, the sd pooled over every group of
   references with one teacher, `pooled_test`), else against the references distilled from
   neither A nor B (a proxy that is conservative when distilling from B brings a student at
   least as close to B, relative to A, as distilling from a decoy of B's kind does). Bounds:
   at most alpha per (A, B).
3. Naming A (intersection-union test): A is named alone only when it is accused and beats
   every other source in (2); its p-value is the max of those p-values. "A is not the teacher"
   is the union of "the teacher is B" over every other source B and "the teacher is none of
   them" (then (1) applies), each rejected at level alpha, so the chance of naming A when A is
   not the teacher is at most alpha, for each A (for any of the K - 1 wrong candidates at once
   at most (K - 1) alpha, by Bonferroni; run with alpha / (K - 1) for alpha overall).

When a candidate is accused but none passes (3), the answer is the set ("A or B") of sources
no accused candidate beats (it holds the true teacher unless some accused candidate beats it:
at most (sources - 1) alpha), never one of them; "none" when no candidate is accused.
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


def accuse(comparisons: Mapping[str, Comparison], alpha: float = 0.05
           ) -> tuple[dict[str, float], list[str]]:
  """(Holm-adjusted p per candidate, the accused: adjusted p < alpha), from each candidate's
  per-source comparison. Bounds the chance of accusing any candidate of a student exchangeable
  with the references (family-wise over the candidates)."""
  adjusted = holm({name: c.p_value for name, c in comparisons.items()})
  return adjusted, [n for n, p in adjusted.items() if not np.isnan(p) and p < alpha]


@dataclasses.dataclass(frozen=True)
class Decision:
  """The answer and the tests behind it (see the module docstring for what each bounds)."""

  answer: str  # One candidate's name, the set as 'A or B', or NONE.
  answer_set: tuple[str, ...]  # () for NONE, (A,) when A is named, else the set's members.
  named: str | None  # The candidate named alone (accused and the IUT passed), else None.
  alpha: float
  adjusted: dict[str, float]  # Holm-adjusted per-source p-value per candidate.
  accused: tuple[str, ...]  # The candidates with adjusted p < alpha.
  comparisons: dict[str, Comparison]  # The per-source test of each candidate.
  # pairwise[A][B]: p-value of "closer to A than to B" under "the teacher is B".
  pairwise: dict[str, dict[str, float]]
  pairwise_null: dict[str, str]  # Per source B: 'shadows' (B's own) or 'references' (proxy).
  iut_p: dict[str, float]  # Per candidate: max(adjusted p, pairwise p against every source).
  closest: tuple[str, float] | None  # (candidate, adjusted p) of the smallest adjusted p.


def attribute(student: Mapping[str, float], references: Mapping[str, Mapping[str, float]], *,
              candidates: Sequence[str], teachers: Mapping[str, str | None] | None = None,
              alpha: float = 0.05, student_boot: Mapping[str, np.ndarray] | None = None,
              contrast: bool = True) -> Decision:
  """The attribution over sources: candidates and decoys (sources that are no candidate).

  Args:
    student: source -> the student's closeness to it (higher = closer: a mean score, oriented).
    references: reference model -> (source -> its closeness); every source of `student`.
    candidates: the sources that may be named (the others are decoys).
    teachers: reference -> the source it was distilled from (a decoy: a decoy control; a
      candidate: a shadow student of it), or None (trained alone; the default for all).
    student_boot: source -> [B] the student's closeness on resampled probe inputs (its
      standard error floors the references' sd in every test).
    contrast: the per-source statistic is the closeness to the candidate minus the mean
      closeness to the other candidates (with >= 2 candidates), as before.
  Returns:
    The `Decision`: NONE when no candidate is accused; A when A is accused and beats every
    other source (the IUT); else the set of sources that no accused candidate beats (at least
    2 members; see `_answer_set`).
  """
  sources = list(student)
  candidates = list(candidates)
  teachers = {r: (teachers or {}).get(r) for r in references}
  missing = [c for c in candidates if c not in sources]
  if missing:
    raise ValueError(f"Candidates {missing} have no closeness among the sources {sources}.")
  unknown = sorted({t for t in teachers.values() if t is not None} - set(sources))
  if unknown:
    raise ValueError(f"References distilled from {unknown}, which are no source ({sources}).")
  names = list(references)
  x = np.array([student[s] for s in sources], np.float64)
  refs = np.array([[references[r][s] for s in sources] for r in names], np.float64)
  boot = (None if student_boot is None else
          np.stack([np.asarray(student_boot[s], np.float64) for s in sources], 1))
  index = {s: i for i, s in enumerate(sources)}
  cand_idx = [index[c] for c in candidates]
  use_contrast = contrast and len(candidates) >= 2

  def per_source(values: np.ndarray, c: str) -> np.ndarray:
    own = values[..., index[c]]
    if not use_contrast:
      return own
    others = [i for i in cand_idx if i != index[c]]
    return own - values[..., others].mean(-1)

  def test(stat, rows: list[int]) -> Comparison:
    se = _se(stat(boot)) if boot is not None else 0.0
    if len(rows) < 2:
      nan = float("nan")
      return Comparison(float(stat(x)), tuple(stat(refs[rows])), True, nan, nan, nan, nan, se)
    return compare(float(stat(x)), stat(refs[rows]), True, se)

  # The accusation's null: the references no candidate taught (alone, or from a decoy).
  untaught = [i for i, r in enumerate(names) if teachers[r] not in candidates]
  comparisons = {c: test(lambda v, c=c: per_source(v, c), untaught) for c in candidates}
  adjusted, accused = accuse(comparisons, alpha)
  pairwise: dict[str, dict[str, float]] = {}
  pairwise_null = {}
  groups = [[i for i, r in enumerate(names) if teachers[r] == g]
            for g in dict.fromkeys(teachers.values())]
  for b in sources:
    shadows = [i for i, r in enumerate(names) if teachers[r] == b]
    pairwise_null[b] = "shadows" if len(shadows) >= 2 else "references"
    for a in candidates:
      if a == b:
        continue

      def diff(v, a=a, b=b):
        return v[..., index[a]] - v[..., index[b]]

      if len(shadows) >= 2:
        se = _se(diff(boot)) if boot is not None else 0.0
        p = pooled_test(float(diff(x)), diff(refs[shadows]),
                        [diff(refs[g]) for g in groups], se)
      else:
        p = test(diff, [i for i, r in enumerate(names) if teachers[r] not in (a, b)]).p_value
      pairwise.setdefault(a, {})[b] = p
  # An undefined test (NaN: too few references) cannot reject: it counts as p = 1.
  iut_p = {a: float(np.nan_to_num(np.max([adjusted[a], *pairwise.get(a, {}).values()]),
                                  nan=1.0)) for a in candidates}
  named = [a for a in accused if iut_p[a] < alpha]
  defined = {n: p for n, p in adjusted.items() if not np.isnan(p)}
  closest = min(defined.items(), key=lambda item: (item[1], item[0])) if defined else None
  if len(named) == 1:
    answer_set = (named[0],)
  elif not accused:
    answer_set = ()
  else:
    answer_set = _answer_set(named or accused, sources, pairwise, alpha, x, index)
  answer = NONE if not answer_set else " or ".join(answer_set)
  return Decision(answer, answer_set, answer_set[0] if len(answer_set) == 1 else None, alpha,
                  adjusted, tuple(accused), comparisons, pairwise, pairwise_null, iut_p,
                  closest)


def pooled_test(student: float, group: np.ndarray, groups: Sequence[np.ndarray],
                student_se: float = 0.0) -> float:
  """One-sided p-value that `student` is a new draw of `group` [n] (n >= 2) or above it: the
  prediction t-test with the sd pooled over `groups` (every group of references with one
  teacher, `group` among them; groups of one add nothing), df = sum(n_g - 1):

      t = (student - mean(group)) / (sd_pooled * sqrt(1 + 1/n)),  p = P(T_df >= t).

  Pooling assumes the groups share one spread; it buys degrees of freedom where each teacher
  has few shadow students. The sd is floored by `student_se`, as in `compare`."""
  group = np.asarray(group, np.float64)
  squares = sum(float(((g - g.mean()) ** 2).sum()) for g in map(np.asarray, groups)
                if len(g) >= 2)
  df = sum(len(g) - 1 for g in groups if len(g) >= 2)
  if len(group) < 2 or df < 1 or not np.isfinite(student) or not np.all(np.isfinite(group)):
    return float("nan")
  sd = max(np.sqrt(squares / df), float(student_se), 1e-12)
  t = (student - group.mean()) / (sd * np.sqrt(1.0 + 1.0 / len(group)))
  return float(special.stdtr(df, -t))


def _answer_set(accused: Sequence[str], sources: Sequence[str],
                pairwise: Mapping[str, Mapping[str, float]], alpha: float, x: np.ndarray,
                index: Mapping[str, int]) -> tuple[str, ...]:
  """The sources that no accused candidate beats (pairwise p < alpha), or, when that leaves
  fewer than 2, the accused and every source that some accused candidate fails to beat:
  never one candidate without its IUT. Ordered by the student's closeness, closest first."""

  def beats(a: str, b: str) -> bool:
    p = pairwise.get(a, {}).get(b, float("nan"))
    return bool(p < alpha)

  members = [b for b in sources if not any(beats(a, b) for a in accused if a != b)]
  if len(members) < 2:
    members = [b for b in sources
               if b in accused or any(not beats(a, b) for a in accused if a != b)]
  return tuple(sorted(members, key=lambda s: (-x[index[s]], s)))


def _se(samples: np.ndarray) -> float:
  samples = np.asarray(samples, np.float64)
  samples = samples[~np.isnan(samples)]
  return float(samples.std(ddof=1)) if len(samples) > 1 else 0.0

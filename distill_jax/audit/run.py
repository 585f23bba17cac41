"""One audit: probes -> every model's outputs -> scores per candidate -> calibrated decision."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from distill_jax.audit import decision, scores
from distill_jax.audit.probes import PROBES, ProbeContext
from distill_jax.audit.subjects import AuditError, Exported, QueryOnly

DEFAULT_PROBES = ("disagreement", "synthetic")
DEFAULT_SCORE = "spearman"

LogitsFn = Callable[[np.ndarray], np.ndarray]


def run_audit(student: Exported, candidates: Mapping[str, LogitsFn],
              controls: Mapping[str, LogitsFn], *, input_shape: tuple[int, int, int],
              num_classes: int, probes: Sequence[str] = DEFAULT_PROBES,
              primary: str | None = None, num_inputs: int = 256, seed: int = 0,
              data_config: Any = None, temperatures: Sequence[float] =
              scores.DEFAULT_TEMPERATURES, alpha: float = 0.05, bootstrap: int = 1000,
              probe_settings: Mapping[str, Mapping[str, Any]] | None = None,
              contrast: bool = True) -> dict[str, Any]:
  """Audits `student` against `candidates`, calibrated by `controls`.

  Args:
    student: the student, with weights (the synthetic probe optimises through it).
    candidates: name -> logits function (query access is all the audit uses).
    controls: name -> logits function of students trained on the same data without any of
      the candidates (at least 2; more give a sharper test).
    probes: names in `PROBES`; every candidate is scored on each.
    primary: `PROBE:SCORE` that decides (default: the first probe and `spearman`, the most
      reliable on the digits benchmark); fixed before looking, so the decision is one test
      per candidate. All others are reported too, unadjusted. Several pairs,
      `P1:S1,P2:S2,...`, decide by one pre-registered statistic: each model's mean over the
      pairs of its (contrast) score, oriented so that higher = closer, with equal fixed
      weights (so the pairs should share a unit: one score on several probes). Fixed weights
      keep the test exact (`decision.combine`); weights fitted to the controls would not.
    num_inputs, seed: inputs per probe; the seed of every random choice (probes, bootstrap).
    data_config: the data set (for the `real` probe).
    alpha: the family-wise false-accusation rate of the decision.
    bootstrap: resamples of the probe inputs for the student's standard error.
    contrast: decide on each model's score to a candidate minus its mean score to the other
      candidates (with >= 2 candidates), not on the raw score. A student that differs from the
      controls in a way that moves it towards every candidate alike (e.g. softer outputs after
      any distillation, or another recipe) then accuses nobody; only closeness to one
      candidate *more than to the others* counts.
  Returns:
    A JSON-able dict (see `report.write_report`), with per-input scores under `_per_input`.
  """
  t0 = time.time()
  probes = list(probes)
  for name in probes:
    PROBES.get(name)  # Unknown names fail before any work, listing the known ones.
  score_list = scores.score_names(temperatures)
  directions = {s.name: s.higher_is_closer for s in score_list}
  pairs = _parse_primary(primary, probes, directions)
  if len(controls) < 2:
    raise AuditError(f"--controls: the calibrated decision needs at least 2 control students "
                     f"(trained on the same data without the candidates), got {len(controls)}.")
  if not candidates:
    raise AuditError("--candidates: give at least one candidate teacher.")
  overlap = set(candidates) & set(controls) | {student.name} & (set(candidates) | set(controls))
  if overlap:
    raise AuditError(f"Names used twice among the student, candidates and controls: "
                     f"{sorted(overlap)}; every model needs its own name.")
  # Every candidate is called through a counter of our own: nothing but its outputs is used.
  candidates = {name: QueryOnly(name, fn) for name, fn in candidates.items()}
  context = ProbeContext(student, candidates, tuple(input_shape), num_classes, num_inputs, seed,
                         data_config, dict(probe_settings or {}))
  per_input: dict[str, dict] = {}
  probe_info = {}
  for probe_name in probes:
    probe = context.probe(probe_name)
    probe_info[probe_name] = {"num_inputs": int(len(probe.images)),
                              "labels": probe.labels is not None, **_jsonable(probe.info)}
    student_logits = student(probe.images)
    candidate_logits = {c: fn(probe.images) for c, fn in candidates.items()}
    control_logits = {c: fn(probe.images) for c, fn in controls.items()}
    for c in candidates:
      reference = probe.labels
      if reference is None:
        reference = scores.majority_vote([x for o, x in candidate_logits.items() if o != c])
      per_input.setdefault(c, {})[probe_name] = {
          m: scores.per_input_scores(x, candidate_logits[c], reference, temperatures)
          for m, x in [(student.name, student_logits), *control_logits.items()]}
  return summarise(per_input, score_list, student=student, controls=list(controls),
                   probe_info=probe_info, primary=pairs,
                   queries={c: fn.queries for c, fn in candidates.items()}, seed=seed,
                   alpha=alpha, bootstrap=bootstrap, contrast=contrast, t0=t0)


def summarise(per_input: Mapping[str, Mapping[str, Mapping[str, Mapping[str, np.ndarray]]]],
              score_list: Sequence[scores.Score], *, student: Any, controls: list[str],
              probe_info: Mapping[str, Any], primary: Sequence[tuple[str, str]],
              queries: Mapping[str, int], seed: int, alpha: float, bootstrap: int,
              contrast: bool, t0: float) -> dict[str, Any]:
  """The calibrated decision and the report's dict from the per-input scores
  `per_input[candidate][probe][model][score]` ([N] each; model: the student's name and every
  control's). Shared by image and language-model audits: only how the scores are made differs.
  `primary`: the (probe, score) pairs that decide (one, or several averaged).
  """
  candidates = list(per_input)
  directions = {s.name: s.higher_is_closer for s in score_list}
  pairs = [tuple(pair) for pair in primary]
  results: dict[str, dict] = {c: {} for c in candidates}
  comparisons: dict[str, dict] = {}
  for p_index, probe_name in enumerate(probe_info):
    for c_index, c in enumerate(candidates):
      model_scores = per_input[c][probe_name]
      table = {}
      for s_index, s in enumerate(score_list):
        values = {m: _nanmean(v[s.name]) for m, v in model_scores.items()}
        se = decision.bootstrap_se(model_scores[student.name][s.name], bootstrap,
                                   seed=(seed, p_index, c_index, s_index))
        comparison = decision.compare(values[student.name],
                                      [values[m] for m in controls], s.higher_is_closer, se)
        comparisons.setdefault(c, {}).setdefault(probe_name, {})[s.name] = comparison
        table[s.name] = {**dataclasses.asdict(comparison),
                         "controls": dict(zip(controls, comparison.controls, strict=True))}
      results[c][probe_name] = table
  use_contrast = bool(contrast and len(candidates) >= 2)
  if use_contrast or len(pairs) > 1:
    primary_comparisons = _primary_comparisons(per_input, pairs, directions, student.name,
                                               controls, bootstrap, seed, use_contrast)
  else:
    (primary_probe, primary_score), = pairs
    primary_comparisons = {c: comparisons[c][primary_probe][primary_score] for c in candidates}
  verdict = decision.decide(primary_comparisons, alpha)
  return {
      "student": student.name,
      "student_export": getattr(student, "directory", None),
      "candidates": candidates,
      "controls": controls,
      "num_controls": len(controls),
      "probes": dict(probe_info),
      "primary": {"probe": "+".join(dict.fromkeys(p for p, _ in pairs)),
                  "score": "+".join(dict.fromkeys(s for _, s in pairs)),
                  "pairs": [list(pair) for pair in pairs],
                  # Several pairs: the mean of the oriented scores, so higher = closer.
                  "higher_is_closer": directions[pairs[0][1]] if len(pairs) == 1 else True,
                  "contrast": use_contrast,
                  "comparisons": {c: {**dataclasses.asdict(x), "controls": dict(zip(
                      controls, x.controls, strict=True))}
                                  for c, x in primary_comparisons.items()}},
      "answer": verdict.answer,
      "confidence": verdict.confidence,
      "closest": list(verdict.closest) if verdict.closest else None,
      "alpha": alpha,
      "adjusted_p": verdict.adjusted,
      "scores": results,
      "score_descriptions": {s.name: s.description for s in score_list},
      "queries": dict(queries),
      "seed": seed,
      "bootstrap": bootstrap,
      "seconds": round(time.time() - t0, 1),
      "_per_input": per_input,
  }


def _primary_comparisons(
    per_input: Mapping[str, Mapping[str, Mapping[str, Mapping[str, np.ndarray]]]],
    pairs: Sequence[tuple[str, str]], directions: Mapping[str, bool], student: str,
    controls: list[str], bootstrap: int, seed: int, contrast: bool
) -> dict[str, decision.Comparison]:
  """Per candidate c, the comparison of the student with the controls on the decision
  statistic: for one (probe, score) pair, the model's mean score to c minus the mean over the
  other candidates of its mean score to them (`contrast`; else the mean score to c); for
  several pairs, the mean over the pairs of that quantity, each oriented so that higher =
  closer (`decision.combine`). Means, not per-input differences: `mistakes` is defined on
  different inputs for each candidate. The student's standard error resamples every probe's
  inputs (seeded, each probe on its own) and recomputes the whole statistic."""
  candidates = list(per_input)
  probes = list(dict.fromkeys(p for p, _ in pairs))

  def value(model: str, c: str, probe: str, score: str, rows: np.ndarray | slice) -> float:
    own = _nanmean(per_input[c][probe][model][score][rows])
    if not contrast:
      return own
    others = [_nanmean(per_input[o][probe][model][score][rows]) for o in candidates if o != c]
    return own - float(np.nanmean(others)) if np.any(~np.isnan(others)) else float("nan")

  def statistic(model: str, c: str, rows: Mapping[str, np.ndarray | slice]) -> np.ndarray:
    return np.array([value(model, c, p, s, rows[p]) for p, s in pairs])

  sizes = {p: len(per_input[candidates[0]][p][student][pairs[0][1]]) for p in probes}
  rng = np.random.default_rng((seed, 9973))
  samples = [{p: rng.integers(0, sizes[p], sizes[p]) for p in probes}
             for _ in range(min(bootstrap, 200))]
  everything = {p: slice(None) for p in probes}
  higher = [directions[s] for _, s in pairs]
  out = {}
  for c in candidates:
    student_value = statistic(student, c, everything)
    control_values = np.stack([statistic(m, c, everything) for m in controls])
    boot = np.stack([statistic(student, c, rows) for rows in samples])
    if len(pairs) == 1:
      boot = boot[:, 0][~np.isnan(boot[:, 0])]
      se = float(boot.std(ddof=1)) if len(boot) > 1 else 0.0
      out[c] = decision.compare(student_value[0], control_values[:, 0], higher[0], se)
    else:
      out[c] = decision.combine(student_value, control_values, higher, boot)
  return out


def _parse_primary(primary: str | None, probes: list[str], directions: Mapping[str, bool],
                   default_score: str = DEFAULT_SCORE) -> list[tuple[str, str]]:
  """`PROBE:SCORE[,PROBE:SCORE...]` (None: the first probe and `default_score`) -> the pairs."""
  if primary is None:
    return [(probes[0], default_score)]
  pairs = []
  for item in primary.split(","):
    probe, _, score = item.strip().partition(":")
    if probe not in probes or score not in directions:
      raise AuditError(f"--primary={primary!r}: expected PROBE:SCORE[,PROBE:SCORE...] with "
                       f"PROBE one of the audit's probes ({', '.join(probes)}) and SCORE one "
                       f"of {', '.join(directions)}.")
    pairs.append((probe, score))
  if len(set(pairs)) < len(pairs):
    raise AuditError(f"--primary={primary!r}: a PROBE:SCORE pair is listed twice.")
  return pairs


def _nanmean(values: np.ndarray) -> float:
  values = np.asarray(values, np.float64)
  return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")


def _jsonable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value

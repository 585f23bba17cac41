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
              contrast: bool = True, decoys: Mapping[str, LogitsFn] | None = None,
              teachers: Mapping[str, str | None] | None = None,
              precision: float | None = None) -> dict[str, Any]:
  """Audits `student` against `candidates`, calibrated by `controls`.

  Args:
    student: the student, with weights (the synthetic probe optimises through it; its
      penultimate features feed the feature scores).
    candidates: name -> logits function (query access is all the audit uses).
    controls: name -> logits function of the reference students: trained on the same data
      without any candidate (at least 2 of them), distilled from a decoy, or shadows
      distilled from a candidate (`teachers` says which). A control that also has a
      `features(images) -> [N, D]` method (the CLI's, loaded from exports) gets the feature
      scores; where the student or a control has none, those scores are NaN.
    probes: names in `PROBES`; every candidate is scored on each.
    primary: `PROBE:SCORE` that decides (default: the first probe and `spearman`, the most
      reliable on the digits benchmark); fixed before looking. All others are reported too,
      unadjusted. Several pairs, `P1:S1,P2:S2,...`, decide by each model's mean over the
      pairs of its score, oriented so that higher = closer, with equal fixed weights (so the
      pairs should share a unit: one score on several probes).
    num_inputs, seed: inputs per probe; the seed of every random choice (probes, bootstrap).
    data_config: the data set (for the `real` and `mixup` probes).
    alpha: the level of each of the decision's tests (`decision.attribute`).
    bootstrap: resamples of the probe inputs for the student's standard error.
    contrast: accuse on each model's closeness to a candidate minus its mean closeness to
      the other candidates (with >= 2 candidates), not on the raw closeness: a student moved
      towards every candidate alike accuses nobody.
    decoys: name -> logits function of teachers that are no candidate (queried and scored
      like the candidates): a candidate is named alone only when the student is closer to it
      than to each of them too, and `teachers` may name them as a control's teacher.
    teachers: control name -> the decoy or candidate it was distilled from (absent or None:
      trained alone).
    precision: the benchmark's measured precision of accusations at this setting (reported).
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
  decoys = dict(decoys or {})
  teachers = {k: v for k, v in (teachers or {}).items() if v is not None}
  _check_models(student.name, candidates, controls, decoys, teachers)
  # Every source is called through a counter of our own: nothing but its outputs is used.
  candidates = {name: QueryOnly(name, fn) for name, fn in candidates.items()}
  sources = {**candidates, **{name: QueryOnly(name, fn) for name, fn in decoys.items()}}
  context = ProbeContext(student, candidates, tuple(input_shape), num_classes, num_inputs, seed,
                         data_config, dict(probe_settings or {}))
  per_input: dict[str, dict] = {}
  probe_info = {}
  for probe_name in probes:
    probe = context.probe(probe_name)
    probe_info[probe_name] = {"num_inputs": int(len(probe.images)),
                              "labels": probe.labels is not None, **_jsonable(probe.info)}
    models = {student.name: student, **controls}
    logits = {m: fn(probe.images) for m, fn in models.items()}
    features = {m: _features(fn, probe.images) for m, fn in models.items()}
    source_logits = {c: fn(probe.images) for c, fn in sources.items()}
    for c in sources:
      reference = probe.labels
      if reference is None:
        reference = scores.majority_vote([x for o, x in source_logits.items()
                                          if o != c and o in candidates])
      per_input.setdefault(c, {})[probe_name] = {
          m: {**scores.per_input_scores(logits[m], source_logits[c], reference, temperatures),
              **scores.feature_scores(features[m], source_logits[c], seed)}
          for m in models}
    _add_residuals(per_input, probe_name, student.name, logits, source_logits,
                   list(candidates), teachers)
  return summarise(per_input, score_list, student=student, controls=list(controls),
                   probe_info=probe_info, primary=pairs,
                   queries={c: fn.queries for c, fn in sources.items()}, seed=seed,
                   alpha=alpha, bootstrap=bootstrap, contrast=contrast, t0=t0,
                   candidates=list(candidates), teachers=teachers, precision=precision)


def _check_models(student: str, candidates: Mapping[str, Any], controls: Mapping[str, Any],
                  decoys: Mapping[str, Any], teachers: Mapping[str, str]) -> None:
  """One-line AuditErrors for a bad set of models (naming the flag and what would fit)."""
  untaught = [c for c in controls if teachers.get(c) not in candidates]
  if len(untaught) < 2:
    raise AuditError(f"--controls: the calibrated decision needs at least 2 control students "
                     f"that no candidate taught (trained on the same data alone or from a "
                     f"decoy), got {len(untaught)}.")
  if not candidates:
    raise AuditError("--candidates: give at least one candidate teacher.")
  names = [student, *candidates, *controls, *decoys]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise AuditError(f"Names used twice among the student, candidates, decoys and controls: "
                     f"{twice}; every model needs its own name.")
  for control, teacher in teachers.items():
    if control not in controls or teacher not in {*candidates, *decoys}:
      raise AuditError(f"--shadows: {control}={teacher!r} must pair a control with one of the "
                       f"candidates or decoys ({', '.join([*candidates, *decoys])}).")


def _features(model: Any, images: np.ndarray) -> np.ndarray | None:
  """The model's penultimate features [N, D] when it exposes `features`, else None."""
  fn = getattr(model, "features", None)
  features = None if fn is None else fn(images)
  return None if features is None else np.asarray(features, np.float64)


def _add_residuals(per_input: dict, probe: str, student: str, logits: Mapping[str, np.ndarray],
                   source_logits: Mapping[str, np.ndarray], candidates: list[str],
                   teachers: Mapping[str, str]) -> None:
  """Adds the `residual` score of every model to every source on `probe`: the model's
  deviation from the mean of the controls no candidate taught (a control's: from the others'
  mean), regressed on the source's deviation from the candidates' mean
  (`scores.residual_slopes`)."""
  untaught = [m for m in logits if m != student and teachers.get(m) not in candidates]
  for m, x in logits.items():
    others = [logits[o] for o in untaught if o != m]
    for c, y in source_logits.items():
      per_input[c][probe][m]["residual"] = scores.residual_slopes(
          x, others, y, [source_logits[o] for o in candidates])


def summarise(per_input: Mapping[str, Mapping[str, Mapping[str, Mapping[str, np.ndarray]]]],
              score_list: Sequence[scores.Score], *, student: Any, controls: list[str],
              probe_info: Mapping[str, Any], primary: Sequence[tuple[str, str]],
              queries: Mapping[str, int], seed: int, alpha: float, bootstrap: int,
              contrast: bool, t0: float, candidates: Sequence[str] | None = None,
              teachers: Mapping[str, str | None] | None = None,
              precision: float | None = None) -> dict[str, Any]:
  """The decision and the report's dict from the per-input scores
  `per_input[source][probe][model][score]` ([N] each; source: a candidate or a decoy; model:
  the student's name and every reference's, `controls`). Shared by image and language-model
  audits: only how the scores are made differs.

  `primary`: the (probe, score) pairs that decide (one, or several averaged): each model's
  closeness to a source is the mean over the pairs of its mean score, oriented so that higher
  = closer; `decision.attribute` decides on it (`teachers`: reference -> the source it was
  distilled from, None or absent: trained alone; `candidates`: default every source).
  `precision`: the benchmark's measured precision of accusations at this setting, reported
  beside the answer when given (never computed from this audit's p-values).
  """
  sources = list(per_input)
  candidates = list(sources if candidates is None else candidates)
  teachers = {r: (teachers or {}).get(r) for r in controls}
  untaught = [r for r in controls if teachers[r] not in candidates]
  directions = {s.name: s.higher_is_closer for s in score_list}
  pairs = [tuple(pair) for pair in primary]
  results: dict[str, dict] = {c: {} for c in sources}
  for p_index, probe_name in enumerate(probe_info):
    for c_index, c in enumerate(sources):
      model_scores = per_input[c][probe_name]
      table = {}
      for s_index, s in enumerate(score_list):
        values = {m: _nanmean(v[s.name]) for m, v in model_scores.items()}
        se = decision.bootstrap_se(model_scores[student.name][s.name], bootstrap,
                                   seed=(seed, p_index, c_index, s_index))
        comparison = decision.compare(values[student.name], [values[m] for m in untaught],
                                      s.higher_is_closer, se)
        table[s.name] = {**dataclasses.asdict(comparison),
                         "controls": dict(zip(untaught, comparison.controls, strict=True)),
                         "references": {m: values[m] for m in controls}}
      results[c][probe_name] = table
  closeness, student_boot = _closeness(per_input, pairs, directions, student.name, controls,
                                       bootstrap, seed)
  verdict = decision.attribute(closeness[student.name], {m: closeness[m] for m in controls},
                               candidates=candidates, teachers=teachers, alpha=alpha,
                               student_boot=student_boot, contrast=contrast)
  use_contrast = bool(contrast and len(candidates) >= 2)
  return {
      "student": student.name,
      "student_export": getattr(student, "directory", None),
      "candidates": candidates,
      "decoys": [s for s in sources if s not in candidates],
      "controls": controls,
      "reference_teachers": teachers,
      "num_controls": len(controls),
      "num_untaught": len(untaught),
      "probes": dict(probe_info),
      "primary": {"probe": "+".join(dict.fromkeys(p for p, _ in pairs)),
                  "score": "+".join(dict.fromkeys(s for _, s in pairs)),
                  "pairs": [list(pair) for pair in pairs],
                  # Closeness is oriented (a KL enters negated): higher = closer.
                  "higher_is_closer": True,
                  "contrast": use_contrast,
                  "closeness": closeness,
                  "comparisons": {c: {**dataclasses.asdict(x), "controls": dict(zip(
                      untaught, x.controls, strict=True))}
                                  for c, x in verdict.comparisons.items()}},
      "answer": verdict.answer,
      "answer_set": list(verdict.answer_set),
      "named": verdict.named,
      "accused": list(verdict.accused),
      "precision": precision,
      "closest": list(verdict.closest) if verdict.closest else None,
      "alpha": alpha,
      "adjusted_p": verdict.adjusted,
      "pairwise_p": verdict.pairwise,
      "pairwise_null": verdict.pairwise_null,
      "iut_p": verdict.iut_p,
      "scores": results,
      "score_descriptions": {s.name: s.description for s in score_list},
      "baseline": paper_baseline(per_input, candidates, student.name, list(probe_info)),
      "queries": dict(queries),
      "seed": seed,
      "bootstrap": bootstrap,
      "seconds": round(time.time() - t0, 1),
      "_per_input": per_input,
  }


BASELINE_EPS = 1e-6


def paper_baseline(per_input: Mapping[str, Mapping[str, Mapping[str, Mapping[str, np.ndarray]]]],
                   candidates: Sequence[str], student: str, probes: Sequence[str],
                   eps: float = BASELINE_EPS) -> dict[str, Any] | None:
  """The method of Shi et al. (NeurIPS 2025) on this audit's inputs: per candidate, the mean
  over the probe inputs of 1 / (KL(candidate || student) + eps) at T = 1, and the argmax: a
  forced choice with no controls and no "none". On the `synthetic` probe (their inputs are
  synthesised), else the audit's first probe; None without a `kl_t1` score."""
  probe = "synthetic" if "synthetic" in probes else probes[0]
  if not candidates or "kl_t1" not in per_input[candidates[0]][probe][student]:
    return None
  values = {c: float(np.nanmean(1.0 / (np.asarray(per_input[c][probe][student]["kl_t1"],
                                                  np.float64) + eps)))
            for c in candidates}
  return {"method": "argmax of mean 1/(KL + eps), no controls (Shi et al., NeurIPS 2025)",
          "probe": probe, "eps": eps, "scores": values,
          "answer": max(values, key=lambda c: (values[c], c))}


def _closeness(per_input: Mapping[str, Mapping[str, Mapping[str, Mapping[str, np.ndarray]]]],
               pairs: Sequence[tuple[str, str]], directions: Mapping[str, bool], student: str,
               models: list[str], bootstrap: int, seed: int
               ) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
  """({model: {source: closeness}}, {source: [B] the student's closeness on resampled
  inputs}): a model's closeness to a source is the mean over `pairs` of its mean score to it
  on the pair's probe, oriented so that higher = closer. Means, not per-input differences:
  `mistakes` is defined on different inputs for each source. The bootstrap resamples every
  probe's inputs (seeded, each probe on its own; at most 200 resamples)."""
  sources = list(per_input)
  probes = list(dict.fromkeys(p for p, _ in pairs))
  sign = {(p, s): 1.0 if directions[s] else -1.0 for p, s in pairs}

  def value(model: str, source: str, rows: Mapping[str, np.ndarray | slice]) -> float:
    return float(np.mean([sign[p, s] * _nanmean(per_input[source][p][model][s][rows[p]])
                          for p, s in pairs]))

  everything = {p: slice(None) for p in probes}
  closeness = {m: {c: value(m, c, everything) for c in sources} for m in [student, *models]}
  sizes = {p: len(per_input[sources[0]][p][student][pairs[0][1]]) for p in probes}
  rng = np.random.default_rng((seed, 9973))
  samples = [{p: rng.integers(0, sizes[p], sizes[p]) for p in probes}
             for _ in range(min(bootstrap, 200))]
  boot = {c: np.array([value(student, c, rows) for rows in samples]) for c in sources}
  return closeness, boot


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

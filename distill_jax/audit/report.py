"""An audit's report: `audit.json` (everything), `audit.md` (the answer and the evidence) and
`audit.png` (every score of the student and of the controls, per candidate and probe)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from distill_jax.audit.decision import NONE


def _fmt(x: Any, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "n/a"
  if isinstance(x, float):
    return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
  return str(x)


def _decision_name(result: dict[str, Any], with_probe: bool = False) -> str:
  """The decision statistic's name: `score` (`probe:score`), or for several pairs `mean of
  (p1:s1, p2:s2)`."""
  primary = result["primary"]
  pairs = primary.get("pairs", [[primary["probe"], primary["score"]]])
  if len(pairs) > 1:
    return "mean of (" + ", ".join(f"{p}:{s}" for p, s in pairs) + ")"
  return f"{primary['probe']}:{primary['score']}" if with_probe else primary["score"]


def summary(result: dict[str, Any]) -> str:
  """One paragraph: the answer, which tests it passed, on what evidence."""
  primary = result["primary"]
  decoys = result.get("decoys") or []
  basis = (f"{_decision_name(result)} on "
           + " and ".join(f"{result['probes'][p]['num_inputs']} {p}"
                          for p in primary["probe"].split("+"))
           + " probe inputs, against "
           f"{result.get('num_untaught', result['num_controls'])} control students no "
           f"candidate taught; Holm over {len(result['candidates'])} candidates, alpha "
           f"{result['alpha']}"
           + (f"; decoys {', '.join(decoys)}" if decoys else ""))
  if result["answer"] == NONE:
    closest = result["closest"]
    near = (f" The closest was {closest[0]!r} (adjusted p = {_fmt(closest[1])})."
            if closest else "")
    return (f"Answer: none of the candidates. No candidate is closer to the student than the "
            f"controls are at the chosen level ({basis}).{near}")
  precision = ("" if result.get("precision") is None else
               f" Measured precision of accusations at this setting: "
               f"{_fmt(result['precision'])}.")
  if result.get("named") is None:
    accused = ", ".join(f"{c!r} (adjusted p = {_fmt(result['adjusted_p'][c])})"
                        for c in result["accused"])
    return (f"Answer: {result['answer']!r} (a set: the accused candidate(s) cannot be told "
            f"apart from the others listed; pairwise p-values in the report). Accused: "
            f"{accused}; in the set: {', '.join(result['answer_set'])} ({basis}).{precision}")
  c = result["named"]
  s = primary["comparisons"][c]
  what = (f"{_decision_name(result)} to it minus its mean to the other candidates"
          if primary["contrast"] else f"{_decision_name(result)} to it")
  return (f"Answer: {c!r}: accused (adjusted p = {_fmt(result['adjusted_p'][c])}) and closer "
          f"to the student than every other source (intersection-union p = "
          f"{_fmt(result['iut_p'][c])}). The student's {what} is {_fmt(s['student'])} against "
          f"{_fmt(float(np.mean(list(s['controls'].values()))))} for the controls (effect "
          f"size {_fmt(s['effect'], 2)} control SDs, p = {_fmt(s['p_value'])}, rank p = "
          f"{_fmt(s['p_rank'])}; {basis}).{precision}")


def markdown(result: dict[str, Any]) -> str:
  primary = result["primary"]
  decoys = result.get("decoys") or []
  teachers = {r: t for r, t in (result.get("reference_teachers") or {}).items() if t}
  on_contrast = ("; accusation on the contrast to the other candidates"
                 if primary["contrast"] else "")
  lines = [f"# Distillation audit of `{result['student']}`", "", summary(result), "",
           f"- Candidates: {', '.join(f'`{c}`' for c in result['candidates'])} (queried for "
           "outputs only: "
           + ", ".join(f"{c} {q} inputs" for c, q in result["queries"].items())
           + ")",
           f"- Decoys (teachers that are no candidate): "
           f"{', '.join(f'`{c}`' for c in decoys) or 'none'}",
           f"- Controls ({result['num_controls']}): "
           + ", ".join(f"`{c}`" + (f" (from `{teachers[c]}`)" if c in teachers else "")
                       for c in result["controls"]),
           "- Probes: " + "; ".join(f"{p} ({i['num_inputs']} inputs"
                                   f"{', labelled' if i['labels'] else ''})"
                                   for p, i in result["probes"].items()),
           f"- Decision: {_decision_name(result, with_probe=True)}, oriented so that higher = "
           f"closer{on_contrast}: (1) per candidate, one-sided prediction t-test against the "
           "controls no candidate taught, Holm over candidates; (2) per pair, 'closer to A "
           "than to B' against B's shadow students, else the controls taught by neither; "
           "(3) a candidate is named alone only when (1) and every (2) reject "
           "(intersection-union test). Alpha "
           f"{result['alpha']}; seed {result['seed']}, {result['bootstrap']} bootstrap "
           "resamples for the student's standard error. See docs/audit.md for what each test "
           "bounds.", "",
           "## Decision per candidate", "",
           "| candidate | student | controls (mean ± sd) | effect (SDs) | p | rank p | "
           "adjusted p | intersection-union p |", "|---|---|---|---|---|---|---|---|"]
  for c in result["candidates"]:
    s = primary["comparisons"][c]
    ctrl = np.asarray(list(s["controls"].values()))
    lines.append(f"| `{c}` | {_fmt(s['student'])} | {_fmt(float(ctrl.mean()))} ± "
                 f"{_fmt(float(ctrl.std(ddof=1)))} | {_fmt(s['effect'], 2)} | "
                 f"{_fmt(s['p_value'])} | {_fmt(s['p_rank'])} | "
                 f"{_fmt(result['adjusted_p'][c])} | {_fmt(result['iut_p'][c])} |")
  sources = [*result["candidates"], *decoys]
  lines += ["", "Pairwise p-values, 'closer to the row than to the column' (null: the column "
            "is the teacher; its reference: " + ", ".join(
                f"{b} {result['pairwise_null'][b]}" for b in sources) + "):", "",
            "| | " + " | ".join(f"`{b}`" for b in sources) + " |",
            "|---|" + "---|" * len(sources)]
  for a in result["candidates"]:
    row = result["pairwise_p"].get(a, {})
    lines.append(f"| `{a}` | " + " | ".join(_fmt(row.get(b)) if b != a else "-"
                                            for b in sources) + " |")
  baseline = result.get("baseline")
  if baseline:
    lines += ["", f"Baseline: {baseline['method']} on the {baseline['probe']} probe: "
              f"`{baseline['answer']}` ("
              + ", ".join(f"{c} {_fmt(v)}" for c, v in baseline["scores"].items())
              + "); it always names a candidate."]
  lines += ["", "## Every score (exploratory: not adjusted for multiple comparisons)", "",
            "Each cell: the student's score / the controls' mean, and the one-sided p-value.",
            ""]
  for probe in result["probes"]:
    names = list(result["score_descriptions"])
    lines += [f"### Probe `{probe}`", "", "| candidate | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for c in result["scores"]:
      cells = []
      for name in names:
        s = result["scores"][c][probe][name]
        ctrl = float(np.mean(list(s["controls"].values())))
        cells.append(f"{_fmt(s['student'])} / {_fmt(ctrl)} (p {_fmt(s['p_value'], 2)})")
      lines.append(f"| `{c}` | " + " | ".join(cells) + " |")
    lines.append("")
  lines += ["Scores: " + "; ".join(f"`{k}` {v}" for k, v in
                                   result["score_descriptions"].items()) + ".", "",
            "Limits: the p-values assume the controls' scores are roughly normal and that the "
            "controls were trained like the student (same data, architecture and recipe) "
            "without the candidates; with few controls the tests have little power, and the "
            "rank p-value can never go below 1 / (controls + 1). No 'confidence' is given: "
            "a p-value is not the chance that the answer is right; the benchmark's measured "
            "precision is, where it is given.", ""]
  return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
  """Per probe (rows) and score (columns): for each candidate, the controls' scores (grey) and
  the student's (red), so one sees how far the student stands from the controls."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  probes, names = list(result["probes"]), list(result["score_descriptions"])
  candidates = list(result["scores"])  # The candidates, then any decoys.
  fig, axes = plt.subplots(len(probes), len(names), squeeze=False, layout="constrained",
                           figsize=(2.6 * len(names), 2.4 * len(probes) + 0.6))
  for i, probe in enumerate(probes):
    for j, name in enumerate(names):
      ax = axes[i][j]
      xs, ys, student = [], [], []
      for k, c in enumerate(candidates):
        s = result["scores"][c][probe][name]
        ctrl = list(s["controls"].values())
        xs += list(k + (np.linspace(-0.15, 0.15, len(ctrl)) if len(ctrl) > 1 else [0.0]))
        ys += ctrl
        student.append(s["student"])
      ax.scatter(xs, ys, s=14, color="0.55", label="controls")
      ax.scatter(range(len(candidates)), student, s=60, marker="*", color="tab:red",
                 label="student")
      ax.set_xticks(range(len(candidates)), candidates, rotation=45, fontsize=7, ha="right")
      ax.tick_params(axis="y", labelsize=7)
      closer = "↑" if result["scores"][candidates[0]][probe][name]["higher_is_closer"] else "↓"
      ax.set_title(f"{probe}: {name} ({closer} closer)", fontsize=8)
  axes[0][0].legend(fontsize=7)
  fig.suptitle(f"audit of {result['student']}: answer {result['answer']}", fontsize=10)
  fig.savefig(path, dpi=90)
  plt.close(fig)


def write_report(result: dict[str, Any], out_dir: str) -> dict[str, str]:
  """Writes audit.json, audit.md and audit.png in `out_dir`; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {k: os.path.join(out_dir, f"audit.{k}") for k in ("json", "md", "png")}
  public = {k: v for k, v in result.items() if not k.startswith("_")}
  with open(paths["json"], "w") as f:
    json.dump(public, f, indent=2, sort_keys=True, default=_json_default)
  with open(paths["md"], "w") as f:
    f.write(markdown(result))
  plot(result, paths["png"])
  return paths


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"Not JSON-serialisable: {type(value).__name__}")

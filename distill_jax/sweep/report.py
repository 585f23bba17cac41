"""`distill-jax report ROOT`: a sweep's results as one table, against a paper's numbers.

Every trial of `ROOT/trials.json` (its labels say where it belongs, e.g. method=kd,
pair=resnet56-resnet20, seed=0) is put in the cell (row labels, column labels) chosen by
`--rows` and `--cols`; the trials of one cell may differ only in the `--over` labels (seeds by
default). A cell shows mean ± std (sample std, ddof=1) of the metric over its finished trials
and their number n; with `--expected=FILE` the paper's number and the gap (ours - paper); with
`--baseline=ROW` the difference from that row in the same column and that difference in units
of its standard error (sqrt(s1²/n1 + s2²/n2)), so a reader sees at once whether a method's gain
is larger than the seeds' noise. Cells with failed, unfinished or no trials are listed.
Rows are only comparable when they train the same student from the same teacher: each finished
trial's `config.json` names them, and a WARNING line (printed and in report.md) names the rows
of a column whose student models (name and kwargs) or teachers (model, kwargs, checkpoint)
differ, e.g. KD on an MLP beside CRD on a CNN.

Writes ROOT/report.md (and prints it), ROOT/report.csv with `--csv`, and with `--png`
ROOT/report.png (bars with error bars, paper numbers as markers) and ROOT/curves.png (each
cell's mean eval curve from the trials' metrics.jsonl).

Expected-results file: JSON (a list of objects) or CSV, one record per cell: the label columns
that identify it (e.g. `method`, `pair`) and `expected` (the paper's number, in the table's
units), optionally `source`; empty fields are ignored, and records that name a label the
table does not use are skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from distill_jax.sweep import state

Key = tuple[str, ...]


def stats(values: Sequence[float]) -> tuple[float, float, int]:
  """(mean, sample std (0 for one value), n)."""
  n = len(values)
  if n == 0:
    return math.nan, math.nan, 0
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
  return mean, std, n


def metric_of(result: dict[str, Any], metric: str) -> float:
  """`final.eval/top1` -> result['final']['eval/top1']: the first '.' splits the section."""
  section, _, key = metric.partition(".")
  value = result[section][key] if key else result[section]
  return float(value)


def read_expected(path: str) -> list[dict[str, str]]:
  if path.endswith(".json"):
    with open(path) as f:
      records = json.load(f)
  else:
    with open(path, newline="") as f:
      records = list(csv.DictReader(f))
  for r in records:
    if "expected" not in r:
      raise ValueError(f"{path}: every record needs an 'expected' value; got {sorted(r)}.")
  return [{k: str(v) for k, v in r.items()} for r in records]


def collect(root: str, rows: Sequence[str], cols: Sequence[str], over: Sequence[str],
            metric: str, scale: float, stage: str | None = None,
            where: dict[str, str] | None = None) -> dict[str, Any]:
  """Groups the sweep's trials into cells -> {'cells': {(row, col): cell}, 'row_keys',
  'col_keys', 'skipped'}; a cell has the values of its done trials and its other trials'
  names by state."""
  info = state.read_trials(root)
  stage = stage or info["stages"][-1]
  trials = [t for t in info["trials"] if t["stage"] == stage]
  trials = [t for t in trials if all(t["labels"].get(k) == v for k, v in (where or {}).items())]
  cells, skipped, lacking = {}, [], []
  for t in trials:
    labels = t["labels"]
    if any(k not in labels for k in (*rows, *cols)):
      skipped.append(t["name"])
      continue
    key = (tuple(labels[k] for k in rows), tuple(labels[k] for k in cols))
    cell = cells.setdefault(key, {"values": [], "trials": [], "other": {}, "labels": None})
    rest = {k: v for k, v in labels.items() if k not in (*rows, *cols, *over)}
    if cell["labels"] is not None and cell["labels"] != rest:
      diff = sorted(k for k in set(rest) | set(cell["labels"])
                    if rest.get(k) != cell["labels"].get(k))
      raise ValueError(f"Cell {key} mixes trials that differ in {diff} (trial {t['name']!r}); "
                       f"add those labels to --rows/--cols/--over or filter with --where.")
    cell["labels"] = rest
    s = state.trial_state(root, t["name"])
    if s == "done":
      with open(os.path.join(root, t["name"], "result.json")) as f:
        result = json.load(f)
      try:
        cell["values"].append(scale * metric_of(result, metric))
      except (KeyError, TypeError):  # E.g. agreement with a teacher, for a run without one.
        lacking.append(t["name"])
        continue
      cell["trials"].append(t["name"])
      models = trial_models(root, t["name"])
      if models is not None:
        cell.setdefault("students", set()).add(models[0])
        cell.setdefault("teachers", set()).add(models[1])
    else:
      cell["other"].setdefault(s, []).append(t["name"])
  row_keys = list(dict.fromkeys(k[0] for k in cells))
  col_keys = list(dict.fromkeys(k[1] for k in cells))
  return {"cells": cells, "row_keys": row_keys, "col_keys": col_keys, "skipped": skipped,
          "lacking": lacking, "stage": stage}


def _model_text(name: str, kwargs: dict[str, Any]) -> str:
  """'mlp' and {'hidden': [32]} -> 'mlp(hidden=(32,))' (JSON lists shown as tuples)."""
  def value(v: Any) -> Any:
    return tuple(value(x) for x in v) if isinstance(v, list) else v
  return f"{name}({', '.join(f'{k}={value(v)!r}' for k, v in sorted(kwargs.items()))})"


def trial_models(root: str, name: str) -> tuple[str, str] | None:
  """(student, teachers) of a finished trial, as text, from its `config.json`: the student's
  model and kwargs; each teacher's name, model, kwargs and checkpoint ('' without teachers).
  None for a trial without a config.json (a script trial)."""
  path = os.path.join(root, name, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    config = json.load(f)
  student = config.get("student") or {}
  teachers = []
  for key, t in sorted((config.get("teachers") or {}).items()):
    checkpoint = t.get("checkpoint") or ""
    if checkpoint and os.path.abspath(checkpoint).startswith(os.path.abspath(root) + os.sep):
      checkpoint = os.path.relpath(os.path.abspath(checkpoint), os.path.abspath(root))
    teachers.append(f"{key}={_model_text(t.get('model', '?'), t.get('kwargs') or {})}"
                    + (f" from {checkpoint}" if checkpoint else ""))
  return _model_text(student.get("name", "?"), student.get("kwargs") or {}), ", ".join(teachers)


def model_warnings(data: dict[str, Any]) -> list[str]:
  """WARNING lines for each column whose rows train different student models, or distil from
  different teachers (rows without teachers aside), naming the rows of each model."""
  lines = []
  for col in data["col_keys"]:
    where = f"column '{'/'.join(col)}'" if col else "the table"
    for kind, what in (("students", "student models"), ("teachers", "teachers")):
      rows_of: dict[str, list[str]] = {}
      for row in data["row_keys"]:
        cell = data["cells"].get((row, col))
        for model in sorted((cell or {}).get(kind, ())):
          if model:  # '' : a row without teachers compares with any.
            rows_of.setdefault(model, []).append("/".join(row))
      if len(rows_of) > 1:
        groups = "; ".join(f"{model} in {', '.join(rows)}" for model, rows in rows_of.items())
        lines.append(f"WARNING: {where} compares rows with different {what}: {groups}. "
                     "Their difference is not the method's alone.")
  return lines


def match_expected(records: list[dict[str, str]], names: Sequence[str], key: Key
                   ) -> float | None:
  labels = dict(zip(names, key, strict=True))
  for r in records:
    ids = {k: v for k, v in r.items() if k not in ("expected", "source", "note") and v != ""}
    if ids and set(ids) <= set(labels) and all(labels[k] == v for k, v in ids.items()):
      return float(r["expected"]) if r["expected"] not in ("", "N/A", "-") else None
  return None


def table(data: dict[str, Any], rows: Sequence[str], cols: Sequence[str],
          expected: list[dict[str, str]] | None = None, baseline: str | None = None
          ) -> list[dict[str, Any]]:
  """One record per (row, col) cell: mean, std, n, expected, gap, baseline delta and SE."""
  out = []
  for row in data["row_keys"]:
    for col in data["col_keys"]:
      cell = data["cells"].get((row, col))
      mean, std, n = stats(cell["values"] if cell else [])
      rec = {"row": "/".join(row), "col": "/".join(col), "mean": mean, "std": std, "n": n,
             "failed": sorted(sum(((cell or {}).get("other", {}).get(s, [])
                                   for s in ("failed", "blocked", "interrupted")), [])),
             "unfinished": sorted(sum(((cell or {}).get("other", {}).get(s, [])
                                       for s in ("pending", "running")), [])),
             "exists": cell is not None}
      exp = match_expected(expected, [*rows, *cols], (*row, *col)) if expected else None
      rec["expected"] = exp
      rec["gap"] = mean - exp if exp is not None and n else None
      base = data["cells"].get(((baseline,), col)) if baseline else None
      if base and n and base["values"] and "/".join(row) != baseline:
        bmean, bstd, bn = stats(base["values"])
        rec["delta"] = mean - bmean
        se = math.sqrt(std ** 2 / n + bstd ** 2 / bn)
        rec["delta_se"] = rec["delta"] / se if se > 0 else None
      out.append(rec)
  return out


def _fmt_cell(rec: dict[str, Any]) -> str:
  if not rec["exists"]:
    return "—"
  text = f"{rec['mean']:.2f} ± {rec['std']:.2f} (n={rec['n']})" if rec["n"] else "no result"
  if rec.get("delta") is not None:
    se = rec.get("delta_se")
    text += f"; Δ {rec['delta']:+.2f}" + (f" ({se:+.1f} SE)" if se is not None else "")
  if rec["expected"] is not None:
    text += f"; paper {rec['expected']:.2f}"
    if rec["gap"] is not None:
      text += f", gap {rec['gap']:+.2f}"
  if rec["failed"] or rec["unfinished"]:
    text += f"; {len(rec['failed'])} failed, {len(rec['unfinished'])} unfinished"
  return text


def markdown(records: list[dict[str, Any]], data: dict[str, Any], rows: Sequence[str],
             cols: Sequence[str], metric: str, baseline: str | None) -> str:
  col_names = ["/".join(c) for c in data["col_keys"]]
  by_cell = {(r["row"], r["col"]): r for r in records}
  warnings = model_warnings(data)
  lines = [f"{metric} (mean ± sample std over n seeds"
           + (f"; Δ vs '{baseline}' in the same column and Δ in standard errors" if baseline
              else "") + ")", "", *warnings, *([""] if warnings else []),
           f"| {'/'.join(rows)} \\ {'/'.join(cols)} | " + " | ".join(col_names) + " |",
           "|---" * (len(col_names) + 1) + "|"]
  for row in data["row_keys"]:
    name = "/".join(row)
    lines.append(f"| {name} | " + " | ".join(_fmt_cell(by_cell[(name, c)])
                                             for c in col_names) + " |")
  problems = [r for r in records if r["exists"] and (r["failed"] or r["unfinished"] or not r["n"])]
  if problems:
    lines += ["", "Missing or failed cells (trials of the sweep without a result):"]
    for r in problems:
      what = "; ".join(f"{k}: {', '.join(r[k])}" for k in ("failed", "unfinished") if r[k])
      lines.append(f"- {r['row']} / {r['col']}: {what or 'no finished trial'}")
  absent = sum(not r["exists"] for r in records)
  if absent:
    lines += ["", f"— : not in the sweep ({absent} cells)."]
  if data["skipped"]:
    lines += ["", f"Left out (labels lack {[*rows, *cols]}): {', '.join(data['skipped'])}"]
  if data.get("lacking"):
    lines += ["", f"Left out (done, but result.json has no {metric}): "
                  f"{', '.join(data['lacking'])}"]
  return "\n".join(lines) + "\n"


def write_csv(path: str, records: list[dict[str, Any]]) -> None:
  keys = ["row", "col", "mean", "std", "n", "expected", "gap", "delta", "delta_se", "failed",
          "unfinished"]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for r in records:
      if r["exists"]:
        writer.writerow({**r, "failed": " ".join(r["failed"]),
                         "unfinished": " ".join(r["unfinished"])})


def bar_figure(path: str, records: list[dict[str, Any]], data: dict[str, Any], metric: str,
               baseline: str | None = None) -> None:
  """Bars grouped by column (only the rows that column has), std error bars, the paper's
  numbers as black 'x', the baseline row's mean as a dashed line across its group."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = ["/".join(r) for r in data["row_keys"]]
  cols = ["/".join(c) for c in data["col_keys"]]
  by_cell = {(r["row"], r["col"]): r for r in records}
  colors = {row: plt.get_cmap("tab20")(i % 20) for i, row in enumerate(rows)}
  groups = [(col, [by_cell[(row, col)] for row in rows if by_cell[(row, col)]["exists"]])
            for col in cols]
  fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * sum(len(g) + 1 for _, g in groups) + 1.5),
                                  4.5))
  x, ticks, labels, values, paper_drawn = 0.0, [], [], [], False
  for col, recs in groups:
    start = x
    for r in recs:
      if r["n"]:
        ax.bar(x, r["mean"], 0.8, yerr=r["std"], capsize=2, color=colors[r["row"]])
        values.append(r["mean"])
      if r["expected"] is not None:
        ax.scatter([x], [r["expected"]], marker="x", color="black", zorder=3,
                   label=None if paper_drawn else "paper")
        values.append(r["expected"])
        paper_drawn = True
      ticks.append(x)
      labels.append(r["row"] if r["n"] else f"{r['row']} (no result)")
      x += 1
    base = by_cell.get((baseline, col)) if baseline else None
    if base and base["n"]:
      ax.hlines(base["mean"], start - 0.5, x - 0.5, colors="gray", linestyles="dashed")
    if len(cols) > 1 or col:
      ax.text((start + x - 1) / 2, 1.01, col, ha="center", va="bottom",
              transform=ax.get_xaxis_transform())
    x += 1
  if values:
    lo, hi = min(values), max(values)
    ax.set_ylim(lo - 0.15 * (hi - lo + 1), hi + 0.1 * (hi - lo + 1))
  ax.set_xticks(ticks, labels, rotation=60, ha="right", fontsize=8)
  ax.set_ylabel(metric)
  if paper_drawn:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def curves_figure(path: str, root: str, data: dict[str, Any], key: str = "eval/top1",
                  scale: float = 100.0) -> None:
  """Per column, each row's eval curve (mean over its trials at each logged step)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cols = data["col_keys"]
  fig, axes = plt.subplots(1, len(cols), figsize=(5 * len(cols), 4), squeeze=False)
  cmap = plt.get_cmap("tab20")
  for ax, col in zip(axes[0], cols, strict=True):
    for i, row in enumerate(data["row_keys"]):
      cell = data["cells"].get((row, col))
      if not cell or not cell["trials"]:
        continue
      points: dict[int, list[float]] = {}
      for name in cell["trials"]:
        path_ = os.path.join(root, name, "metrics.jsonl")
        if not os.path.exists(path_):
          continue
        with open(path_) as f:
          for line in f:
            m = json.loads(line)
            if key in m:
              points.setdefault(m["step"], []).append(scale * m[key])
      steps = sorted(points)
      ax.plot(steps, [sum(points[s]) / len(points[s]) for s in steps], color=cmap(i % 20),
              label="/".join(row), marker=".")
    ax.set_title("/".join(col))
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="distill-jax report", description=__doc__.split("\n")[0])
  p.add_argument("root", help="The sweep's --workdir.")
  p.add_argument("--rows", default="method", help="Label(s) for the rows, comma-separated.")
  p.add_argument("--cols", default="", help="Label(s) for the columns, comma-separated.")
  p.add_argument("--over", default="seed", help="Labels averaged over within a cell.")
  p.add_argument("--metric", default="final.eval/top1", help="SECTION.KEY of result.json.")
  p.add_argument("--scale", type=float, default=100.0, help="Multiplies the metric (percent).")
  p.add_argument("--stage", default=None, help="The stage reported (default: the last).")
  p.add_argument("--where", action="append", default=[], help="LABEL=VALUE filter (repeat).")
  p.add_argument("--expected", default=None, help="Paper numbers: a JSON or CSV file.")
  p.add_argument("--baseline", default=None, help="A row to compare every row with.")
  p.add_argument("--out", default=None, help="Output directory (default ROOT).")
  p.add_argument("--csv", action="store_true", help="Also write report.csv.")
  p.add_argument("--png", action="store_true", help="Also write report.png and curves.png.")
  return p


def _split(text: str) -> list[str]:
  return [s for s in text.split(",") if s]


def main(argv: list[str]) -> int:
  args = parser().parse_args(argv)
  rows, cols, over = _split(args.rows), _split(args.cols), _split(args.over)
  out = args.out or args.root
  os.makedirs(out, exist_ok=True)
  try:
    where = dict(w.split("=", 1) for w in args.where)
    data = collect(args.root, rows, cols, over, args.metric, args.scale, args.stage, where)
    expected = read_expected(args.expected) if args.expected else None
  except (OSError, ValueError) as e:
    print(f"report: {e}", flush=True)
    return 2
  if not data["cells"]:
    print(f"report: no trials of stage {data['stage']!r} have the labels {rows + cols}.")
    return 2
  if data["lacking"] and not any(c["values"] for c in data["cells"].values()):
    print(f"report: no finished trial's result.json has {args.metric!r} (--metric: a section "
          "and a key of result.json, e.g. final.eval/top1).")
    return 2
  records = table(data, rows, cols, expected, args.baseline)
  text = markdown(records, data, rows, cols, args.metric, args.baseline)
  print(text)
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(text)
  if args.csv:
    write_csv(os.path.join(out, "report.csv"), records)
  if args.png:
    bar_figure(os.path.join(out, "report.png"), records, data, args.metric, args.baseline)
    curves_figure(os.path.join(out, "curves.png"), args.root, data)
  return 0

r"""Audits every student and control of the audit_digits sweep; writes the detection table.

    python experiments/audit_digits/table.py --root=runs/audit_digits [--num_inputs=256] \
        [--controls=12] [--data=cifar10 --data_dir=$DATA]

For each distilled student: the audit (probes disagreement, synthetic and real; the default
decision, disagreement:spearman with the contrast) against the 4 candidate teachers, with the N
control students of its architecture (`--controls`, default the sweep's `CONTROLS`: the first N
seeds); for each control: the same against the other N - 1 controls (leave-one-out), where any
answer but "none" is a false accusation. Beside it, from the same scores, the decision on the
combined statistic `COMBINED` (the mean of the Spearman contrasts on the disagreement and the
synthetic probe; `run_audit`'s several-pair `primary`). Baselines, which always
name a candidate (no "none"): the candidate with the highest top-1 agreement with the student on
real held-out data (the natural baseline of Shi et al.), and the candidate with the highest
Spearman correlation on the disagreement probe without controls. A 2-teacher ensemble student
has two true teachers: an answer naming either of them counts as correct (the table says so).
Writes ROOT/audit_table.md and
ROOT/audit_table.json (with N other than `CONTROLS`: audit_table_controlsN.*) and prints them.
"""

import argparse
import collections
import glob
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from distill_jax import data as data_lib  # noqa: E402
from distill_jax.audit import load_exported, query_only, run_audit  # noqa: E402
from distill_jax.audit import run as audit_run  # noqa: E402
from distill_jax.audit import scores as audit_scores  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep as spec  # noqa: E402

# The second, pre-registered decision statistic (chosen before the 12-control run was looked
# at): one score in one unit, the default primary's, on both default probes, equal weights.
COMBINED = (("disagreement", "spearman"), ("synthetic", "spearman"))


def final_export(workdir):
  """A run's export; for born-again runs, the last generation's."""
  generations = sorted((p for p in glob.glob(os.path.join(workdir, "gen*"))
                        if os.path.basename(p)[3:].isdigit()),
                       key=lambda p: int(os.path.basename(p)[3:]))
  return generations[-1] if generations else workdir


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--root", required=True)
  p.add_argument("--num_inputs", type=int, default=256)
  p.add_argument("--data", default="digits", choices=sorted(spec.DATASETS),
                 help="The sweep's data set (its arg's DATA).")
  p.add_argument("--data_dir", default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--controls", type=int, default=spec.CONTROLS,
                 help="Control students per architecture: the first N seeds of the sweep's.")
  p.add_argument("--table_only", action="store_true",
                 help="Only re-make the table from ROOT/audit_table.json (no audits).")
  args = p.parse_args(argv)
  stem = os.path.join(args.root, "audit_table" + (
      "" if args.controls == spec.CONTROLS else f"_controls{args.controls}"))
  if args.table_only:
    with open(stem + ".json") as f:
      print(tables(json.load(f)["rows"]))
    return
  t0 = time.time()
  setting = spec.DATASETS[args.data]
  data_config = data_lib.default_data_config(args.data)
  data_config.data_dir = args.data_dir
  info = data_lib.get_info(data_config)
  shape = info.image_shape
  teachers = {n: query_only(load_exported(os.path.join(args.root, n), shape, n))
              for n in setting["teachers"]}
  controls = {arch: {f"alone-{arch}-s{s}": query_only(load_exported(
      os.path.join(args.root, f"alone-{arch}-s{s}"), shape, f"alone-{arch}-s{s}"))
      for s in range(args.controls)} for arch in setting["students"]}
  jobs = []  # (name, method, arch, true teacher(s) joined by '_', or None)
  for path in sorted(glob.glob(os.path.join(args.root, "*", "trial.json"))):
    name = os.path.basename(os.path.dirname(path))
    method = name.split("-")[0]
    teacher = name[len(method) + 1:].rsplit("-s", 1)[0]
    if method in setting["methods"]:
      jobs.append((name, method, setting["methods"][method][1], teacher))
    elif method == spec.ENSEMBLE:
      jobs.append((name, method, setting["ensemble_student"], teacher))
  jobs += [(c, "alone", arch, None) for arch in controls for c in controls[arch]]
  rows = []
  for name, method, arch, teacher in jobs:
    student = load_exported(final_export(os.path.join(args.root, name)), shape, name)
    ctrl = {k: v for k, v in controls[arch].items() if k != name}
    result = run_audit(student, teachers, ctrl, input_shape=shape,
                       num_classes=info.num_classes, probes=("disagreement", "synthetic", "real"),
                       num_inputs=args.num_inputs, seed=args.seed, data_config=data_config)
    real_top1 = {c: result["scores"][c]["real"]["top1"]["student"] for c in teachers}
    raw_rho = {c: result["scores"][c]["disagreement"]["spearman"]["student"] for c in teachers}
    combined = audit_run.summarise(
        result["_per_input"], audit_scores.score_names(), student=student,
        controls=result["controls"], probe_info=result["probes"], primary=COMBINED,
        queries=result["queries"], seed=args.seed, alpha=result["alpha"],
        bootstrap=result["bootstrap"], contrast=True, t0=time.time())
    primary = result["primary"]["comparisons"]
    rows.append({"student": name, "method": method, "arch": arch, "teacher": teacher,
                 "answer": result["answer"], "adjusted_p": result["adjusted_p"],
                 "effect": {c: x["effect"] for c, x in primary.items()},
                 # The sd floor (the student's bootstrap SE) binds where se > the controls' sd.
                 "student_se": {c: x["student_se"] for c, x in primary.items()},
                 "control_sd": {c: float(np.std(list(x["controls"].values()), ddof=1))
                                for c, x in primary.items()},
                 "answer_combined": combined["answer"],
                 "adjusted_p_combined": combined["adjusted_p"],
                 "effect_combined": {c: x["effect"] for c, x in
                                     combined["primary"]["comparisons"].items()},
                 "baseline_real_top1": max(real_top1, key=real_top1.get),
                 "baseline_spearman": max(raw_rho, key=raw_rho.get)})
    print(f"{name}: answer {result['answer']}, combined {combined['answer']} (true "
          f"{teacher}), baselines {rows[-1]['baseline_real_top1']} / "
          f"{rows[-1]['baseline_spearman']}", flush=True)
  table = tables(rows)
  with open(stem + ".json", "w") as f:
    json.dump({"rows": rows, "num_inputs": args.num_inputs, "seed": args.seed,
               "controls": args.controls, "combined": [list(x) for x in COMBINED],
               "seconds": round(time.time() - t0)}, f, indent=2)
  with open(stem + ".md", "w") as f:
    f.write(table)
  print(table)


def tables(rows):
  """The table of the default decision and, where the rows have it, of the combined one."""
  out = summarise(rows)
  if rows and "answer_combined" in rows[0]:
    name = " + ".join(f"{p}:{s}" for p, s in COMBINED)
    out += f"\nCombined decision (mean of {name} contrasts):\n\n" + summarise(
        rows, suffix="_combined")
  return out


def true_teachers(row):
  """The student's true teachers: one, or the two of an ensemble student ('A_B')."""
  return row["teacher"].split("_") if row["teacher"] else []


def is_set(answer):
  """A set answer ('A or B': the decision could not tell them apart), counted apart: neither
  correct nor a wrong teacher."""
  return " or " in answer


def is_wrong(row):
  """A single name that is none of the student's true teachers."""
  answer = row["answer"]
  return answer not in ("none", *true_teachers(row)) and not is_set(answer)


def forced(row):
  """The audit as a forced multiple choice (no "none"): the largest effect size."""
  return max(row["effect"], key=lambda c: row["effect"][c])


def summarise(rows, suffix=""):
  """The table of the rows' decision `answer{suffix}` (forced choice: `effect{suffix}`). Per
  method: detection accuracy (answer = the true teacher; for an ensemble student, either of its
  two), "none", set ('A or B') and wrong-teacher answers; for controls: false accusations (any
  answer but none). Baselines likewise."""
  by = collections.defaultdict(list)
  for r in rows:
    by[r["method"]].append({**r, "answer": r["answer" + suffix],
                            "effect": r["effect" + suffix]})
  lines = ["| students | n | audit: correct | audit: none | audit: set | audit: wrong teacher | "
           "audit forced choice: correct | baseline real top-1: correct | "
           "baseline spearman (no controls): correct |",
           "|---|---|---|---|---|---|---|---|---|"]
  for method, rs in by.items():
    n = len(rs)
    if method == "alone":
      continue

    def pct(k, rs=rs, n=n):
      return f"{100 * k / n:.0f}%"

    label = f"{method} (correct: either teacher)" if method == "ensemble" else method
    lines.append(
        f"| {label} | {n} | {pct(sum(r['answer'] in true_teachers(r) for r in rs))} | "
        f"{pct(sum(r['answer'] == 'none' for r in rs))} | "
        f"{pct(sum(is_set(r['answer']) for r in rs))} | "
        f"{pct(sum(is_wrong(r) for r in rs))} | "
        f"{pct(sum(forced(r) in true_teachers(r) for r in rs))} | "
        f"{pct(sum(r['baseline_real_top1'] in true_teachers(r) for r in rs))} | "
        f"{pct(sum(r['baseline_spearman'] in true_teachers(r) for r in rs))} |")
  controls = by.get("alone", [])
  if controls:
    n = len(controls)
    accused = sum(r["answer"] != "none" for r in controls)
    lines.append(f"| controls (false accusations) | {n} | - | {100 * (n - accused) / n:.0f}% | - | "
                 f"{100 * accused / n:.0f}% accused | 100% accused | 100% accused | "
                 "100% accused |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()

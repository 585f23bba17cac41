r"""The main job: train a teacher, then the same student alone and with KD, and print a table.

Runs on the embedded digits (offline, a few minutes on 2 CPU cores), through the same
`train_and_evaluate` as the CLI, with the configs in `configs/digits.py`:

    python scripts/quickstart.py --workdir=runs/quickstart --seeds=3

Every run lives in its own workdir under --workdir and resumes from its checkpoints, so an
interrupted quickstart picks up where it stopped. The table (mean ± sample std over seeds) is
printed and written to WORKDIR/table.md, the eval curves of seed 0's runs to WORKDIR/curves.png; the
per-run results are in each run's result.json. `--update_readme` also writes the table into
README.md between its quickstart-table markers (tests/test_quickstart.py checks that the README
holds what this script writes).
"""

from __future__ import annotations

import os

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/quickstart", "Directory for all runs of the quickstart.")
flags.DEFINE_integer("seeds", 3, "Student seeds (the teacher is trained once, with seed 0).")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: $DISTILL_JAX_DATA_DIR or cache).")
flags.DEFINE_bool("update_readme", False, "Also write the table into README.md (between its "
                  "quickstart-table markers).")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "digits.py")
README = os.path.join(ROOT, "README.md")
TABLE_START, TABLE_END = "<!-- quickstart-table:start -->", "<!-- quickstart-table:end -->"


def readme_table(text: str) -> str:
  """The table in README text: what lies between the markers."""
  start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
  return text[start:end].strip("\n")


def with_readme_table(text: str, table: str) -> str:
  """README text with `table` between the markers."""
  start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
  return f"{text[:start]}\n{table}\n{text[end:]}"


def _run(role: str, workdir: str, **overrides) -> dict:
  from distill_jax.config import load_config_file
  from distill_jax.train.loop import train_and_evaluate

  if FLAGS.data_dir:
    overrides["data.data_dir"] = FLAGS.data_dir
  config = load_config_file(f"{CONFIG}:{role}", overrides)
  print(f"== {role} (seed {config.seed}) -> {workdir}", flush=True)
  return train_and_evaluate(config, workdir)


def _cell(values: list[float]) -> str:
  """Fractions [n] as a table cell in %: 'mean ± sample std' (ddof=1), or the one value."""
  from distill_jax.sweep.report import stats

  mean, std, n = stats([100 * float(v) for v in values])
  return f"{mean:6.2f} ± {std:4.2f}" if n > 1 else f"{mean:6.2f}"


def verdict(regime: str, alone: list[float], kd: list[float]) -> str:
  """Whether KD helped in `regime`: its mean top-1 gain over the student alone (fractions per
  seed in, points out), against the larger of the two rows' sample stds (ddof=1)."""
  from distill_jax.sweep.report import stats

  (mean_alone, std_alone, _), (mean_kd, std_kd, _) = stats(alone), stats(kd)
  gain, noise = 100 * (mean_kd - mean_alone), 100 * max(std_alone, std_kd)
  word = ("KD helped" if gain > noise else
          "KD did not clearly help (within seed noise)" if gain > 0 else "KD did not help")
  return (f"- {regime}: {word}: {gain:+.2f} points of top-1 over the student alone "
          f"(larger seed std {noise:.2f}).")


# Two regimes: all training labels, and few labels (the teacher still saw all of them), where
# distillation has the most to give. The few-label runs train 5x the epochs, so both regimes
# take about the same number of steps.
REGIMES = (("all 1500 train images", {}),
           ("300 train images", {"data.train_subset": 300, "num_epochs": 150.0}))


def main(argv: list[str]) -> None:
  del argv
  from distill_jax.train.console import quiet_library_logs

  quiet_library_logs()
  root = os.path.abspath(FLAGS.workdir)
  teacher_dir = os.path.join(root, "teacher")
  teacher = _run("teacher", teacher_dir)
  n = FLAGS.seeds
  lines = [f"Embedded digits (297 test images); teacher {teacher['student']} trained on all "
           f"1500 train images; top-1 and top-1 agreement with the teacher in %, mean ± sample "
           f"std over {n} student seed(s).", "",
           "| model | student's data | top-1 (%) | agreement (%) |", "|---|---|---|---|",
           f"| teacher ({teacher['student']}) | all 1500 train images | "
           f"{_cell([teacher['final']['eval/top1']])} | — |"]
  verdicts = []
  for regime, overrides in REGIMES:
    tag = f"{overrides.get('data.train_subset', 'all')}"
    rows = {}
    for name, role in (("student alone", "student"), ("student + KD", "kd")):
      rows[name] = [_run(role, os.path.join(root, f"{role}_{tag}_seed{seed}"), seed=seed,
                         **{"teachers.teacher.checkpoint": teacher_dir, **overrides})
                    for seed in range(n)]
      top1 = [r["final"]["eval/top1"] for r in rows[name]]
      agree = [r["final"]["eval/agreement/teacher"] for r in rows[name]]
      model = rows[name][0]["student"]
      lines.append(f"| {name} ({model}) | {regime} | {_cell(top1)} | {_cell(agree)} |")
    verdicts.append(verdict(regime, [r["final"]["eval/top1"] for r in rows["student alone"]],
                            [r["final"]["eval/top1"] for r in rows["student + KD"]]))
  table = "\n".join(lines + [""] + verdicts)
  print("\n" + table)
  with open(os.path.join(root, "table.md"), "w") as f:
    f.write(table + "\n")
  from distill_jax import plots

  curves = os.path.join(root, "curves.png")
  plots.plot_runs([teacher_dir] + [os.path.join(root, f"{role}_{tag}_seed0") for tag in
                                   ("all", "300") for role in ("student", "kd")],
                  ["eval/top1", "eval/agreement/teacher"], curves)
  print(f"\nWrote {os.path.join(root, 'table.md')} and {curves}.")
  if FLAGS.update_readme:
    with open(README) as f:
      text = f.read()
    with open(README, "w") as f:
      f.write(with_readme_table(text, table))
    print(f"Updated the table in {README}.")


if __name__ == "__main__":
  app.run(main)

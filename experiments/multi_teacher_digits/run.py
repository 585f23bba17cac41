r"""Multi-teacher KD on the embedded digits: an ensemble of 3 teachers vs the best single teacher
vs the student alone, mean ± sample std over student seeds, as a table.

    python experiments/multi_teacher_digits/run.py --workdir=runs/multi_teacher_digits --seeds=3

Trains the three teachers of `configs/digits_ensemble.py` once (seed 0, all 1500 training
images), then, for each regime (all 1500 labels; 300 labels with 5x the epochs, where
scripts/quickstart.py found KD helps most) and each student seed, the MLP student: alone,
distilled from each single teacher, and distilled from the three teachers' mixture (one run per
`--aggregations` entry). Every run goes through `train_and_evaluate`, as the CLI does, in its own
workdir under --workdir, so an interrupted experiment resumes where it stopped (a finished run is
only evaluated again). The table is printed and written to WORKDIR/table.md; each run's numbers
are in its result.json.

`--tiny` makes every run a few steps: a smoke test of the whole pipeline (tests/).
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "digits_ensemble.py")
# The teachers of configs/digits_ensemble.py, in its order.
TEACHERS = ("cnn", "cnn_deep", "mlp")
# The student's training data. As in scripts/quickstart.py: all training labels, and few (the
# teachers still saw all of them), with 5x the epochs so both take about the same steps.
REGIMES = {"all": ("all 1500 train images", {}),
           "300": ("300 train images", {"data.train_subset": 300, "num_epochs": 150.0})}

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/multi_teacher_digits", "Directory for all runs.")
flags.DEFINE_integer("seeds", 3, "Student seeds (the teachers are trained once, with seed 0).")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: $DISTILL_JAX_DATA_DIR or cache).")
flags.DEFINE_list("aggregations", ["mean", "entropy"],
                  "How the ensemble's KD target weights the teachers, one run each: mean | "
                  "entropy | true_label (see distill_jax.losses.base.teacher_weights).")
flags.DEFINE_list("regimes", list(REGIMES), f"The student's training data, of {list(REGIMES)}.")
flags.DEFINE_bool("tiny", False, "A few steps per run: a smoke test of the experiment.")
flags.DEFINE_bool("compilation_cache", True,
                  "Keep compiled programs in WORKDIR/jax_cache (JAX's persistent compilation "
                  "cache), so runs that compile the same program (the other seeds; the eval "
                  "step all students share) load it: compiling is a large part of a short run "
                  "on a CPU. The results are the same either way.")


def _run(role: str, workdir: str, **overrides) -> dict:
  """One run of configs/digits_ensemble.py:ROLE (`,tiny` with --tiny) in `workdir`."""
  from distill_jax.config import load_config_file
  from distill_jax.train.loop import train_and_evaluate

  if FLAGS.data_dir:
    overrides["data.data_dir"] = FLAGS.data_dir
  config = load_config_file(f"{CONFIG}:{role},tiny" if FLAGS.tiny else f"{CONFIG}:{role}",
                            overrides)
  print(f"== {role} (seed {config.seed}) -> {workdir}", flush=True)
  return train_and_evaluate(config, workdir)


def _describe(teacher: str) -> str:
  """E.g. 'cnn(widths=(32, 64))': the model of configs/digits_ensemble.py:teacher_NAME."""
  from distill_jax.config import load_config_file

  model = load_config_file(f"{CONFIG}:teacher_{teacher}").student
  return f"{model.name}({', '.join(f'{k}={tuple(v)}' for k, v in model.kwargs.items())})"


def _pct(values: list[float]) -> np.ndarray:
  return 100 * np.asarray(values, dtype=np.float64)


def _cell(values: list[float]) -> str:
  """Fractions [n] as a table cell in %: 'mean ± sample std' (ddof=1), or the one value."""
  values = _pct(values)
  return (f"{values.mean():6.2f} ± {values.std(ddof=1):4.2f}" if len(values) > 1
          else f"{values[0]:6.2f}")


def _compare(a: list[float], b: list[float]) -> str:
  """How the mean top-1 of seeds `a` compares with `b`: the gain in points, the larger seed
  (sample) std of the two, and whether the gain exceeds it (as in scripts/quickstart.py)."""
  gain = _pct(a).mean() - _pct(b).mean()
  noise = max(_pct(a).std(ddof=1), _pct(b).std(ddof=1)) if min(len(a), len(b)) > 1 else 0.0
  if len(a) < 2:
    word = "one seed, no noise estimate"
  else:
    word = ("better" if gain > noise else "worse" if gain < -noise else
            "no clear difference (within seed noise)")
  return f"{gain:+.2f} points (larger seed std {noise:.2f}): {word}"


def main(argv: list[str]) -> None:
  del argv
  from distill_jax.train.console import quiet_library_logs

  unknown = sorted(set(FLAGS.regimes) - set(REGIMES))
  if unknown:
    raise app.UsageError(f"--regimes: unknown {unknown}; choose from {list(REGIMES)}.")
  quiet_library_logs()
  start = time.time()
  root = os.path.abspath(FLAGS.workdir)
  if FLAGS.compilation_cache:
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

  teacher_dirs = {name: os.path.join(root, f"teacher_{name}") for name in TEACHERS}
  teacher_top1 = {name: _run(f"teacher_{name}", path)["final"]["eval/top1"]
                  for name, path in teacher_dirs.items()}
  # The best single teacher: the highest test top-1 (the first listed on a tie).
  best = max(TEACHERS, key=lambda name: teacher_top1[name])
  checkpoints = {f"teachers.{name}.checkpoint": path for name, path in teacher_dirs.items()}

  # The student rows: (label, role, overrides, workdir prefix).
  students = [("student alone", "student", {}, "student")]
  students += [(f"student + KD from {name}", f"kd_{name}", {}, f"kd_{name}") for name in TEACHERS]
  students += [(f"student + KD from the ensemble ({agg})", "kd_ensemble",
                {"losses.kd.aggregation": agg}, f"kd_ensemble_{agg}")
               for agg in FLAGS.aggregations]
  n = FLAGS.seeds
  top1, agree, teachers_seen = {}, {}, {}  # (regime, label) -> per seed
  for regime in FLAGS.regimes:
    for label, role, overrides, prefix in students:
      runs = [_run(role, os.path.join(root, f"{prefix}_{regime}_seed{seed}"), seed=seed,
                   **checkpoints, **REGIMES[regime][1], **overrides) for seed in range(n)]
      top1[regime, label] = [r["final"]["eval/top1"] for r in runs]
      agree[regime, label] = [r["final"]["eval/agreement/ensemble"] for r in runs]
      teachers_seen[regime, label] = runs[0]["final"]

  # Every student run evaluates the same frozen teachers on the same test images, so any one
  # gives the ensemble's top-1; the teachers' own runs must give the same numbers.
  final = next(iter(teachers_seen.values()))
  notes = [f"WARNING: teacher {name} scored {100 * teacher_top1[name]:.2f}% in its own run but "
           f"{100 * final[f'eval/teacher_top1/{name}']:.2f}% as loaded by the students."
           for name in TEACHERS
           if abs(final[f"eval/teacher_top1/{name}"] - teacher_top1[name]) > 1e-6]

  lines = [f"Embedded digits (297 test images). Teachers trained once (seed 0) on all 1500 train "
           f"images; the student is an MLP with one hidden layer of 32. Top-1, and top-1 "
           f"agreement with the teachers' ensemble (the mean of their probabilities), in %; "
           f"students: mean ± sample std over {n} seed(s).", "",
           "| model | student's data | top-1 (%) | agreement with ensemble (%) |",
           "|---|---|---|---|"]
  for name in TEACHERS:
    mark = ", the best" if name == best else ""
    lines.append(f"| teacher {name} ({_describe(name)}{mark}) | all 1500 train images | "
                 f"{_cell([teacher_top1[name]])} | — |")
  lines.append(f"| ensemble of the 3 teachers | all 1500 train images | "
               f"{_cell([final['eval/teacher_top1/ensemble']])} | 100 |")
  verdicts = []
  for regime in FLAGS.regimes:
    data = REGIMES[regime][0]
    for label, *_ in students:
      lines.append(f"| {label} | {data} | {_cell(top1[regime, label])} | "
                   f"{_cell(agree[regime, label])} |")
    alone, single = top1[regime, "student alone"], top1[regime, f"student + KD from {best}"]
    verdicts.append(f"- {data}: KD from the best single teacher ({best}) vs the student alone: "
                    f"{_compare(single, alone)}.")
    for agg in FLAGS.aggregations:
      ensemble = top1[regime, f"student + KD from the ensemble ({agg})"]
      verdicts.append(f"- {data}: KD from the ensemble ({agg}) vs KD from the best single "
                      f"teacher ({best}): {_compare(ensemble, single)}; vs the student alone: "
                      f"{_compare(ensemble, alone)}.")
  table = "\n".join([
      *lines, "", "Verdicts (top-1; \"better\" = a gain larger than the larger seed std of the "
      "two rows):", *verdicts, *notes, "",
      f"Wall time: {(time.time() - start) / 60:.1f} min (runs already finished in the workdir "
      f"are only evaluated again)."])
  print("\n" + table)
  with open(os.path.join(root, "table.md"), "w") as f:
    f.write(table + "\n")


if __name__ == "__main__":
  app.run(main)

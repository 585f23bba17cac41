r"""The distillation-audit benchmark on the embedded digits: candidate teachers, students
distilled from each by several methods, and control students trained alone.

    distill-jax sweep --config=experiments/audit_digits/sweep.py --workdir=runs/audit_digits \
        --workers=2
    python experiments/audit_digits/table.py --root=runs/audit_digits

Stage `teachers`: K = 4 candidate teachers of `configs/digits.py`'s teacher recipe, of different
architectures and seeds (`TEACHERS`). Stage `students`: for each teacher, students distilled from
it by each method of `METHODS` (KD and born-again into the MLP student of configs/digits.py;
DKD, RKD and CRD into a CNN of widths 16/32), and, per student architecture, control students
trained alone (CE) with `CONTROLS` seeds: the audit's null. `table.py` audits every student
against the 4 teachers (and every control against them, its controls being the other controls
of its architecture) and writes the detection table.

Arg: `[SEEDS][,tiny][,epochs=E]`: SEEDS (default 1) student seeds per (teacher, method);
`tiny` makes every run a few steps (tests); `epochs=E` every run's epochs (default 15).
The same protocol runs on CIFAR-10 with a CIFAR config in CONFIG and its models in TEACHERS.
"""

from distill_jax import sweep as sw

CONFIG = "../../configs/digits.py"
# name -> (model, kwargs, seed): the candidate teachers.
TEACHERS = {
    "cnn32-64a": ("cnn", {"widths": (32, 64)}, 0),
    "cnn32-64b": ("cnn", {"widths": (32, 64)}, 1),
    "cnn64-128": ("cnn", {"widths": (64, 128)}, 2),
    "mlp256": ("mlp", {"hidden": (256,)}, 3),
}
MLP_STUDENT = {"student.name": "mlp", "student.kwargs": {"hidden": (32,)}}
CNN_STUDENT = {"student.name": "cnn", "student.kwargs": {"widths": (16, 32)}}
# method -> (configs/digits.py arg, student architecture label, extra overrides).
METHODS = {
    "kd": ("kd", "mlp", {}),
    "bornagain": ("kd", "mlp", {"generations": 2}),
    "dkd": ("dkd", "cnn", {}),
    "rkd": ("rkd", "cnn", {}),
    "crd": ("crd", "cnn", {}),
}
STUDENTS = {"mlp": MLP_STUDENT, "cnn": CNN_STUDENT}
CONTROLS = 5


def get_sweep(arg: str | None = None) -> sw.Sweep:
  options = [o for o in (arg or "").split(",") if o]
  num_seeds = next((int(o) for o in options if o.isdigit()), 1)
  epochs = next((float(o[len("epochs="):]) for o in options if o.startswith("epochs=")), 15.0)
  tiny = ",tiny" if "tiny" in options else ""
  teachers = [sw.Point(name, "teacher" + tiny,
                       {"student.name": model, "student.kwargs": kwargs, "seed": seed},
                       {"role": "teacher", "teacher": name})
              for name, (model, kwargs, seed) in TEACHERS.items()]
  students = []
  for teacher, (model, kwargs, _) in TEACHERS.items():
    for method, (config_arg, arch, extra) in METHODS.items():
      for seed in range(num_seeds):
        students.append(sw.Point(
            f"{method}-{teacher}-s{seed}", config_arg + tiny,
            {**STUDENTS[arch], **extra, "seed": 100 + seed, "teachers.teacher.model": model,
             "teachers.teacher.kwargs": kwargs,
             "teachers.teacher.checkpoint": f"{{ROOT}}/{teacher}"},
            {"role": "student", "method": method, "teacher": teacher, "arch": arch}))
  controls = [sw.Point(f"alone-{arch}-s{seed}", "student" + tiny,
                       {**overrides, "seed": 200 + seed,
                        # Listed for evaluation only (agreement); no loss term reads it.
                        "teachers.teacher.checkpoint": "{ROOT}/cnn32-64a"},
                       {"role": "control", "method": "alone", "arch": arch})
              for arch, overrides in STUDENTS.items() for seed in range(CONTROLS)]
  stages = {"teachers": teachers, "students": [*students, *controls]}
  stages = {k: sw.with_overrides(v, {"num_epochs": epochs}) for k, v in stages.items()}
  return sw.Sweep(config=CONFIG, stages=stages)

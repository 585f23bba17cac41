r"""The distillation-audit benchmark: candidate teachers, students distilled from each by several
methods (and from pairs of them), and control students trained alone.

    distill-jax sweep --config=experiments/audit_digits/sweep.py --workdir=runs/audit_digits \
        --workers=2
    python experiments/audit_digits/table.py --root=runs/audit_digits

Stage `teachers`: K = 4 candidate teachers of different architectures and seeds. Stage
`students`: for each teacher, students distilled from it by each method of the data set's
`methods` (KD and born-again into one student architecture; DKD, RKD and CRD into another);
for each pair of `ensembles`, a student distilled (KD) from the mean of the two teachers'
softmaxes (it has two true teachers); and, per student architecture, control students trained
alone (CE) with `CONTROLS` seeds: the audit's null. `table.py` audits every student against
the 4 teachers (and every control against them, its controls being the other controls of its
architecture) and writes the detection table.

Arg: `[DATA][,SEEDS][,tiny][,epochs=E][,only=M1-M2][,controls=N]`: DATA `digits` (default:
the embedded digits, configs/digits.py, minutes on a CPU) or `cifar10` (the paper's setting:
configs/cifar_kd.py's CIFAR-10 recipe, ResNet/VGG teachers and ResNet/WRN students, on a GPU;
needs `python scripts/prepare_data.py cifar10 --data_dir=$DATA` and
`--set=data.data_dir=$DATA`); SEEDS (default 1) student seeds per (teacher, method); `tiny`
makes every run a few steps (tests); `epochs=E` every run's epochs (default: the data set's, 15
or 240); `only=M1-M2` only the students of these methods (`ensemble` included), with the
teachers and controls; `controls=N` control students per student architecture (default
`CONTROLS`, 12).

This file is also the sweep's config file (`get_config`): it hands each run to
configs/digits.py or configs/cifar_kd.py and adds the second teacher of the ensemble students.
"""

import importlib.util
import os

import ml_collections

from distill_jax import sweep as sw
from distill_jax.config import teacher_config

CONFIGS = {"digits": "digits.py", "cifar10": "cifar_kd.py"}
# Per data set: the candidate teachers (name -> (model, kwargs, seed)), the student
# architectures (label -> (model, kwargs)), the methods (name -> (config role, student label,
# extra overrides)), the 2-teacher ensembles, and the default epochs.
DATASETS = {
    "digits": {
        "teachers": {
            "cnn32-64a": ("cnn", {"widths": (32, 64)}, 0),
            "cnn32-64b": ("cnn", {"widths": (32, 64)}, 1),
            "cnn64-128": ("cnn", {"widths": (64, 128)}, 2),
            "mlp256": ("mlp", {"hidden": (256,)}, 3),
        },
        "students": {"mlp": ("mlp", {"hidden": (32,)}), "cnn": ("cnn", {"widths": (16, 32)})},
        "methods": {
            "kd": ("kd", "mlp", {}),
            "bornagain": ("kd", "mlp", {"generations": 2}),
            "dkd": ("dkd", "cnn", {}),
            "rkd": ("rkd", "cnn", {}),
            "crd": ("crd", "cnn", {}),
        },
        "ensembles": (("cnn32-64a", "mlp256"), ("cnn32-64b", "cnn64-128"),
                      ("cnn64-128", "mlp256"), ("cnn32-64a", "cnn32-64b")),
        "ensemble_student": "mlp",
        "epochs": 15.0,
    },
    # The paper's setting (Shi et al. 2025: CIFAR-10): the CRD recipe of configs/cifar_kd.py
    # (SGD, batch 64, 240 epochs, crop+flip). Two ResNet-56 seeds (the hardest pair), a
    # ResNet-110 and a VGG-13; KD, born-again and the ensembles into ResNet-20, the logit and
    # feature methods into WRN-16-2.
    "cifar10": {
        "teachers": {
            "resnet56a": ("resnet56", {}, 0),
            "resnet56b": ("resnet56", {}, 1),
            "resnet110": ("resnet110", {}, 2),
            "vgg13": ("vgg13", {}, 3),
        },
        "students": {"resnet20": ("resnet20", {}), "wrn16-2": ("wrn_16_2", {})},
        "methods": {
            "kd": ("kd", "resnet20", {}),
            "bornagain": ("kd", "resnet20", {"generations": 2}),
            "dkd": ("dkd", "wrn16-2", {}),
            "rkd": ("rkd", "wrn16-2", {}),
            "crd": ("crd", "wrn16-2", {}),
        },
        "ensembles": (("resnet56a", "vgg13"), ("resnet56b", "resnet110"),
                      ("resnet110", "vgg13"), ("resnet56a", "resnet56b")),
        "ensemble_student": "resnet20",
        "epochs": 240.0,
    },
}
CONTROLS = 12  # Control students per student architecture (the arg's `controls=N`).
ENSEMBLE = "ensemble"  # The method label of the 2-teacher students.
# Kept for table.py and older readers: the digits setting.
TEACHERS = DATASETS["digits"]["teachers"]
METHODS = DATASETS["digits"]["methods"]
STUDENTS = DATASETS["digits"]["students"]


def _config_module(data: str):
  """configs/digits.py or configs/cifar_kd.py, loaded from its path (configs are no package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs",
                      CONFIGS[data])
  spec = importlib.util.spec_from_file_location(f"distill_jax_audit_{data}_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def config_arg(data: str, role: str, teacher: str = "", student: str = "") -> str:
  """The arg of the data set's config file for `role` ('teacher', 'student' or a method's
  config role), teacher and student models (CIFAR's config names them in its arg)."""
  if data == "digits":
    return role
  if role == "teacher":
    return f"ce,{teacher},cifar10"
  if role == "student":
    return f"ce,{student},cifar10"
  return f"{role},{teacher},{student},cifar10"


def get_config(arg: str = "digits,kd") -> ml_collections.ConfigDict:
  """`DATA,ARG[,ensemble]`: the data set's config file at ARG (e.g. `digits,kd,tiny` or
  `cifar10,kd,resnet56,resnet20,cifar10`); `ensemble` adds a second teacher `teacher2` (set its
  model and checkpoint by overrides) and makes the KD term's target the mean of the two
  teachers' softmaxes (digits_ensemble.py's `aggregation='mean'`)."""
  data, *rest = arg.split(",")
  if data not in CONFIGS:
    raise ValueError(f"audit_digits/sweep.py config arg {arg!r}: expected DATA,ARG with DATA "
                     f"in {list(CONFIGS)}.")
  ensemble = ENSEMBLE in rest
  c = _config_module(data).get_config(",".join(r for r in rest if r != ENSEMBLE))
  if ensemble:
    if "kd" not in c.losses or "teacher" not in c.teachers:
      raise ValueError(f"audit_digits/sweep.py config arg {arg!r}: an ensemble student needs "
                       "the KD role (one teacher and the kd term) to add the second teacher to.")
    c.teachers.teacher2 = teacher_config(c.teachers.teacher.model,
                                         dict(c.teachers.teacher.kwargs))
    c.losses.kd.teacher = ml_collections.config_dict.placeholder(str)
    c.losses.kd.aggregation = "mean"
  return c


def get_sweep(arg: str | None = None) -> sw.Sweep:
  options = [o for o in (arg or "").split(",") if o]
  data = next((o for o in options if o in DATASETS), "digits")
  setting = DATASETS[data]
  num_seeds = next((int(o) for o in options if o.isdigit()), 1)
  epochs = next((float(o[len("epochs="):]) for o in options if o.startswith("epochs=")),
                setting["epochs"])
  tiny = ",tiny" if "tiny" in options else ""
  num_controls = next((int(o[len("controls="):]) for o in options
                       if o.startswith("controls=")), CONTROLS)
  only = next((o[len("only="):].split("-") for o in options if o.startswith("only=")),
              [*setting["methods"], ENSEMBLE])
  unknown = set(only) - {*setting["methods"], ENSEMBLE}
  if unknown:
    raise ValueError(f"audit_digits/sweep.py arg {arg!r}: unknown methods {sorted(unknown)} in "
                     f"only=; expected some of {[*setting['methods'], ENSEMBLE]}.")
  teachers_, students_ = setting["teachers"], setting["students"]

  def arg_of(role, teacher="", student=""):
    return f"{data},{config_arg(data, role, teacher, student)}{tiny}"

  def student_overrides(label):
    model, kwargs = students_[label]
    # Digits: every student (distilled or control, MLP or CNN) with the crop the benchmark was
    # run with; digits.py's MLP roles ('kd', 'student') now drop it, which would set the CNN
    # controls apart from the CNN students they are the null for.
    crop = {"data.augment": "crop"} if data == "digits" else {}
    return {"student.name": model, "student.kwargs": kwargs, **crop}

  def teacher_overrides(key, teacher):
    model, kwargs, _ = teachers_[teacher]
    return {f"teachers.{key}.model": model, f"teachers.{key}.kwargs": kwargs,
            f"teachers.{key}.checkpoint": f"{{ROOT}}/{teacher}"}

  teachers = [sw.Point(name, arg_of("teacher", model),
                       {"student.name": model, "student.kwargs": kwargs, "seed": seed},
                       {"role": "teacher", "teacher": name})
              for name, (model, kwargs, seed) in teachers_.items()]
  students = []
  for teacher, (model, _, _) in teachers_.items():
    for method, (role, arch, extra) in setting["methods"].items():
      for seed in range(num_seeds if method in only else 0):
        students.append(sw.Point(
            f"{method}-{teacher}-s{seed}", arg_of(role, model, students_[arch][0]),
            {**student_overrides(arch), **extra, "seed": 100 + seed,
             **teacher_overrides("teacher", teacher)},
            {"role": "student", "method": method, "teacher": teacher, "arch": arch}))
  arch = setting["ensemble_student"]
  for first, second in setting["ensembles"]:
    for seed in range(num_seeds if ENSEMBLE in only else 0):
      students.append(sw.Point(
          f"{ENSEMBLE}-{first}_{second}-s{seed}",
          arg_of("kd", teachers_[first][0], students_[arch][0]) + f",{ENSEMBLE}",
          {**student_overrides(arch), "seed": 100 + seed,
           **teacher_overrides("teacher", first), **teacher_overrides("teacher2", second)},
          {"role": "student", "method": ENSEMBLE, "teacher": f"{first}_{second}",
           "arch": arch}))
  first_teacher = next(iter(teachers_))
  controls = [sw.Point(f"alone-{label}-s{seed}", arg_of("student", student=model),
                       {**student_overrides(label), "seed": 200 + seed,
                        # Digits: listed for evaluation only (agreement); no loss reads it.
                        **(teacher_overrides("teacher", first_teacher)
                           if data == "digits" else {})},
                       {"role": "control", "method": "alone", "arch": label})
              for label, (model, _) in students_.items() for seed in range(num_controls)]
  stages = {"teachers": teachers, "students": [*students, *controls]}
  stages = {k: sw.with_overrides(v, {"num_epochs": epochs}) for k, v in stages.items()}
  return sw.Sweep(stages=stages, config="sweep.py")  # This file: `get_config` above.

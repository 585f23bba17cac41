r"""Multi-teacher distillation on the embedded digits: three teachers of different kinds, the
MLP student of `configs/digits.py` alone, with KD from each teacher, and with KD from all three.

The settings (data, optimizer, epochs, the student, the KD recipe) are those of
`configs/digits.py`; this file only swaps in three teachers. Each teacher is trained first
with its own role, then named by workdir:

    distill-jax --config=configs/digits_ensemble.py:teacher_cnn --workdir=runs/ens/cnn
    distill-jax --config=configs/digits_ensemble.py:teacher_cnn_deep --workdir=runs/ens/cnn_deep
    distill-jax --config=configs/digits_ensemble.py:teacher_mlp --workdir=runs/ens/mlp
    distill-jax --config=configs/digits_ensemble.py:kd_ensemble --workdir=runs/ens/kd_ensemble \
        --config.teachers.cnn.checkpoint=runs/ens/cnn \
        --config.teachers.cnn_deep.checkpoint=runs/ens/cnn_deep \
        --config.teachers.mlp.checkpoint=runs/ens/mlp

Arg: `ROLE[,tiny]`, ROLE one of
- `teacher_<name>`: trains teacher `<name>` (in `TEACHERS`) with CE alone, as digits.py:teacher;
- `student`: the student with CE alone;
- `kd_<name>`: the student distilled from teacher `<name>` alone (CE 0.1 + KD 0.9, T = 4);
- `kd_ensemble`: the same KD term, its target the teachers' mixture (`aggregation` 'mean'; set
  `--config.losses.kd.aggregation=entropy` etc. for the per-example weightings).
Every student role lists all three teachers, even where no loss term uses them, so evaluation
reports the student's agreement with each teacher and with their ensemble (eval/agreement/NAME,
NAME='ensemble' included) and every student run is measured the same way; a training step runs
only the teachers that a loss term reads. `tiny` shrinks the run to a few steps, as in
digits.py.
"""

import importlib.util
import os

import ml_collections

from distill_jax.config import teacher_config


def _digits():
  """configs/digits.py, loaded from its path: config files are not a package."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py")
  spec = importlib.util.spec_from_file_location("distill_jax_configs_digits", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


digits = _digits()

# Three kinds of teacher: digits.py's CNN, a deeper CNN (a third stride-2 stage, down to
# 1x1), and a wide two-layer MLP (no convolutions, no BatchNorm), so their errors differ.
TEACHERS = {
    "cnn": digits.TEACHER,
    "cnn_deep": {"name": "cnn", "kwargs": {"widths": (32, 64, 128)}},
    "mlp": {"name": "mlp", "kwargs": {"hidden": (512, 512)}},
}
ROLES = (*(f"teacher_{t}" for t in TEACHERS), "student", *(f"kd_{t}" for t in TEACHERS),
         "kd_ensemble")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of ROLE (see the module docstring): configs/digits.py's teacher, student or kd
  config, with this file's teachers swapped in."""
  role, *options = (arg or "kd_ensemble").split(",")
  if role not in ROLES or set(options) - {"tiny"}:
    raise ValueError(f"configs/digits_ensemble.py arg {arg!r}: expected ROLE[,tiny] with ROLE "
                     f"in {list(ROLES)}.")
  base_role = "teacher" if role.startswith("teacher_") else (
      "student" if role == "student" else "kd")
  c = digits.get_config(",".join([base_role, *options]))
  if base_role == "teacher":
    c.student = ml_collections.ConfigDict({**TEACHERS[role.removeprefix("teacher_")],
                                           "remat": False})
    return c
  c.teachers = ml_collections.ConfigDict(
      {name: teacher_config(t["name"], t["kwargs"]) for name, t in TEACHERS.items()})
  if base_role == "kd":
    # digits.py:kd's term, with the target made explicit: one named teacher, or the mixture.
    c.losses.kd.teacher = ml_collections.config_dict.placeholder(str)
    c.losses.kd.aggregation = "mean"
    if role != "kd_ensemble":
      c.losses.kd.teacher = role.removeprefix("kd_")
  return c

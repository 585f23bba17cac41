r"""Teacher, student and KD on the embedded digits (scikit-learn's 1797 real 8x8 images).

The default run of distill-jax: a CNN teacher, an MLP student trained alone, and the same
student distilled from the teacher with Hinton's KD. Offline, seconds per run on a CPU.

    distill-jax --config=configs/digits.py:teacher --workdir=runs/digits/teacher
    distill-jax --config=configs/digits.py:student --workdir=runs/digits/student \
        --config.teachers.teacher.checkpoint=runs/digits/teacher
    distill-jax --config=configs/digits.py:kd --workdir=runs/digits/kd \
        --config.teachers.teacher.checkpoint=runs/digits/teacher

Arg: `ROLE[,tiny]`, ROLE in {teacher, student, kd}; `tiny` shrinks the run to a few steps
(for tests and smoke runs).
"""

import ml_collections

from distill_jax.config import base_config

TEACHER = {"name": "cnn", "kwargs": {"widths": (32, 64)}}
STUDENT = {"name": "mlp", "kwargs": {"hidden": (32,)}}
ROLES = ("teacher", "student", "kd")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  role, *options = (arg or "kd").split(",")
  if role not in ROLES or set(options) - {"tiny"}:
    raise ValueError(f"configs/digits.py arg {arg!r}: expected ROLE[,tiny] with ROLE in {ROLES}.")
  c = base_config()
  c.data.name = "digits"
  c.batch_size = 64
  c.num_epochs = 30.0
  c.optim.lr = 0.05
  c.optim.weight_decay = 5e-4
  c.optim.schedule = "cosine"
  c.eval_every_epochs = 5.0
  c.log_every_steps = 20
  c.checkpoint_every_steps = 200
  if role == "teacher":
    c.student = ml_collections.ConfigDict(TEACHER)
  else:
    c.student = ml_collections.ConfigDict(STUDENT)
  if role != "teacher":
    # The student alone also lists the teacher: no loss term uses it, but evaluation reports
    # the student's agreement with it, so both student runs are measured the same way.
    c.teachers = ml_collections.ConfigDict(
        {"teacher": {"model": TEACHER["name"], "kwargs": TEACHER["kwargs"], "checkpoint": ""}})
  if role == "kd":
    # The CRD code's KD recipe: gamma 0.1 on CE, alpha 0.9 on KD, T = 4.
    c.losses = ml_collections.ConfigDict(
        {"ce": {"weight": 0.1}, "kd": {"weight": 0.9, "temperature": 4.0}})
  if "tiny" in options:
    c.num_steps = 6
    c.eval_every_epochs = 0.0
    c.log_every_steps = 1
    c.checkpoint_every_steps = 3
    c.eval_batch_size = 64
    c.progress_bar = False
  return c

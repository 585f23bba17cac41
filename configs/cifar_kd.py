r"""CIFAR-100 (or -10) with the CRD paper code's recipe: teachers, students alone, and KD.

The recipe (RepDistiller, see ../shared/REFERENCES.md): 240 epochs, batch 64, SGD momentum
0.9, lr 0.05 (0.01 for MobileNetV2/ShuffleNet students), x0.1 at epochs 150, 180 and 210,
weight decay 5e-4, random crop 32 with padding 4 and horizontal flip. KD: gamma 0.1 on CE,
alpha 0.9 on KD, T = 4. The paper reports the last epoch's top-1.

Arg: `METHOD,MODEL[,STUDENT][,cifar10][,tiny]`:
- `ce,resnet56` trains resnet56 alone (a teacher, or a student baseline);
- `kd,resnet56,resnet20` distills resnet20 from the resnet56 teacher trained above.

    python scripts/prepare_data.py cifar100 --data_dir=$DATA      # once, with internet
    distill-jax --config=configs/cifar_kd.py:ce,resnet56 --workdir=runs/cifar100/resnet56 \
        --config.data.data_dir=$DATA
    distill-jax --config=configs/cifar_kd.py:kd,resnet56,resnet20 \
        --workdir=runs/cifar100/kd_resnet56_resnet20 --config.data.data_dir=$DATA \
        --config.teachers.teacher.checkpoint=runs/cifar100/resnet56

`tiny` shrinks the run to a few steps (for smoke tests).
"""

import ml_collections

from distill_jax.config import base_config
from distill_jax.data import default_data_config

METHODS = ("ce", "kd")
SMALL_LR_STUDENTS = ("mobilenetv2", "shufflev1", "shufflev2")


def get_config(arg: str = "kd,resnet56,resnet20") -> ml_collections.ConfigDict:
  parts = arg.split(",")
  options = {p for p in parts if p in ("cifar10", "tiny")}
  method, *names = [p for p in parts if p not in options]
  if method not in METHODS or len(names) != (1 if method == "ce" else 2):
    raise ValueError(f"configs/cifar_kd.py arg {arg!r}: expected ce,MODEL or "
                     f"METHOD,TEACHER,STUDENT with METHOD in {METHODS}.")
  dataset = "cifar10" if "cifar10" in options else "cifar100"
  c = base_config()
  c.data = default_data_config(dataset)
  c.data.augment = "crop_flip"
  c.data.crop_padding = 4
  c.batch_size = 64
  c.eval_batch_size = 500
  c.num_epochs = 240.0
  c.optim.lr = 0.01 if names[-1] in SMALL_LR_STUDENTS else 0.05
  c.optim.momentum = 0.9
  c.optim.weight_decay = 5e-4
  c.optim.schedule = "step"
  c.optim.decay_epochs = (150, 180, 210)
  c.optim.decay_factor = 0.1
  c.eval_every_epochs = 5.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.student.name = names[-1]
  if method == "kd":
    c.teachers = ml_collections.ConfigDict({"teacher": {
        "model": names[0], "kwargs": {}, "checkpoint": f"runs/{dataset}/{names[0]}"}})
    c.losses = ml_collections.ConfigDict(
        {"ce": {"weight": 0.1}, "kd": {"weight": 0.9, "temperature": 4.0}})
  if "tiny" in options:
    c.num_steps = 4
    c.eval_every_epochs = 0.0
    c.progress_bar = False
  return c

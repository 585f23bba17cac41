"""Optimizers and learning-rate schedules from the config, all in optax.

    config.optim = dict(name='sgd', lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4,
                        schedule='step', decay_epochs=(150, 180, 210), decay_factor=0.1,
                        warmup_epochs=0)

'sgd' adds weight decay to the gradient before momentum (PyTorch's coupled L2, as in the CRD
recipe); 'adamw' decouples it. Schedules: 'constant', 'step' (x decay_factor at each of
decay_epochs) and 'cosine' (to 0 at the end of training); each with an optional linear warm-up.
Epochs are turned into steps here, once, with the run's steps per epoch.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "step", "cosine")


def make_schedule(optim: Any, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """The learning-rate schedule, a function of the step."""
  lr = float(optim.lr)
  warmup = int(round(optim.warmup_epochs * steps_per_epoch))
  if optim.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif optim.schedule == "step":
    boundaries = {int(round(e * steps_per_epoch)) - warmup: float(optim.decay_factor)
                  for e in optim.decay_epochs}
    main = optax.piecewise_constant_schedule(lr, boundaries)
  elif optim.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1))
  else:
    raise ValueError(f"Unknown optim.schedule {optim.schedule!r}; choose one of {SCHEDULES}.")
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(optim: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
  """The optax optimizer named by `optim.name`, driven by `schedule`."""
  if optim.name == "sgd":
    return optax.chain(
        optax.add_decayed_weights(float(optim.weight_decay)),
        optax.sgd(schedule, momentum=float(optim.momentum) or None,
                  nesterov=bool(optim.nesterov)))
  if optim.name == "adamw":
    return optax.adamw(schedule, weight_decay=float(optim.weight_decay))
  raise ValueError(f"Unknown optim.name {optim.name!r}; choose one of {OPTIMIZERS}.")


def freeze_all_but(tx: optax.GradientTransformation, *, train_student: bool,
                   train_terms: dict[str, tuple[str, ...]]) -> optax.GradientTransformation:
  """`tx` on the student's params (if `train_student`) and on the named loss terms' params;
  every other parameter gets a zero update (no weight decay, no momentum).

  `train_terms` maps a term name to the sub-trees of its params that stay frozen (a term's
  `frozen_params`, e.g. FT's paraphraser while its translator trains).
  """

  def labels(params):
    def term_labels(name, tree):
      if name not in train_terms:
        return jax.tree.map(lambda _: "freeze", tree)
      return {sub: jax.tree.map(lambda _, f=sub in train_terms[name]: "freeze" if f else "train",
                                value) for sub, value in tree.items()}

    student = "train" if train_student else "freeze"
    return {"student": jax.tree.map(lambda _: student, params["student"]),
            "objective": {name: term_labels(name, tree)
                          for name, tree in params["objective"].items()}}

  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)

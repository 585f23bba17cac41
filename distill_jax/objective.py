"""The objective: the config's weighted sum of registered loss terms.

`config.losses` maps a term name to its settings:

    config.losses = {'ce': {'weight': 0.1}, 'kd': {'weight': 0.9, 'temperature': 4.0}}

Each term's `loss` names the registered loss (default: the term's own name, so two terms of
one loss just need distinct names and `loss='kd'`), `weight` scales it, `warmup_steps` ramps
the weight linearly from 0 (DKD's warm-up), and every other key is a hyper-parameter of the
loss, checked against its signature here, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from distill_jax.losses import LOSSES, loss_hparams
from distill_jax.outputs import Outputs

# Keys of a term's config that belong to the objective, not to the loss function.
TERM_KEYS = ("loss", "weight", "warmup_steps")


class ObjectiveError(ValueError):
  """A loss term is misconfigured or misbehaves; the message names the term."""


@dataclasses.dataclass(frozen=True)
class Term:
  """One weighted loss term of the objective."""

  name: str
  loss: str
  fn: Callable[..., jax.Array]
  weight: float
  warmup_steps: int
  hparams: Mapping[str, Any]

  def weight_at(self, step: jax.Array) -> jax.Array:
    if self.warmup_steps <= 0:
      return jnp.asarray(self.weight, jnp.float32)
    ramp = jnp.minimum(1.0, step.astype(jnp.float32) / self.warmup_steps)
    return self.weight * ramp


@dataclasses.dataclass(frozen=True)
class Objective:
  """Weighted sum of loss terms; returns the total and each term's unweighted value."""

  terms: tuple[Term, ...]

  @property
  def needs_teachers(self) -> bool:
    return any(getattr(t.fn, "uses_teachers", True) for t in self.terms)

  def __call__(self, params: Mapping[str, Any], student: Outputs,
               teachers: Mapping[str, Outputs], batch: Mapping[str, jax.Array],
               step: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    del params  # Trainable parts of loss terms (connectors, heads) will live here.
    total = jnp.zeros((), jnp.float32)
    values = {}
    for term in self.terms:
      value = term.fn(student, teachers, batch, **term.hparams)
      if jnp.shape(value) != ():
        raise ObjectiveError(f"Loss term {term.name!r} (loss {term.loss!r}) returned shape "
                             f"{jnp.shape(value)}; a loss term must return a scalar.")
      values[term.name] = value
      total = total + term.weight_at(step) * value
    return total, values


def build_objective(losses_config: Mapping[str, Any], teacher_names: list[str]) -> Objective:
  """Turns `config.losses` into an Objective, validating every name and hyper-parameter."""
  if not losses_config:
    raise ObjectiveError("config.losses is empty: name at least one loss term, e.g. "
                         "config.losses = {'ce': {'weight': 1.0}}.")
  terms = []
  for name, settings in losses_config.items():
    settings = dict(settings or {})
    loss_name = settings.pop("loss", name)
    fn = LOSSES.get(loss_name)
    weight = float(settings.pop("weight", 1.0))
    warmup_steps = int(settings.pop("warmup_steps", 0))
    known = loss_hparams(fn)
    unknown = sorted(set(settings) - set(known))
    if unknown:
      raise ObjectiveError(
          f"Loss term {name!r} (loss {loss_name!r}) has unknown setting(s) {unknown}. "
          f"Its hyper-parameters are {known or '{}'}; every term also takes {list(TERM_KEYS)}.")
    missing = sorted(k for k, v in known.items() if v is None and k not in settings
                     and k != "teacher")
    if missing:
      raise ObjectiveError(f"Loss term {name!r} (loss {loss_name!r}) needs {missing}.")
    teacher = settings.get("teacher")
    if teacher is not None and teacher not in teacher_names:
      raise ObjectiveError(f"Loss term {name!r} names teacher {teacher!r}, but the config's "
                           f"teachers are {sorted(teacher_names)}.")
    terms.append(Term(name, loss_name, fn, weight, warmup_steps, settings))
  objective = Objective(tuple(terms))
  if objective.needs_teachers and not teacher_names:
    needy = [t.name for t in terms if getattr(t.fn, "uses_teachers", True)]
    raise ObjectiveError(f"Loss term(s) {needy} distill from a teacher, but config.teachers "
                         "is empty. Add a teacher, or keep only 'ce' to train without one.")
  return objective

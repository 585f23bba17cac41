"""The objective: the config's weighted sum of registered loss terms.

`config.losses` maps a term name to its settings:

    config.losses = {'ce': {'weight': 0.1}, 'kd': {'weight': 0.9, 'temperature': 4.0}}

Each term's `loss` names the registered loss (default: the term's own name, so two terms of
one loss just need distinct names and `loss='kd'`), `weight` scales it, `warmup_steps` (or
`warmup_epochs`) ramps the weight linearly from 0 (DKD's warm-up), and every other key is a
hyper-parameter of the loss, checked against its signature here, before anything is compiled.

Terms that are Flax modules (connectors, projection heads, memory banks) keep their parameters
in `params['objective'][term]` (trained with the student) and their other collections
(batch stats, memory) in `state.objective_state[term]`. Terms name the features they compare
(`student_layer(s)`, `teacher_layer(s)`); the objective collects them so the forwards tap
exactly those.

Token terms over lazy logits (`config.fused_logits`) of one chunk length run together
(`Objective.fused_token_values`, `chunking.token_terms_means`): one rematerialised scan in
which each chunk's student and teacher logits are computed once for all of them, so the
backward pass carries one gradient of the student's head, not one per term. Their values,
weights, warm-ups and metrics are those of the terms computed one by one.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.common.outputs import Outputs
from distill_jax.common.rules import NON_NEGATIVE, NON_NEGATIVE_INT, Rule
from distill_jax.losses.base import (
  CONTEXT_HPARAMS,
  LOSSES,
  REQUIRED,
  STUDENT_LAYER_HPARAMS,
  TEACHER_LAYER_HPARAMS,
  is_module_loss,
  layer_names,
  loss_hparams,
  loss_ranges,
)
from distill_jax.losses.chunking import token_terms_means

# Keys of a term's config that belong to the objective, not to the loss function.
TERM_KEYS = ("loss", "weight", "warmup_steps", "warmup_epochs")
# The allowed values of the objective's numeric term keys (config validation checks them).
TERM_RANGES: dict[str, Rule] = {
    "weight": (NON_NEGATIVE, "the term's weight in the objective"),
    "warmup_steps": (NON_NEGATIVE_INT, "the weight's linear warm-up"),
    "warmup_epochs": (NON_NEGATIVE, "the weight's linear warm-up"),
}


class ObjectiveError(ValueError):
  """A loss term is misconfigured or misbehaves; the message names the term."""


@dataclasses.dataclass(frozen=True)
class Term:
  """One weighted loss term of the objective."""

  name: str
  loss: str
  fn: Callable[..., Any]  # The registered function, or the bound module for module losses.
  weight: float
  warmup_steps: int
  hparams: Mapping[str, Any]  # For functions: passed as keywords. For modules: in `fn`.
  student_features: tuple[str, ...]
  teacher_features: Mapping[str, tuple[str, ...]]  # teacher name -> features.

  @property
  def is_module(self) -> bool:
    return isinstance(self.fn, nn.Module)

  @property
  def uses_teachers(self) -> bool:
    return getattr(self.fn, "uses_teachers", True)

  def teachers_used(self, names: tuple[str, ...]) -> tuple[str, ...]:
    """Which of the teachers `names` this term reads: the one its `teacher` setting names,
    else all of them (none for a term that uses no teacher)."""
    if not self.uses_teachers:
      return ()
    named = getattr(self.fn, "teacher", None) if self.is_module else self.hparams.get("teacher")
    return (named,) if named in names else names

  @property
  def token_term(self) -> Callable[..., Any] | None:
    """The loss's `TokenTerm` maker when it is a token term that can share a scan
    (`chunking.token_term_loss`), else None."""
    return None if self.is_module else getattr(self.fn, "token_term", None)

  def weight_at(self, step: jax.Array) -> jax.Array:
    if self.warmup_steps <= 0:
      return jnp.asarray(self.weight, jnp.float32)
    ramp = jnp.minimum(1.0, step.astype(jnp.float32) / self.warmup_steps)
    return self.weight * ramp

  def value(self, variables: Mapping[str, Any], student: Outputs,
            teachers: Mapping[str, Outputs], batch: Mapping[str, jax.Array], rng: jax.Array,
            train: bool) -> tuple[jax.Array, dict[str, Any]]:
    """The term's unweighted value and its updated state (empty for functions)."""
    try:
      if not self.is_module:
        return self.fn(student, teachers, batch, **self.hparams), {}
      mutable = [c for c in variables if c != "params"] if train else []
      out = self.fn.apply(variables, student, teachers, batch, rngs={"loss": rng},
                          mutable=mutable or False)
      return out if mutable else (out, {})
    except (ValueError, KeyError, TypeError) as e:
      raise ObjectiveError(f"Loss term {self.name!r} (loss {self.loss!r}): {e}") from e


@dataclasses.dataclass(frozen=True)
class Objective:
  """Weighted sum of loss terms; returns the total, each term's value and the new state."""

  terms: tuple[Term, ...]

  @property
  def needs_teachers(self) -> bool:
    return any(t.uses_teachers for t in self.terms)

  def teachers_used(self, names: tuple[str, ...]) -> tuple[str, ...]:
    """The teachers (of `names`, in that order) that some term reads: the only ones whose
    forward a train step must run."""
    used = {n for term in self.terms for n in term.teachers_used(names)}
    return tuple(n for n in names if n in used)

  @property
  def student_features(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(f for t in self.terms for f in t.student_features))

  def teacher_features(self, teacher: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(f for t in self.terms for f in t.teacher_features.get(teacher, ())))

  def init(self, rng: jax.Array, student: Outputs, teachers: Mapping[str, Outputs],
           batch: Mapping[str, jax.Array]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params, state) of the module terms, keyed by term name, from example outputs."""
    params, state = {}, {}
    for i, term in enumerate(self.terms):
      if not term.is_module:
        continue
      init_rng, loss_rng = jax.random.split(jax.random.fold_in(rng, i))
      try:
        variables = dict(term.fn.init({"params": init_rng, "loss": loss_rng}, student, teachers,
                                      batch))
      except (ValueError, KeyError, TypeError) as e:
        raise ObjectiveError(f"Loss term {term.name!r} (loss {term.loss!r}): {e}") from e
      params[term.name] = variables.pop("params", {})
      state[term.name] = variables
    return params, state

  def fused_token_values(self, student: Outputs, teachers: Mapping[str, Outputs],
                         batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The values of the token terms that share a scan: with lazy student logits, the terms
    with a `token_term`, grouped by chunk length, each group of two or more computed in one
    scan (`chunking.token_terms_means`, inputs zeroed where the batch's mask drops them).
    {term name: value}; a term not in it is computed alone (`Term.value`)."""
    if not student.lazy:
      return {}
    groups: dict[int, dict[str, Any]] = {}
    for term in self.terms:
      if term.token_term is None:
        continue
      try:
        token_term = term.token_term(student, teachers, batch, **term.hparams)
      except (ValueError, KeyError, TypeError) as e:
        raise ObjectiveError(f"Loss term {term.name!r} (loss {term.loss!r}): {e}") from e
      groups.setdefault(token_term.chunk_size, {})[term.name] = token_term
    values = {}
    for group in groups.values():
      if len(group) > 1:
        values |= token_terms_means(group, batch.get("mask"))
    return values

  def __call__(self, params: Mapping[str, Any], state: Mapping[str, Any], student: Outputs,
               teachers: Mapping[str, Outputs], batch: Mapping[str, jax.Array],
               step: jax.Array, rng: jax.Array, train: bool = True
               ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, Any]]:
    total = jnp.zeros((), jnp.float32)
    values, new_state = {}, dict(state)
    fused = self.fused_token_values(student, teachers, batch)
    for i, term in enumerate(self.terms):
      variables = {"params": params.get(term.name, {}), **state.get(term.name, {})}
      if term.name in fused:
        value, updated = fused[term.name], {}
      else:
        value, updated = term.value(variables, student, teachers, batch,
                                    jax.random.fold_in(rng, i), train)
      if jnp.shape(value) != ():
        raise ObjectiveError(f"Loss term {term.name!r} (loss {term.loss!r}) returned shape "
                             f"{jnp.shape(value)}; a loss term must return a scalar.")
      if updated:
        new_state[term.name] = updated
      values[term.name] = value
      total = total + term.weight_at(step) * value
    return total, values, new_state


def build_objective(losses_config: Mapping[str, Any], teacher_names: list[str],
                    context: Mapping[str, Any] | None = None,
                    steps_per_epoch: int = 0) -> Objective:
  """Turns `config.losses` into an Objective, validating every name and hyper-parameter.

  Args:
    losses_config: term name -> settings (see the module docstring).
    teacher_names: the run's teachers, in config order.
    context: run settings for terms that declare them (`num_examples`).
    steps_per_epoch: turns a term's `warmup_epochs` into steps.
  """
  if not losses_config:
    raise ObjectiveError("config.losses is empty: name at least one loss term, e.g. "
                         "config.losses = {'ce': {'weight': 1.0}}.")
  context = {k: v for k, v in (context or {}).items() if k in CONTEXT_HPARAMS}
  terms = [_build_term(name, dict(settings or {}), teacher_names, context, steps_per_epoch)
           for name, settings in losses_config.items()]
  objective = Objective(tuple(terms))
  if objective.needs_teachers and not teacher_names:
    needy = [t.name for t in terms if t.uses_teachers]
    raise ObjectiveError(f"Loss term(s) {needy} distill from a teacher, but config.teachers "
                         "is empty. Add a teacher, or keep only 'ce' to train without one.")
  return objective


def term_ranges(loss: str) -> dict[str, Rule]:
  """The ranges of a term's settings: the objective's (`TERM_RANGES`) and those the registered
  loss `loss` declares (`register_loss(..., ranges=...)`); only the former for an unknown loss
  (the objective refuses that name itself)."""
  declared = loss_ranges(LOSSES.get(loss)) if loss in LOSSES else {}
  return {**TERM_RANGES, **declared}


def _build_term(name: str, settings: dict[str, Any], teacher_names: list[str],
                context: Mapping[str, Any], steps_per_epoch: int) -> Term:
  loss_name = settings.pop("loss", name)
  fn = LOSSES.get(loss_name)
  weight = float(settings.pop("weight", 1.0))
  warmup_steps = int(settings.pop("warmup_steps", 0))
  warmup_steps += int(round(float(settings.pop("warmup_epochs", 0)) * steps_per_epoch))
  known = loss_hparams(fn)
  unknown = sorted(set(settings) - set(known))
  if unknown:
    shown = {k: ("<required>" if v is REQUIRED else v) for k, v in known.items()}
    raise ObjectiveError(
        f"Loss term {name!r} (loss {loss_name!r}) has unknown setting(s) {unknown}. "
        f"Its hyper-parameters are {shown or '{}'}; every term also takes {list(TERM_KEYS)}.")
  missing = sorted(k for k, v in known.items() if v is REQUIRED and k not in settings)
  if missing:
    raise ObjectiveError(f"Loss term {name!r} (loss {loss_name!r}) needs {missing}.")
  hparams = {k: v for k, v in known.items() if v is not REQUIRED} | settings
  hparams = {k: tuple(v) if isinstance(v, list) else v for k, v in hparams.items()}
  teacher = hparams.get("teacher")
  if teacher is not None and teacher not in teacher_names:
    raise ObjectiveError(f"Loss term {name!r} names teacher {teacher!r}, but the config's "
                         f"teachers are {sorted(teacher_names)}.")
  teacher_features = {}
  wanted = layer_names(hparams, TEACHER_LAYER_HPARAMS)
  if wanted and teacher_names:
    if teacher is None and len(teacher_names) != 1:
      raise ObjectiveError(f"Loss term {name!r} compares teacher features, and there are "
                           f"{len(teacher_names)} teachers {sorted(teacher_names)}: set "
                           f"losses.{name}.teacher to the one it compares with.")
    teacher_features[teacher or teacher_names[0]] = wanted
  if is_module_loss(fn):
    fields = {f.name for f in dataclasses.fields(fn)}
    bound = fn(**hparams, **{k: v for k, v in context.items() if k in fields})
    fn_or_module, call_hparams = bound, {}
  else:
    fn_or_module, call_hparams = fn, hparams
    call_hparams |= {k: v for k, v in context.items() if k in _kwonly(fn)}
  return Term(name, loss_name, fn_or_module, weight, warmup_steps, call_hparams,
              layer_names(hparams, STUDENT_LAYER_HPARAMS), teacher_features)


def _kwonly(fn: Callable[..., Any]) -> set[str]:
  return {n for n, p in inspect.signature(fn).parameters.items()
          if p.kind is inspect.Parameter.KEYWORD_ONLY}

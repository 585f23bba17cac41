"""The loss registry and the helpers every loss term shares."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from distill_jax.outputs import Outputs
from distill_jax.registry import Registry

LOSSES = Registry("loss")


def register_loss(name: str, *, uses_teachers: bool = True) -> Callable[[Callable], Callable]:
  """Decorator: registers a loss term under `name`.

  `uses_teachers=False` marks a term that needs no teacher (e.g. cross-entropy), so a config
  that distills with no teacher is refused before anything is built.
  """

  def decorator(fn: Callable) -> Callable:
    fn.uses_teachers = uses_teachers
    return LOSSES.register(name)(fn)

  return decorator


def loss_hparams(fn: Callable[..., Any]) -> dict[str, Any]:
  """The keyword-only hyper-parameters of a loss term and their defaults (None: required)."""
  return {
      name: (None if p.default is inspect.Parameter.empty else p.default)
      for name, p in inspect.signature(fn).parameters.items()
      if p.kind is inspect.Parameter.KEYWORD_ONLY
  }


def example_weights(batch: Mapping[str, jax.Array], logits: jax.Array) -> jax.Array:
  """Per-example weights [B]: the batch's `mask` (1 real, 0 padding) or all ones."""
  mask = batch.get("mask")
  if mask is None:
    return jnp.ones(logits.shape[:1], logits.dtype)
  return mask.astype(logits.dtype)


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean of per-example `values` [B] under `weights` [B]; 0 for an all-padding batch."""
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def teacher_log_probs(teachers: Mapping[str, Outputs], temperature: float,
                      teacher: str | None = None) -> jax.Array:
  """Log-probabilities [B, K] of the named teacher, or of the mean of all teachers' probabilities.

  With one teacher and `teacher=None` this is that teacher's log-softmax at `temperature`.
  With several, the default target is the ensemble average of their probabilities at
  `temperature` (the usual multi-teacher KD target); name one to distill from it alone.
  """
  if not teachers:
    raise ValueError("This loss term needs a teacher, but the config names none "
                     "(config.teachers is empty).")
  if teacher is not None:
    if teacher not in teachers:
      raise ValueError(f"Loss names teacher {teacher!r}; the config's teachers are "
                       f"{sorted(teachers)}.")
    return jax.nn.log_softmax(teachers[teacher].logits / temperature, axis=-1)
  logps = jnp.stack([jax.nn.log_softmax(t.logits / temperature, axis=-1)
                     for t in teachers.values()])
  return jax.nn.logsumexp(logps, axis=0) - jnp.log(len(teachers))

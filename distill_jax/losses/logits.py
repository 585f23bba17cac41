"""Losses on logits: cross-entropy with the labels and Hinton's knowledge distillation."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from distill_jax.losses.base import example_weights, register_loss, teacher_log_probs, weighted_mean
from distill_jax.outputs import Outputs


@register_loss("ce", uses_teachers=False)
def cross_entropy(student: Outputs, teachers: Mapping[str, Outputs], batch: Mapping[str, jax.Array],
                  *, label_smoothing: float = 0.0) -> jax.Array:
  """Cross-entropy of the student's logits [B, K] with the integer labels [B]; batch mean.

  `label_smoothing` mixes the one-hot target with the uniform distribution (0: plain CE).
  """
  del teachers
  logits = student.logits
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(batch["label"], num_classes, dtype=logits.dtype)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  per_example = optax.softmax_cross_entropy(logits, targets)
  return weighted_mean(per_example, example_weights(batch, logits))


def kd_divergence(student_logits: jax.Array, teacher_log_probs: jax.Array,
                  temperature: float) -> jax.Array:
  """Per-example `T^2 * KL(p_T || softmax(s / T))` [B], from the teacher's log-probabilities.

  Computed from log-softmaxes (never log(softmax)), so extreme logits give no NaN or inf;
  terms where the teacher's probability is exactly 0 contribute 0, as in the limit.
  """
  student_logp = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  teacher_p = jnp.exp(teacher_log_probs)
  kl = jnp.sum(jnp.where(teacher_p > 0, teacher_p * (teacher_log_probs - student_logp), 0.0),
               axis=-1)
  return temperature**2 * kl


@register_loss("kd")
def knowledge_distillation(student: Outputs, teachers: Mapping[str, Outputs],
                           batch: Mapping[str, jax.Array], *, temperature: float = 4.0,
                           teacher: str | None = None) -> jax.Array:
  """Hinton et al. 2015: `T^2 * KL(softmax(t / T) || softmax(s / T))`, batch mean.

  The `T^2` factor keeps the gradient's scale independent of the temperature. `teacher`
  names one teacher; by default the target is the single teacher, or the average of all
  teachers' probabilities at the temperature.
  """
  target = jax.lax.stop_gradient(teacher_log_probs(teachers, temperature, teacher))
  per_example = kd_divergence(student.logits, target, temperature)
  return weighted_mean(per_example, example_weights(batch, student.logits))

"""Losses on logits: cross-entropy with the labels and the logit-matching distillation terms.

Registered here: `ce` (labels), `kd` (Hinton et al. 2015), `dkd` (decoupled KD, Zhao et al.
2022), `logit_mse` (regression on the logits), `reverse_kl` and `gjsd` (generalized
Jensen-Shannon divergence, Agarwal et al. 2024).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from distill_jax.common.outputs import Outputs
from distill_jax.common.rules import FRACTION, NON_NEGATIVE, UNIT_INTERVAL, Rule
from distill_jax.losses.base import (
  TEACHER_WEIGHTS,
  TEMPERATURE,
  check_teacher,
  dropped_outputs,
  example_weights,
  kl,
  masked_mean,
  register_loss,
  teacher_log_probs,
  teacher_weights,
  weighted_mean,
  zero_dropped,
)


def _masked_mean(values: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
  """`base.masked_mean` of per-position `values` [B, ...] under the batch's `mask`."""
  return masked_mean(values, batch.get("mask"))


def _student_logits(student: Outputs, batch: Mapping[str, jax.Array]) -> jax.Array:
  """The student's logits [B, ..., K], zeroed at the positions the batch's `mask` drops
  (`base.zero_dropped`): a NaN or inf there (padding) then gives a finite value and a zero
  gradient, where dropping the per-example value alone would leave a NaN gradient."""
  return zero_dropped(student.logits, batch.get("mask"))


def _teacher_logits(teachers: Mapping[str, Outputs], batch: Mapping[str, jax.Array],
                    teacher: str | None, aggregation: str,
                    weights: tuple[float, ...]) -> jax.Array:
  """Logits [B, ..., K] of the named teacher, or the teachers' logits averaged with the per-example
  weights of `aggregation` (`base.teacher_weights`)."""
  check_teacher(teachers, teacher)
  teachers = dropped_outputs(teachers, batch.get("mask"))
  if teacher is not None:
    return teachers[teacher].logits
  stacked = jnp.stack([t.logits for t in teachers.values()])
  w = teacher_weights(teachers, aggregation, weights, batch.get("label"))
  return jnp.sum(w.reshape(w.shape + (1,) * (stacked.ndim - w.ndim)) * stacked, axis=0)


def _target_log_probs(teachers: Mapping[str, Outputs], batch: Mapping[str, jax.Array],
                      temperature: float, teacher: str | None, aggregation: str,
                      weights: tuple[float, ...]) -> jax.Array:
  """The (gradient-stopped) target distribution of every divergence term: `teacher_log_probs`
  with the term's teacher and aggregation settings."""
  return jax.lax.stop_gradient(teacher_log_probs(
      dropped_outputs(teachers, batch.get("mask")), temperature, teacher,
      aggregation=aggregation, weights=weights, labels=batch.get("label")))


@register_loss("ce", uses_teachers=False,
               ranges={"label_smoothing": (FRACTION, "the label smoothing")})
def cross_entropy(student: Outputs, teachers: Mapping[str, Outputs], batch: Mapping[str, jax.Array],
                  *, label_smoothing: float = 0.0) -> jax.Array:
  """Cross-entropy of the student's logits [B, K] with the integer labels [B]; batch mean.

  `label_smoothing` mixes the one-hot target with the uniform distribution (0: plain CE).
  """
  del teachers
  logits = _student_logits(student, batch)
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
  return temperature**2 * kl(teacher_log_probs, student_logp)


@register_loss("kd", ranges={"temperature": TEMPERATURE, "teacher_weights": TEACHER_WEIGHTS})
def knowledge_distillation(student: Outputs, teachers: Mapping[str, Outputs],
                           batch: Mapping[str, jax.Array], *, temperature: float = 4.0,
                           teacher: str | None = None, aggregation: str = "mean",
                           teacher_weights: tuple[float, ...] = ()) -> jax.Array:
  """Hinton et al. 2015: `T^2 * KL(softmax(t / T) || softmax(s / T))`, batch mean.

  The `T^2` factor keeps the gradient's scale independent of the temperature. `teacher`
  names one teacher; by default the target is the single teacher, or with several the
  mixture of their probabilities at the temperature, weighted by `aggregation`: 'mean',
  'weighted' (fixed `teacher_weights`, in config order), 'entropy' or 'true_label'
  (per-example confidence; see `base.teacher_weights`).
  """
  target = _target_log_probs(teachers, batch, temperature, teacher, aggregation, teacher_weights)
  per_example = kd_divergence(_student_logits(student, batch), target, temperature)
  return weighted_mean(per_example, example_weights(batch, student.logits))


def _target_split(log_probs: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Splits log-probabilities [..., K] at the target class `labels` [...] (DKD).

  Returns `binary` [..., 2] = `[log p_y, log(1 - p_y)]` and `non_target` [..., K] =
  `log(p_k / (1 - p_y))` for k != y (the non-target classes renormalised) and -inf at k = y.
  `log(1 - p_y)` is the log-sum-exp of the non-target log-probabilities, so it stays exact when
  `p_y` rounds to 1 (no `1 - p` cancellation). A label outside [0, K) (padding, an ignore index)
  gives finite values of no meaning, for the mask to drop.
  """
  is_target = labels[..., None] == jnp.arange(log_probs.shape[-1])
  log_target = jnp.sum(jnp.where(is_target, log_probs, 0.0), axis=-1)
  others = jnp.where(is_target, -jnp.inf, log_probs)
  log_rest = jax.nn.logsumexp(others, axis=-1)
  binary = jnp.stack([log_target, log_rest], axis=-1)
  non_target = jnp.where(is_target, -jnp.inf, log_probs - log_rest[..., None])
  return binary, non_target


def dkd_divergences(student_logits: jax.Array, teacher_log_probs: jax.Array, labels: jax.Array,
                    temperature: float) -> tuple[jax.Array, jax.Array]:
  """Per-example DKD parts `(TCKD, NCKD)`, each [B] (or [...]), both times `T^2`.

  With `p = softmax(logits / T)` [B, K] and the target class y:
    TCKD = T^2 * KL([p_T(y), 1 - p_T(y)] || [p_S(y), 1 - p_S(y)])   (binary KL),
    NCKD = T^2 * KL(p_T(k | k != y) || p_S(k | k != y)),  p(k | k != y) = p_k / (1 - p_y).
  They decompose KD exactly: `KL(p_T || p_S) = TCKD + (1 - p_T(y)) * NCKD` (Zhao et al. 2022,
  eq. 3). The non-target distributions exclude the target class exactly (the reference
  implementation subtracts 1000 from its logit instead).
  """
  student_logp = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  student_binary, student_nt = _target_split(student_logp, labels)
  teacher_binary, teacher_nt = _target_split(teacher_log_probs, labels)
  tckd = kl(teacher_binary, student_binary)
  nckd = kl(teacher_nt, student_nt)
  return temperature**2 * tckd, temperature**2 * nckd


@register_loss("dkd", ranges={
    "alpha": (NON_NEGATIVE, "the weight of the target-class part"),
    "beta": (NON_NEGATIVE, "the weight of the non-target part"),
    "temperature": TEMPERATURE, "teacher_weights": TEACHER_WEIGHTS})
def decoupled_kd(student: Outputs, teachers: Mapping[str, Outputs],
                 batch: Mapping[str, jax.Array], *, alpha: float = 1.0, beta: float = 8.0,
                 temperature: float = 4.0, teacher: str | None = None, aggregation: str = "mean",
                 teacher_weights: tuple[float, ...] = ()) -> jax.Array:
  """Decoupled KD (Zhao et al., CVPR 2022): `alpha * TCKD + beta * NCKD`, batch mean.

  TCKD is the binary KL between the teacher's and the student's `[p(y), 1 - p(y)]` at
  temperature T, NCKD the KL between their distributions over the non-target classes
  renormalised; both carry `T^2` (see `dkd_divergences`). Logits [B, K] (or [..., K]) and
  integer labels `batch['label']` [B] (or [...]). With `alpha = beta = 1` the loss is not KD:
  KD weighs NCKD by `1 - p_T(y)`, which DKD decouples.

  Defaults are the paper's CIFAR-100 setting (alpha 1, beta 8, T 4; beta 2 for res56/res110
  teachers, 6 for vgg13 and WRN pairs; ImageNet: beta 0.5, T 1), used beside a `ce` term of
  weight 1. The paper's warm-up (the DKD weight ramped linearly over the first 20 epochs) is
  the objective's generic setting of the term, not done here:
  `config.losses.dkd.warmup_steps = 20 * steps_per_epoch`. `teacher`, `aggregation` and
  `teacher_weights` as in `kd`: with several teachers the target is their mixture at T.
  """
  target = _target_log_probs(teachers, batch, temperature, teacher, aggregation, teacher_weights)
  tckd, nckd = dkd_divergences(_student_logits(student, batch), target, batch["label"],
                               temperature)
  return _masked_mean(alpha * tckd + beta * nckd, batch)


@register_loss("logit_mse", ranges={"teacher_weights": TEACHER_WEIGHTS})
def logit_mse(student: Outputs, teachers: Mapping[str, Outputs], batch: Mapping[str, jax.Array],
              *, teacher: str | None = None, aggregation: str = "mean",
              teacher_weights: tuple[float, ...] = ()) -> jax.Array:
  """Regression on the logits: `mean_k (s_k - t_k)^2` per example, then the batch mean.

  Logits [B, K] (or [..., K]). With several teachers and `teacher=None` the target is the
  average of the teachers' logits, weighted per example by `aggregation` (as in `kd`; 'mean'
  by default).
  (Ba & Caruana 2014 regress on logits; Kim et al. 2021 compare this "logit MSE" with KD.)
  """
  target = jax.lax.stop_gradient(
      _teacher_logits(teachers, batch, teacher, aggregation, teacher_weights))
  diff = _student_logits(student, batch) - target.astype(student.logits.dtype)
  return _masked_mean(jnp.mean(jnp.square(diff), axis=-1), batch)


@register_loss("reverse_kl",
               ranges={"temperature": TEMPERATURE, "teacher_weights": TEACHER_WEIGHTS})
def reverse_kl(student: Outputs, teachers: Mapping[str, Outputs],
               batch: Mapping[str, jax.Array], *, temperature: float = 1.0,
               teacher: str | None = None, aggregation: str = "mean",
               teacher_weights: tuple[float, ...] = ()) -> jax.Array:
  """Reverse KL: `T^2 * KL(softmax(s / T) || p_T)`, batch mean (mode-seeking, unlike `kd`).

  Logits [B, K] (or [..., K]); `p_T` is the teacher's softmax at T (with several teachers
  and `teacher=None`, their mixture as `kd` makes it with `aggregation` and
  `teacher_weights`). `T^2` as in `kd`.
  """
  target = _target_log_probs(teachers, batch, temperature, teacher, aggregation, teacher_weights)
  student_logp = jax.nn.log_softmax(_student_logits(student, batch) / temperature, axis=-1)
  return _masked_mean(temperature**2 * kl(student_logp, target), batch)


# gjsd's and token_jsd's beta (see `generalized_jsd`).
JSD_BETA: Rule = (UNIT_INTERVAL, "the mixture weight: 0 is forward KL, 1 reverse KL")


def generalized_jsd(student_log_probs: jax.Array, teacher_log_probs: jax.Array,
                    beta: float) -> jax.Array:
  """Per-position generalized JSD [...] of log-probabilities [..., K] (Agarwal et al. 2024).

  With `M = beta * p_T + (1 - beta) * p_S`:
    JSD_beta = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M)   for 0 < beta < 1,
  `log M` being the log-sum-exp of `(log beta + log p_T, log(1 - beta) + log p_S)`. The raw
  formula is 0 at both endpoints, so, as TRL's `generalized_jsd_loss`, beta = 0 is defined as
  the forward `KL(p_T || p_S)` and beta = 1 as the reverse `KL(p_S || p_T)`.
  """
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"gjsd needs 0 <= beta <= 1, got {beta}.")
  if beta == 0.0:
    return kl(teacher_log_probs, student_log_probs)
  if beta == 1.0:
    return kl(student_log_probs, teacher_log_probs)
  log_m = jnp.logaddexp(math.log(beta) + teacher_log_probs,
                        math.log1p(-beta) + student_log_probs)
  return beta * kl(teacher_log_probs, log_m) + (1.0 - beta) * kl(student_log_probs, log_m)


@register_loss("gjsd", ranges={
    "beta": JSD_BETA, "temperature": TEMPERATURE, "teacher_weights": TEACHER_WEIGHTS})
def gjsd(student: Outputs, teachers: Mapping[str, Outputs], batch: Mapping[str, jax.Array], *,
         beta: float = 0.5, temperature: float = 1.0, teacher: str | None = None,
         aggregation: str = "mean", teacher_weights: tuple[float, ...] = ()) -> jax.Array:
  """Generalized Jensen-Shannon divergence (GKD, Agarwal et al., ICLR 2024); batch mean.

  `p_T`, `p_S` are the softmaxes at `temperature` of the teacher's and student's logits
  [B, K] or, per token, [B, L, K]; the batch `mask` ([B] or [B, L]) is broadcast over the
  trailing positions and the sum is divided by the number of kept positions. beta = 0 is
  forward KL, beta = 1 reverse KL, in between `JSD_beta` with the mixture
  `M = beta * p_T + (1 - beta) * p_S` (see `generalized_jsd`). Unlike `kd` and `reverse_kl`
  there is no `T^2` factor, as in TRL's `generalized_jsd_loss`. `teacher`, `aggregation` and
  `teacher_weights` as in `kd`.
  """
  target = _target_log_probs(teachers, batch, temperature, teacher, aggregation, teacher_weights)
  student_logp = jax.nn.log_softmax(_student_logits(student, batch) / temperature, axis=-1)
  return _masked_mean(generalized_jsd(student_logp, target, beta), batch)

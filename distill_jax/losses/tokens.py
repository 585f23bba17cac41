"""Token-level divergences for language models: the student's distribution over the whole
vocabulary against the teacher's (or the data's), at every position.

Registered here: `token_ce` (next-token cross-entropy), `token_fkl` (forward KL, the usual
word-level KD), `token_rkl` (reverse KL, MiniLLM's mode-seeking direction), `token_jsd`
(generalized JSD, GKD) and `token_skew_kl` (skew KL, DistiLLM). The other token-level terms:
against a teacher known by its top-k tokens (a cache, a black-box API) in token_topk.py;
between hidden states and attention in token_layers.py.

Shapes: logits [B, L, V]; the batch carries `targets` [B, L] (the next token of each position)
and `mask` [B, L] (1 where a position's loss counts, 0 for padding and document ends). Every
term is the mean over the kept tokens (`base.masked_mean`): the sum over kept tokens divided by
their number, so long and short sequences weigh each token alike. Every input (the student's
and the teachers' logits) is zeroed at the dropped positions before any math reads it
(`base.zero_dropped`), so what a model puts there (NaN or inf at padding) changes neither the
value nor the gradient, which is 0 there.

Chunking: with `chunk_size = C > 0` the per-token values are computed C positions at a time
(`chunking.token_mean`), so the [B, L, V] float32 intermediates exist for one chunk at a time,
forward and backward; the result equals the unchunked one (`chunk_size = 0`) to float
rounding. With lazy logits (`config.fused_logits`, `Outputs.head`) the chunks are of the final
hidden states and each chunk's logits, the student's and the live teachers', are computed in
the chunk, so the [B, L, V] logits never exist whole either (`chunking.fused_chunk_size`).
Each loss is written as its `chunking.TokenTerm` (the models it reads and its per-token values
from their chunk logits) wrapped by `token_term_loss`: alone, the loss is that term's mean; in
an objective, the lazy terms of one chunk length share one scan (`token_terms_means`).

With several teachers and `teacher=None` the target is, per token, the mixture of the
teachers' distributions weighted by `aggregation` (`base.teacher_weights`: 'mean',
'weighted', 'entropy' or 'true_label', the last with the token's target as the label).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from distill_jax.common.outputs import Outputs
from distill_jax.common.rules import FRACTION
from distill_jax.losses.base import (
  TEACHER_WEIGHTS,
  TEMPERATURE,
  check_teacher,
  check_vocab,
  kl,
  register_loss,
  teacher_log_probs,
)
from distill_jax.losses.chunking import TokenTerm, fused_chunk_size, token_term_loss
from distill_jax.losses.logits import JSD_BETA, generalized_jsd


def _token_rows(x: jax.Array) -> jax.Array:
  """[B, C, ...] -> [B * C, ...]: tokens as rows, for the per-example helpers."""
  return x.reshape(-1, *x.shape[2:])


def _target_log_probs(teacher_logits: Mapping[str, jax.Array], targets: jax.Array,
                      temperature: float, teacher: str | None, aggregation: str,
                      weights: tuple[float, ...]) -> jax.Array:
  """The per-token target log-probabilities [B, C, V] (gradient stopped) from teachers' logits
  [B, C, V]: the named teacher's, or the teachers' per-token mixture under `aggregation`."""
  flat = {n: Outputs(_token_rows(x), {}, {}) for n, x in teacher_logits.items()}
  logp = teacher_log_probs(flat, temperature, teacher, aggregation=aggregation,
                           weights=weights, labels=_token_rows(targets))
  return jax.lax.stop_gradient(logp.reshape(targets.shape + logp.shape[-1:]))


def teacher_key(name: str) -> str:
  """A teacher's key among a `TokenTerm`'s models."""
  return f"teacher:{name}"


def _divergence_term(divergence: Callable[[jax.Array, jax.Array], jax.Array],
                     student: Outputs, teachers: Mapping[str, Outputs],
                     batch: Mapping[str, jax.Array], temperature: float, chunk_size: int,
                     teacher: str | None, aggregation: str, weights: tuple[float, ...]
                     ) -> TokenTerm:
  """The `TokenTerm` of `divergence(student_logp, teacher_logp)` ([B, C, V] -> [B, C]), both
  at `temperature`: a masked token mean computed in chunks."""
  check_teacher(teachers, teacher)
  check_vocab(student, teachers)

  def values(logits, extras):
    teacher_logits = {n: logits[teacher_key(n)] for n in read}
    target = _target_log_probs(teacher_logits, extras["targets"], temperature, teacher,
                               aggregation, weights)
    student_logp = jax.nn.log_softmax(logits["student"].astype(jnp.float32) / temperature, -1)
    return divergence(student_logp, target)

  read = {teacher: teachers[teacher]} if teacher is not None else teachers
  models = {"student": student, **{teacher_key(n): t for n, t in read.items()}}
  return TokenTerm(models, values, {"targets": batch["targets"]},
                   fused_chunk_size(chunk_size, student, teachers), batch.get("mask"))


@register_loss("token_ce", uses_teachers=False, fused_logits=True)
@token_term_loss
def token_ce(student: Outputs, teachers: Mapping[str, Outputs], batch: Mapping[str, jax.Array],
             *, chunk_size: int = 0) -> TokenTerm:
  """Next-token cross-entropy `-log softmax(s)[target]`, mean over the kept tokens (nats)."""
  del teachers

  def values(logits, extras):
    logp = jax.nn.log_softmax(logits["student"].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, extras["targets"][..., None], axis=-1)[..., 0]

  return TokenTerm({"student": student}, values, {"targets": batch["targets"]},
                   fused_chunk_size(chunk_size, student), batch.get("mask"))


@register_loss("token_fkl", fused_logits=True,
               ranges={"temperature": TEMPERATURE, "teacher_weights": TEACHER_WEIGHTS})
@token_term_loss
def token_fkl(student: Outputs, teachers: Mapping[str, Outputs], batch: Mapping[str, jax.Array],
              *, temperature: float = 1.0, chunk_size: int = 0, teacher: str | None = None,
              aggregation: str = "mean", teacher_weights: tuple[float, ...] = ()) -> TokenTerm:
  """Forward KL per token, `T^2 * KL(p_T || p_S)` at temperature T, mean over kept tokens.

  Word-level KD (Kim & Rush 2016; Hinton et al.'s KD applied at every position): mean-seeking,
  the student spreads its mass over everything the teacher deems likely. `T^2` as in `kd`.
  """
  scale = temperature**2
  return _divergence_term(lambda s, t: scale * kl(t, s), student, teachers, batch, temperature,
                          chunk_size, teacher, aggregation, teacher_weights)


@register_loss("token_rkl", fused_logits=True,
               ranges={"temperature": TEMPERATURE, "teacher_weights": TEACHER_WEIGHTS})
@token_term_loss
def token_rkl(student: Outputs, teachers: Mapping[str, Outputs], batch: Mapping[str, jax.Array],
              *, temperature: float = 1.0, chunk_size: int = 0, teacher: str | None = None,
              aggregation: str = "mean", teacher_weights: tuple[float, ...] = ()) -> TokenTerm:
  """Reverse KL per token, `T^2 * KL(p_S || p_T)`, mean over kept tokens.

  Mode-seeking (MiniLLM, Gu et al. 2024, use it at the sequence level; here it is the
  token-level divergence on the data's prefixes): the student concentrates on the teacher's
  modes instead of covering its tails.
  """
  scale = temperature**2
  return _divergence_term(lambda s, t: scale * kl(s, t), student, teachers, batch, temperature,
                          chunk_size, teacher, aggregation, teacher_weights)


@register_loss("token_jsd", fused_logits=True, ranges={
  "beta": JSD_BETA, "temperature": TEMPERATURE, "teacher_weights": TEACHER_WEIGHTS})
@token_term_loss
def token_jsd(student: Outputs, teachers: Mapping[str, Outputs], batch: Mapping[str, jax.Array],
              *, beta: float = 0.5, temperature: float = 1.0, chunk_size: int = 0,
              teacher: str | None = None, aggregation: str = "mean",
              teacher_weights: tuple[float, ...] = ()) -> TokenTerm:
  """Generalized JSD per token (GKD, Agarwal et al., ICLR 2024), mean over kept tokens.

  `beta * KL(p_T || M) + (1 - beta) * KL(p_S || M)` with `M = beta p_T + (1 - beta) p_S`;
  beta = 0 is forward KL and beta = 1 reverse KL (see `logits.generalized_jsd`). No `T^2`
  factor, as `gjsd`.
  """
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"token_jsd needs 0 <= beta <= 1, got beta={beta}.")
  return _divergence_term(lambda s, t: generalized_jsd(s, t, beta), student, teachers, batch,
                          temperature, chunk_size, teacher, aggregation, teacher_weights)


def skew_kl(log_p: jax.Array, log_q: jax.Array, alpha: float) -> jax.Array:
  """`KL(p || alpha p + (1 - alpha) q)` over the last axis, from log-probabilities [..., V].

  The mixture's log is a log-sum-exp, so it is exact for tiny probabilities; `alpha = 0` is
  `KL(p || q)`, and for `alpha > 0` the value is bounded by `log(1 / alpha)`.
  """
  if alpha == 0.0:
    return kl(log_p, log_q)
  log_m = jnp.logaddexp(math.log(alpha) + log_p, math.log1p(-alpha) + log_q)
  return kl(log_p, log_m)


@register_loss("token_skew_kl", fused_logits=True, ranges={
  "alpha": (FRACTION, "the skew: the share of the first distribution in the mixture"),
  "temperature": TEMPERATURE, "teacher_weights": TEACHER_WEIGHTS})
@token_term_loss
def token_skew_kl(student: Outputs, teachers: Mapping[str, Outputs],
                  batch: Mapping[str, jax.Array], *, alpha: float = 0.1, reverse: bool = False,
                  temperature: float = 1.0, chunk_size: int = 0, teacher: str | None = None,
                  aggregation: str = "mean", teacher_weights: tuple[float, ...] = ()
                  ) -> TokenTerm:
  """Skew KL per token (DistiLLM, Ko et al., ICML 2024), times `T^2`, mean over kept tokens.

  Forward (`reverse=False`): `KL(p_T || alpha p_T + (1 - alpha) p_S)`; reverse:
  `KL(p_S || alpha p_S + (1 - alpha) p_T)`. Mixing a little of the first distribution into the
  second bounds the divergence (by `log 1/alpha`) and its gradients early in training; the
  paper uses alpha = 0.1. alpha = 0 is plain forward (reverse) KL.
  """
  if not 0.0 <= alpha < 1.0:
    raise ValueError(f"token_skew_kl needs 0 <= alpha < 1, got alpha={alpha}.")
  scale = temperature**2
  if reverse:
    divergence = lambda s, t: scale * skew_kl(s, t, alpha)
  else:
    divergence = lambda s, t: scale * skew_kl(t, s, alpha)
  return _divergence_term(divergence, student, teachers, batch, temperature, chunk_size,
                          teacher, aggregation, teacher_weights)

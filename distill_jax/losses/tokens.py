"""Token-level losses for language models, computed in chunks along the sequence.

Registered here: `token_ce` (next-token cross-entropy), `token_fkl` (forward KL, the usual
word-level KD), `token_rkl` (reverse KL, MiniLLM's mode-seeking direction), `token_jsd`
(generalized JSD, GKD), `token_skew_kl` (skew KL, DistiLLM), `token_topk_kd` (KL against the
teacher's top-k log-probabilities plus the remaining mass, what a top-k teacher cache holds)
and `token_sparse_topk_kd` (a black-box teacher's top-k log-probabilities from its output file);
between chosen layers, `token_hidden_mse` (hidden states, through a learned connector when the
widths differ) and `token_attention_kl` (attention probabilities, MiniLM).

Shapes: logits [B, L, V]; the batch carries `targets` [B, L] (the next token of each position)
and `mask` [B, L] (1 where a position's loss counts, 0 for padding and document ends). Every
term is the mean over the kept tokens (`base.masked_mean`): the sum over kept tokens divided by
their number, so long and short sequences weigh each token alike. Every input (the student's
and the teachers' logits, a cache's top-k, hidden states, attention) is zeroed at the dropped
positions before any math reads it (`base.zero_dropped`), so what a model puts there (NaN or
inf at padding) changes neither the value nor the gradient, which is 0 there.

Chunking: with `chunk_size = C > 0` the per-token values are computed C positions at a time in
a `lax.scan` whose body is rematerialised (`jax.checkpoint`), so the float32 log-softmaxes,
probabilities and mixtures of the student and the teachers (each [B, L, V], several per term)
and their gradients exist for one chunk [B, C, V] at a time, forward and backward. The
models' logits themselves are inputs of the term and are not duplicated (the chunks are
`dynamic_slice`s of them). The result equals the unchunked one (`chunk_size = 0`) to float
rounding. A remainder of `L % C` positions is one more, smaller chunk.

With several teachers and `teacher=None` the target is, per token, the mixture of the
teachers' distributions weighted by `aggregation` (`base.teacher_weights`: 'mean',
'weighted', 'entropy' or 'true_label', the last with the token's target as the label).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.losses.base import (
  TEACHER_WEIGHTS,
  TEMPERATURE,
  check_teacher,
  feature_pairs,
  kl,
  layer_tuple,
  masked_mean,
  register_loss,
  shape_mismatch,
  teacher_log_probs,
  zero_dropped,
)
from distill_jax.losses.logits import JSD_BETA, generalized_jsd
from distill_jax.outputs import Outputs
from distill_jax.rules import FRACTION

# Tapped features a top-k teacher (a cache) may provide instead of full logits.
TOPK_LOG_PROBS, TOPK_INDICES, TOPK_LOG_REST = "topk_log_probs", "topk_indices", "topk_log_rest"


def chunked_per_token(fn: Callable[[Any], jax.Array], arrays: Any, chunk_size: int,
                      mask: jax.Array | None = None) -> jax.Array:
  """Per-token values [B, L] of `fn`, computed `chunk_size` positions at a time.

  `arrays` is a pytree of arrays laid out [B, L, ...]; `fn` maps the same pytree with every
  leaf cut to [B, C, ...] (a run of C positions) to values [B, C]. Each chunk's forward is
  recomputed in the backward pass (`jax.checkpoint`), so only one chunk's intermediates are
  alive at a time. `chunk_size <= 0` or `>= L`: one call on the whole arrays.

  With `mask` [B, L] (1 kept, 0 dropped), `fn` sees every float leaf zeroed at the dropped
  positions (`base.zero_dropped`, per chunk, fused into `fn`'s first read: no extra pass over
  the logits), so a NaN or inf there (a model's logits at padding) gives finite values and a
  gradient of exactly 0 at those positions, not the NaN of `where(mask, f(NaN), 0)`. The
  values at dropped positions are then those of zero inputs, for `masked_mean` to drop.
  """
  if mask is not None:
    arrays, inner = (arrays, mask), fn
    fn = lambda pair: inner(jax.tree.map(lambda x: zero_dropped(x, pair[1]), pair[0]))
  length = jax.tree.leaves(arrays)[0].shape[1]
  if chunk_size <= 0 or chunk_size >= length:
    return fn(arrays)
  num_chunks, rest = divmod(length, chunk_size)

  # The slicing is inside the rematerialised function, so what the backward pass keeps of a
  # chunk is its index, not a copy of its slices (which, stacked, would be the whole arrays).
  @jax.checkpoint
  def chunk_values(arrays, i):
    return fn(jax.tree.map(
        lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk_size, chunk_size, axis=1), arrays))

  _, values = jax.lax.scan(lambda carry, i: (carry, chunk_values(arrays, i)), None,
                           jnp.arange(num_chunks))  # [n, B, C]
  values = jnp.moveaxis(values, 0, 1).reshape(values.shape[1], num_chunks * chunk_size)
  if rest:
    tail = jax.tree.map(lambda x: x[:, num_chunks * chunk_size:], arrays)
    values = jnp.concatenate([values, jax.checkpoint(fn)(tail)], axis=1)
  return values


def token_mean(fn: Callable[[Any], jax.Array], arrays: Any, chunk_size: int,
               mask: jax.Array | None) -> jax.Array:
  """The mean over the kept tokens (`masked_mean`) of `fn`'s per-token values, computed in
  chunks on inputs zeroed at the dropped positions (`chunked_per_token` with `mask`): the
  reduction of every token-level divergence."""
  return masked_mean(chunked_per_token(fn, arrays, chunk_size, mask), mask)


def _flat(x: jax.Array) -> jax.Array:
  """[B, C, ...] -> [B * C, ...]: tokens as examples, for the per-example helpers."""
  return x.reshape(-1, *x.shape[2:])


def _target_log_probs(teacher_logits: Mapping[str, jax.Array], targets: jax.Array,
                      temperature: float, teacher: str | None, aggregation: str,
                      weights: tuple[float, ...]) -> jax.Array:
  """The per-token target log-probabilities [B, C, V] (gradient stopped) from teachers' logits
  [B, C, V]: the named teacher's, or the teachers' per-token mixture under `aggregation`."""
  flat = {n: Outputs(_flat(x), {}, {}) for n, x in teacher_logits.items()}
  logp = teacher_log_probs(flat, temperature, teacher, aggregation=aggregation,
                           weights=weights, labels=_flat(targets))
  return jax.lax.stop_gradient(logp.reshape(targets.shape + logp.shape[-1:]))


def _divergence_term(divergence: Callable[[jax.Array, jax.Array], jax.Array],
                     student: Outputs, teachers: Mapping[str, Outputs],
                     batch: Mapping[str, jax.Array], temperature: float, chunk_size: int,
                     teacher: str | None, aggregation: str, weights: tuple[float, ...]
                     ) -> jax.Array:
  """Masked token mean of `divergence(student_logp, teacher_logp)` ([B, C, V] -> [B, C]), both
  at `temperature`, computed in chunks."""
  check_teacher(teachers, teacher)
  _check_vocab(student, teachers)
  arrays = {"student": student.logits, "targets": batch["targets"],
            "teachers": {n: t.logits for n, t in teachers.items()}}

  def per_token(chunk):
    target = _target_log_probs(chunk["teachers"], chunk["targets"], temperature, teacher,
                               aggregation, weights)
    student_logp = jax.nn.log_softmax(chunk["student"].astype(jnp.float32) / temperature, -1)
    return divergence(student_logp, target)

  return token_mean(per_token, arrays, chunk_size, batch.get("mask"))


def _check_vocab(student: Outputs, teachers: Mapping[str, Outputs]) -> None:
  """Raises unless every teacher's vocabulary (last axis of its logits) is the student's."""
  size = student.logits.shape[-1]
  for name, t in teachers.items():
    if t.logits is not None and t.logits.shape[-1] != size:
      raise ValueError(
          f"Teacher {name!r} predicts over a vocabulary of {t.logits.shape[-1]} tokens and the "
          f"student over {size}: token-level distillation needs one vocabulary (the same "
          "tokenizer for both models).")


@register_loss("token_ce", uses_teachers=False)
def token_ce(student: Outputs, teachers: Mapping[str, Outputs], batch: Mapping[str, jax.Array],
             *, chunk_size: int = 0) -> jax.Array:
  """Next-token cross-entropy `-log softmax(s)[target]`, mean over the kept tokens (nats)."""
  del teachers

  def per_token(chunk):
    logp = jax.nn.log_softmax(chunk["logits"].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, chunk["targets"][..., None], axis=-1)[..., 0]

  return token_mean(per_token, {"logits": student.logits, "targets": batch["targets"]},
                    chunk_size, batch.get("mask"))


@register_loss("token_fkl",
               ranges={"temperature": TEMPERATURE, "teacher_weights": TEACHER_WEIGHTS})
def token_fkl(student: Outputs, teachers: Mapping[str, Outputs], batch: Mapping[str, jax.Array],
              *, temperature: float = 1.0, chunk_size: int = 0, teacher: str | None = None,
              aggregation: str = "mean", teacher_weights: tuple[float, ...] = ()) -> jax.Array:
  """Forward KL per token, `T^2 * KL(p_T || p_S)` at temperature T, mean over kept tokens.

  Word-level KD (Kim & Rush 2016; Hinton et al.'s KD applied at every position): mean-seeking,
  the student spreads its mass over everything the teacher deems likely. `T^2` as in `kd`.
  """
  scale = temperature**2
  return _divergence_term(lambda s, t: scale * kl(t, s), student, teachers, batch, temperature,
                          chunk_size, teacher, aggregation, teacher_weights)


@register_loss("token_rkl",
               ranges={"temperature": TEMPERATURE, "teacher_weights": TEACHER_WEIGHTS})
def token_rkl(student: Outputs, teachers: Mapping[str, Outputs], batch: Mapping[str, jax.Array],
              *, temperature: float = 1.0, chunk_size: int = 0, teacher: str | None = None,
              aggregation: str = "mean", teacher_weights: tuple[float, ...] = ()) -> jax.Array:
  """Reverse KL per token, `T^2 * KL(p_S || p_T)`, mean over kept tokens.

  Mode-seeking (MiniLLM, Gu et al. 2024, use it at the sequence level; here it is the
  token-level divergence on the data's prefixes): the student concentrates on the teacher's
  modes instead of covering its tails.
  """
  scale = temperature**2
  return _divergence_term(lambda s, t: scale * kl(s, t), student, teachers, batch, temperature,
                          chunk_size, teacher, aggregation, teacher_weights)


@register_loss("token_jsd", ranges={
  "beta": JSD_BETA, "temperature": TEMPERATURE, "teacher_weights": TEACHER_WEIGHTS})
def token_jsd(student: Outputs, teachers: Mapping[str, Outputs], batch: Mapping[str, jax.Array],
              *, beta: float = 0.5, temperature: float = 1.0, chunk_size: int = 0,
              teacher: str | None = None, aggregation: str = "mean",
              teacher_weights: tuple[float, ...] = ()) -> jax.Array:
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


@register_loss("token_skew_kl", ranges={
  "alpha": (FRACTION, "the skew: the share of the first distribution in the mixture"),
  "temperature": TEMPERATURE, "teacher_weights": TEACHER_WEIGHTS})
def token_skew_kl(student: Outputs, teachers: Mapping[str, Outputs],
                  batch: Mapping[str, jax.Array], *, alpha: float = 0.1, reverse: bool = False,
                  temperature: float = 1.0, chunk_size: int = 0, teacher: str | None = None,
                  aggregation: str = "mean", teacher_weights: tuple[float, ...] = ()
                  ) -> jax.Array:
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


def _topk_mask(indices: jax.Array, vocab: int) -> jax.Array:
  """[..., V] booleans, True at the token ids `indices` [..., k] (a scatter: no [.., k, V])."""
  flat = indices.reshape(-1, indices.shape[-1])
  rows = jnp.arange(flat.shape[0])[:, None]
  mask = jnp.zeros((flat.shape[0], vocab), bool).at[rows, flat].set(True)
  return mask.reshape(*indices.shape[:-1], vocab)


def topk_kl(student_log_probs: jax.Array, topk_log_probs: jax.Array, topk_indices: jax.Array,
            log_rest: jax.Array) -> jax.Array:
  """KL between the teacher and the student over k + 1 outcomes: the teacher's top-k tokens
  and "any other token".

  Args:
    student_log_probs: [..., V] the student's log-softmax.
    topk_log_probs: [..., k] the teacher's log-probabilities of its top-k tokens.
    topk_indices: [..., k] those tokens' ids (distinct).
    log_rest: [...] log of the teacher's remaining mass `1 - sum_k p_k` (-inf when none).
  Returns:
    [...] `sum_k p_k log(p_k / q_k) + r log(r / q_rest)`, `q_rest` the student's mass outside
    the k tokens, itself a log-sum-exp (exact, no `1 - sum` cancellation). With k = V and
    r = 0 this is the full forward KL.
  """
  in_topk = _topk_mask(topk_indices, student_log_probs.shape[-1])
  student_top = jnp.take_along_axis(student_log_probs, topk_indices, axis=-1)
  student_rest = jax.nn.logsumexp(jnp.where(in_topk, -jnp.inf, student_log_probs), axis=-1)
  teacher = jnp.concatenate([topk_log_probs, log_rest[..., None]], axis=-1)
  student = jnp.concatenate([student_top, student_rest[..., None]], axis=-1)
  return kl(teacher, student)


def teacher_topk(logits: jax.Array, k: int, temperature: float = 1.0
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A teacher's top-k view of its logits [..., V] at `temperature`: (log-probs [..., k], token
  ids [..., k], log of the remaining mass [...]) — what a top-k cache stores per token."""
  if not 1 <= k <= logits.shape[-1]:
    raise ValueError(f"top-k needs 1 <= k <= the vocabulary ({logits.shape[-1]}), got k={k}.")
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  top, idx = jax.lax.top_k(logp, k)
  in_topk = _topk_mask(idx, logp.shape[-1])
  log_rest = jax.nn.logsumexp(jnp.where(in_topk, -jnp.inf, logp), axis=-1)
  return top, idx, log_rest


@register_loss("token_topk_kd", ranges={"temperature": TEMPERATURE})
def token_topk_kd(student: Outputs, teachers: Mapping[str, Outputs],
                  batch: Mapping[str, jax.Array], *, k: int = 8, temperature: float = 1.0,
                  chunk_size: int = 0, teacher: str | None = None) -> jax.Array:
  """Top-k KD per token: forward KL against the teacher's top-k distribution plus the mass of
  every other token lumped into one outcome (`topk_kl`), times `T^2`, mean over kept tokens.

  The teacher is live (its logits are cut to top-k at `temperature` per chunk) or a top-k cache
  whose outputs carry the features `topk_log_probs` [B, L, k'], `topk_indices` [B, L, k'] and
  `topk_log_rest` [B, L] (at the temperature it was written with; `k` is then k'). One teacher:
  a top-k view does not mix across teachers. A teacher read from a `data.teacher_cache` with
  `top_k = k'` gives exactly its top k <= k' tokens and their remaining mass; a larger `k` would
  read the cache's even spread of the rest as the teacher's, so a run refuses it.
  """
  check_teacher(teachers, teacher)
  if teacher is None and len(teachers) != 1:
    raise ValueError(f"token_topk_kd distills from one teacher, but there are {len(teachers)} "
                     f"({sorted(teachers)}): set the term's `teacher`.")
  target = teachers[teacher] if teacher is not None else next(iter(teachers.values()))
  if TOPK_LOG_PROBS in target.features:
    arrays = {name: target.features[name]
              for name in (TOPK_LOG_PROBS, TOPK_INDICES, TOPK_LOG_REST)}
  else:
    _check_vocab(student, {teacher or "teacher": target})
    arrays = {"logits": target.logits}
  arrays["student"] = student.logits

  def per_token(chunk):
    if "logits" in chunk:
      top, idx, rest = teacher_topk(chunk["logits"], k, temperature)
    else:
      top, idx, rest = (chunk[n] for n in (TOPK_LOG_PROBS, TOPK_INDICES, TOPK_LOG_REST))
    top, rest = jax.lax.stop_gradient((top, rest))
    student_logp = jax.nn.log_softmax(chunk["student"].astype(jnp.float32) / temperature, -1)
    return temperature**2 * topk_kl(student_logp, top, idx, rest)

  return token_mean(per_token, arrays, chunk_size, batch.get("mask"))


# The setting that says how many of the teacher's most likely tokens the term reads: a teacher
# read from a top-k cache must hold at least that many (`train.build.check_cache_top_k`).
token_topk_kd.teacher_top_k = "k"


def sparse_topk_kl(student_log_probs: jax.Array, topk_log_probs: jax.Array,
                   topk_ids: jax.Array, topk_valid: jax.Array) -> jax.Array:
  """KL from a teacher known only by some tokens' probabilities (an API's top-k, mapped to the
  student's vocabulary) and the mass it leaves to all other tokens.

  The target has the valid entries' tokens and one more outcome, "any other token": p_i =
  exp(topk_log_probs_i) for the valid entries and the rest r = 1 - sum_i p_i (the teacher's
  mass beyond its top-k and on alternatives that did not map). Where the p_i sum to more
  than 1 (rounded log-probs, or alternatives that overlap once mapped) they are divided by
  their sum and r = 0: nothing is renormalised otherwise, so a teacher that is unsure
  (r large) asks the student to be unsure too. As `topk_kl`, with the student's q_i of the
  same tokens and q_rest its mass on every other token (a log-sum-exp):

      sum_i p_i log(p_i / q_i) + r log(r / q_rest)

  Args:
    student_log_probs: [..., V] the student's log-softmax.
    topk_log_probs: [..., k] the teacher's log-probabilities of tokens `topk_ids` [..., k]
      (the valid ones distinct).
    topk_valid: [..., k] 1 for the entries that are real (mapped) tokens, 0 for padding.
  Returns:
    [...] the KL: >= 0, 0 only when the student gives each valid token its p_i (and so the
    other tokens r together); 0 where no entry is valid.
  """
  valid = topk_valid > 0
  teacher = jnp.where(valid, topk_log_probs.astype(jnp.float32), -jnp.inf)
  total = jax.nn.logsumexp(teacher, axis=-1, keepdims=True)  # log sum_i p_i; -inf if none.
  teacher = teacher - jnp.maximum(total, 0.0)  # Divided by the sum only where it exceeds 1.
  below = jnp.minimum(total, -jnp.finfo(jnp.float32).tiny)
  log_rest = jnp.where(total < 0, jnp.log(-jnp.expm1(below)), -jnp.inf)
  flat_ids = topk_ids.reshape(-1, topk_ids.shape[-1])
  rows = jnp.arange(flat_ids.shape[0])[:, None]
  in_topk = jnp.zeros((flat_ids.shape[0], student_log_probs.shape[-1]), bool).at[
      rows, flat_ids].max(valid.reshape(flat_ids.shape)).reshape(student_log_probs.shape)
  student_top = jnp.take_along_axis(student_log_probs, topk_ids, axis=-1)
  student_rest = jax.nn.logsumexp(jnp.where(in_topk, -jnp.inf, student_log_probs), axis=-1,
                                  keepdims=True)
  values = kl(jnp.concatenate([teacher, log_rest], axis=-1),
              jnp.concatenate([student_top, student_rest], axis=-1))
  return jnp.where(jnp.any(valid, axis=-1), values, 0.0)


@register_loss("token_sparse_topk_kd", uses_teachers=False)
def token_sparse_topk_kd(student: Outputs, teachers: Mapping[str, Outputs],
                         batch: Mapping[str, jax.Array], *, chunk_size: int = 0) -> jax.Array:
  """Top-k KD from a black-box teacher: the KL of `sparse_topk_kl` (the teacher's mapped
  top-k probabilities plus the rest of its mass as one outcome) against the top-k
  log-probabilities its output file gave per token (`data.text.blackbox`: batch keys `topk_ids`,
  `topk_logprobs`, `topk_valid` [B, L, k]), mean over the kept positions that have at least
  one mapped token. No live teacher is needed (`teachers` is not read)."""
  del teachers
  missing = [key for key in ("topk_ids", "topk_logprobs", "topk_valid") if key not in batch]
  if missing:
    raise ValueError("token_sparse_topk_kd reads a black-box teacher's top-k log-probabilities "
                     f"from the batch, which has no {missing}: use data.name='jsonl' with a "
                     "teacher-output file that has top_logprobs (docs/blackbox.md).")
  arrays = {"student": student.logits, "ids": batch["topk_ids"],
            "log_probs": batch["topk_logprobs"], "valid": batch["topk_valid"]}

  def per_token(chunk):
    student_logp = jax.nn.log_softmax(chunk["student"].astype(jnp.float32), axis=-1)
    return sparse_topk_kl(student_logp, jax.lax.stop_gradient(chunk["log_probs"]),
                          chunk["ids"], chunk["valid"])

  has_teacher = jnp.any(batch["topk_valid"] > 0, axis=-1).astype(jnp.float32)
  mask = batch.get("mask")
  mask = has_teacher if mask is None else mask * has_teacher
  return token_mean(per_token, arrays, chunk_size, mask)


# ------------------------------------------------------------------ hidden states, attention


@register_loss("token_hidden_mse")
class TokenHiddenMSE(nn.Module):
  """Hidden-state distillation (TinyBERT, Jiao et al. 2020): per token, the mean squared
  difference between a student layer's hidden states [B, L, Ds] and a teacher layer's
  [B, L, Dt], mean over the kept tokens, summed over the layer pairs.

  The layer map pairs `student_layers[i]` with `teacher_layers[i]` (e.g. student `hidden1`,
  `hidden2` <- teacher `hidden2`, `hidden4`: student layer i <- teacher layer 2i). When the
  widths differ, a learned linear map (`connector{i}`, no bias; TinyBERT's W_h) takes the
  student's states to the teacher's width; with equal widths they are compared directly.
  """

  student_layers: str | tuple[str, ...] = ("hidden1",)
  teacher_layers: str | tuple[str, ...] = ("hidden2",)
  teacher: str | None = None

  @nn.compact
  def __call__(self, student: Outputs, teachers: Mapping[str, Outputs],
               batch: Mapping[str, jax.Array]) -> jax.Array:
    s_names, t_names = layer_tuple(self.student_layers), layer_tuple(self.teacher_layers)
    pairs = feature_pairs(student, teachers, s_names, t_names, self.teacher)
    mask = batch.get("mask")
    total = jnp.zeros((), jnp.float32)
    for i, ((s, t), s_name, t_name) in enumerate(zip(pairs, s_names, t_names, strict=True)):
      if s.ndim != 3 or s.shape[:2] != t.shape[:2]:
        raise shape_mismatch("token_hidden_mse", s_name, s.shape, t_name, t.shape,
                             "Compare hidden states [batch, length, width] of the same rows.")
      # Zeroed at dropped positions before the connector too: its kernel's gradient sums
      # over every row, and a NaN row there would reach it as 0 * NaN.
      s, t = zero_dropped(s, mask), zero_dropped(t, mask)
      if s.shape[-1] != t.shape[-1]:
        s = nn.Dense(t.shape[-1], use_bias=False, name=f"connector{i}")(s)
      per_token = jnp.mean(jnp.square(s.astype(jnp.float32) - t.astype(jnp.float32)), axis=-1)
      total = total + masked_mean(per_token, mask)
    return total


@register_loss("token_attention_kl")
def token_attention_kl(student: Outputs, teachers: Mapping[str, Outputs],
                       batch: Mapping[str, jax.Array], *,
                       student_layers: str | tuple[str, ...] = ("block0/attn/probs",),
                       teacher_layers: str | tuple[str, ...] = ("block1/attn/probs",),
                       teacher: str | None = None, floor: float = 1e-12) -> jax.Array:
  """Attention-distribution transfer (MiniLM, Wang et al. 2020): per query token and head,
  `KL(A_T || A_S)` between the teacher's and the student's attention probabilities
  [B, H, L, L] of the paired layers; mean over heads, then over the kept (query) tokens,
  summed over the pairs. Both need the same number of heads. The student's probabilities are
  floored at `floor` before the log (a softmax can underflow to exactly 0 where the teacher
  attends); keys the teacher never attends to (masked: p = 0) contribute 0.
  """
  s_names, t_names = layer_tuple(student_layers), layer_tuple(teacher_layers)
  pairs = feature_pairs(student, teachers, s_names, t_names, teacher)
  mask = batch.get("mask")
  query_mask = None if mask is None else mask[:, None]  # [B, 1, L]: over heads and keys.
  total = jnp.zeros((), jnp.float32)
  for (s, t), s_name, t_name in zip(pairs, s_names, t_names, strict=True):
    if s.ndim != 4 or s.shape != t.shape:
      raise shape_mismatch("token_attention_kl", s_name, s.shape, t_name, t.shape,
                           "Compare attention probabilities [batch, heads, length, length] "
                           "of layers with as many heads (or a student with the teacher's "
                           "number of heads).")
    s, t = zero_dropped(s, query_mask), zero_dropped(t, query_mask)
    log_t = jnp.log(jnp.where(t > 0, t, 1.0)) + jnp.where(t > 0, 0.0, -jnp.inf)
    per_head = kl(log_t.astype(jnp.float32), jnp.log(jnp.maximum(s, floor)).astype(jnp.float32))
    total = total + masked_mean(jnp.mean(per_head, axis=1), mask)
  return total

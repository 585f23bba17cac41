"""Token-level KD against a teacher known only by its most likely tokens.

Registered here: `token_topk_kd` (KL against the teacher's top-k log-probabilities plus the
remaining mass, from a live teacher cut to top-k or from what a top-k teacher cache holds) and
`token_sparse_topk_kd` (a black-box teacher's top-k log-probabilities from its output file,
mapped to the student's vocabulary: `data.text.blackbox`).

Shapes, masks and chunking as the other token losses (tokens.py, chunking.py): logits
[B, L, V], `mask` [B, L], the mean over the kept tokens, computed `chunk_size` positions at a
time on inputs zeroed at the dropped positions; with lazy logits (`config.fused_logits`) the
student's and a live teacher's logits are computed per chunk from their hidden states, as in
tokens.py. Neither teacher is dense on the host: a top-k cache reaches the device as its packed
records [B, L, 1 + 2k] and is decoded there (`data.teacher_cache.unpack`; per chunk with lazy
logits), a black-box file as [B, L, k] ids, log-probabilities and validity.

Each loss is built from its `chunking.TokenTerm` (`token_term_loss`), so the objective can run
it in one scan with the other token terms.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from distill_jax.common.outputs import Outputs
from distill_jax.losses.base import TEMPERATURE, check_teacher, check_vocab, kl, register_loss
from distill_jax.losses.chunking import TokenTerm, fused_chunk_size, token_term_loss
from distill_jax.losses.tokens import teacher_key

# Tapped features a top-k teacher (a cache) may provide instead of full logits.
TOPK_LOG_PROBS, TOPK_INDICES, TOPK_LOG_REST = "topk_log_probs", "topk_indices", "topk_log_rest"


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


@register_loss("token_topk_kd", fused_logits=True, ranges={"temperature": TEMPERATURE})
@token_term_loss
def token_topk_kd(student: Outputs, teachers: Mapping[str, Outputs],
                  batch: Mapping[str, jax.Array], *, k: int = 8, temperature: float = 1.0,
                  chunk_size: int = 0, teacher: str | None = None) -> TokenTerm:
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
  name = teacher if teacher is not None else next(iter(teachers))
  target = teachers[name]
  models, cached = {"student": student}, TOPK_LOG_PROBS in target.features
  if cached:
    extras = {n: target.features[n] for n in (TOPK_LOG_PROBS, TOPK_INDICES, TOPK_LOG_REST)}
  else:
    check_vocab(student, {name: target})
    models[teacher_key(name)], extras = target, {}

  def values(logits, extras):
    if cached:
      top, idx, rest = (extras[n] for n in (TOPK_LOG_PROBS, TOPK_INDICES, TOPK_LOG_REST))
    else:
      top, idx, rest = teacher_topk(logits[teacher_key(name)], k, temperature)
    top, rest = jax.lax.stop_gradient((top, rest))
    student_logp = jax.nn.log_softmax(logits["student"].astype(jnp.float32) / temperature, -1)
    return temperature**2 * topk_kl(student_logp, top, idx, rest)

  return TokenTerm(models, values, extras,
                   fused_chunk_size(chunk_size, student, {name: target}), batch.get("mask"))


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


@register_loss("token_sparse_topk_kd", uses_teachers=False, fused_logits=True)
@token_term_loss
def token_sparse_topk_kd(student: Outputs, teachers: Mapping[str, Outputs],
                         batch: Mapping[str, jax.Array], *, chunk_size: int = 0) -> TokenTerm:
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
  extras = {"ids": batch["topk_ids"], "log_probs": batch["topk_logprobs"],
            "valid": batch["topk_valid"]}

  def values(logits, extras):
    student_logp = jax.nn.log_softmax(logits["student"].astype(jnp.float32), axis=-1)
    return sparse_topk_kl(student_logp, jax.lax.stop_gradient(extras["log_probs"]),
                          extras["ids"], extras["valid"])

  has_teacher = jnp.any(batch["topk_valid"] > 0, axis=-1).astype(jnp.float32)
  mask = batch.get("mask")
  mask = has_teacher if mask is None else mask * has_teacher
  return TokenTerm({"student": student}, values, extras, fused_chunk_size(chunk_size, student),
                   mask)

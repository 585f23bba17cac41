"""MiniLLM (Gu et al., ICLR 2024, arXiv 2306.08543): the sequence-level reverse KL
KL(q_θ || p) minimised by policy gradient on sequences the student samples itself.

`token_rkl` is the reverse KL per token on the data's prefixes; MiniLLM is the reverse KL of
whole sequences, whose prefixes come from the student (the on-policy rollout,
`tasks.language_model.on_policy`), so the student is also credited for how its choices steer
the rest of the sequence. For a prompt x and a response y = y_1..y_T, with the per-step log
ratio r_t = log p(y_t | y_<t, x) - log q_θ(y_t | y_<t, x) (p the teacher, q_θ the student):

    (1)  L(θ) = KL(q_θ || p) = -E_{y ~ q_θ} [ Σ_t r_t ]
    (2)  ∇L(θ) = -E_{y ~ q_θ} [ Σ_t (R_t - 1) ∇ log q_θ(y_t | y_<t, x) ],   R_t = Σ_{t' >= t} r_t'

the policy gradient with the reward-to-go R_t (the -1 has expectation 0 and is dropped).
The paper's three refinements:

- **Single-step decomposition** (Eq. 3): R_t = r_t + R_{t+1}, and the r_t part is taken
  exactly over the vocabulary instead of from the one sampled token:

      ∇L = (∇L)_Single + (∇L)_Long
      (∇L)_Single = -E_y [ Σ_t ∇ E_{y_t ~ q_θ(t)} [r_t] ]
                  =  E_y [ Σ_t ∇ KL(q_θ(·|y_<t, x) || p(·|y_<t, x)) ]
      (∇L)_Long   = -E_y [ Σ_t R_{t+1} ∇ log q_θ(y_t | y_<t, x) ]

  (the prefix y_<t fixed: no gradient flows through the sampling). The single-step part is
  the gradient of the per-step reverse KL, exact at every position; only the long-term part
  needs the sampled future. `single_step=False` gives the plain estimator (2).
- **Teacher-mixed sampling** (Eq. 4, 5): the sequences are drawn from the per-step mixture
  p̃(y_t | y_<t, x) = α p(y_t | y_<t, x) + (1 - α) q_θ(y_t | y_<t, x)  (α = `teacher_mix`,
  0.2 in the paper; the on-policy rollout samples from it, see below), which keeps the
  samples away from the degenerate text an early student writes; the estimate is corrected
  with importance weights w_t = q_θ(y_t | ·) / p̃(y_t | ·). The exact weight of a step is the
  product over the steps so far, which has a large variance; the paper approximates it by the
  single step's ratio (`importance='token'`) and clips it as PPO does in its Algorithm 1:
  the long-term part is -R ∇ min(ρ_t, clip(ρ_t, 1 - ε, 1 + ε)) (for R < 0, max) with
  ρ_t = q_θ(y_t | ·) / p̃(y_t | ·) and ε = `clip` (0: no clipping). `importance='sequence'`
  uses the exact products instead (per-decision importance sampling: the single-step term of
  step t is weighted by W_{t-1} = Π_{k<t} w_k, and each reward r_t' in the reward-to-go by
  W_t' = Π_{k<=t'} w_k), which makes the estimate unbiased for any α (without clipping);
  both are the same when α = 0 (all weights 1).
- **Length normalisation** (Eq. 6): the long-term reward is averaged over the remaining steps,
  R^Norm_{t+1} = R_{t+1} / (number of kept steps after t) (0 when none; the paper writes
  1 / (T - t - 1) for this count), so long samples do not get larger rewards only for being
  long and short ones are not favoured (`length_norm`).

With length normalisation, the per-step weights or clipping the estimate is no longer the
exact gradient of (1) (the paper's trade of bias for variance); with `importance='sequence'`,
no clipping and no length normalisation it is an unbiased estimate of ∇L, which
tests/test_minillm.py checks against the exact gradient of a tiny model by enumerating every
sequence.

Reduction: like every token term, a mean over the batch's kept tokens (the generated ones):
the sum over the sampled sequences of the per-step surrogate, divided by their tokens. Its
value is the estimate of the sequence-level reverse KL per generated token, Σ_t (weight) ·
KL(q_θ(·|y_<t) || p(·|y_<t)) / tokens (the long-term part adds a gradient and no value);
its gradient is the estimator above, divided by the tokens.

What this term needs from the run (checked by the language model's `validate`): every batch
the student's own samples (`config.on_policy.fraction = 1`, at temperature 1, no top-k, so
that the sampling distribution is q_θ or p̃); with `teacher_mix = α > 0` the rollout samples
from p̃ (the task asks each term's `rollout_mixture`). The paper's pre-training loss (CE on
the corpus beside the policy gradient) is not included: the rollout replaces every row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from distill_jax.common.outputs import Outputs
from distill_jax.common.rules import FRACTION, NON_NEGATIVE
from distill_jax.losses.base import check_teacher, check_vocab, kl, masked_mean, register_loss
from distill_jax.losses.chunking import chunked_per_token, fused_chunk_size

IMPORTANCE = ("token", "sequence")


def step_values(student: Outputs, teacher: Outputs, batch: Mapping[str, jax.Array],
                chunk_size: int) -> dict[str, jax.Array]:
  """Per position [B, L], computed C positions at a time (`chunked_per_token`): `kl`, the
  reverse KL(q_θ || p) of the next-token distributions (gradient through q_θ); `logq`, the
  student's log-probability of the target (gradient through it); `logp`, the teacher's
  (no gradient)."""
  arrays = {"student": student.token_inputs(), "teacher": teacher.token_inputs(),
            "targets": batch["targets"]}

  def per_token(chunk):
    logq = jax.nn.log_softmax(student.logits_of(chunk["student"]).astype(jnp.float32), -1)
    logp = jax.lax.stop_gradient(jax.nn.log_softmax(
        teacher.logits_of(chunk["teacher"]).astype(jnp.float32), -1))
    take = lambda x: jnp.take_along_axis(x, chunk["targets"][..., None], axis=-1)[..., 0]
    return {"kl": kl(logq, logp), "logq": take(logq), "logp": take(logp)}

  return chunked_per_token(per_token, arrays, fused_chunk_size(chunk_size, student, {"t": teacher}),
                           batch.get("mask"))


def _future_sum(x: jax.Array, inclusive: bool) -> jax.Array:
  """Σ_{t' > t} x_t' (or t' >= t) along axis 1 of [B, L]."""
  total = jnp.cumsum(x[:, ::-1], axis=1)[:, ::-1]
  return total if inclusive else total - x


def surrogate(kl_t: jax.Array, logq: jax.Array, logp: jax.Array, mask: jax.Array, *,
              teacher_mix: float, importance: str, clip: float, length_norm: bool,
              single_step: bool) -> jax.Array:
  """Per-token surrogate [B, L] whose masked sum has the MiniLLM estimate as its gradient and
  the weighted sum of the per-step reverse KLs as its value (see the module docstring).

  `kl_t`, `logq`, `logp`, `mask`: [B, L] (`step_values`; mask 1 on the sampled targets).
  Rows are sequences: the reward-to-go of a position sums the kept positions after it.
  """
  m = mask.astype(jnp.float32)
  lq = jax.lax.stop_gradient(logq)
  reward = m * (logp - lq)  # r_t
  if teacher_mix > 0:  # log w_t = log q - log p̃, p̃ = α p + (1 - α) q.
    log_mix = jnp.logaddexp(math.log(teacher_mix) + logp, math.log1p(-teacher_mix) + lq)
    log_w = m * (lq - log_mix)
  else:
    log_w = jnp.zeros_like(lq)
  if importance == "sequence":
    log_prefix = jnp.cumsum(log_w, axis=1)  # log W_t = Σ_{k <= t} log w_k
    kl_weight = jnp.exp(log_prefix - log_w)  # W_{t-1}
    reward = jnp.exp(log_prefix) * reward  # W_t' r_t'
    pg_weight = jnp.ones_like(lq)
  else:
    kl_weight = pg_weight = jnp.exp(log_w)  # w_t, the paper's per-step approximation
  advantage = _future_sum(reward, inclusive=not single_step)  # R_{t+1} (or R_t)
  if length_norm:
    advantage = advantage / jnp.maximum(_future_sum(m, inclusive=not single_step), 1.0)
  ratio = pg_weight * jnp.exp(logq - lq)  # value w_t (or 1), gradient w_t ∇ log q
  long_term = ratio - jax.lax.stop_gradient(ratio)  # value 0
  if clip > 0:  # PPO's clip: no gradient where the clipped ratio is the one the min keeps.
    clipped = (((advantage > 0) & (pg_weight > 1 + clip))
               | ((advantage < 0) & (pg_weight < 1 - clip)))
    long_term = jnp.where(clipped, 0.0, long_term)
  single = kl_weight * kl_t
  if not single_step:
    single = jax.lax.stop_gradient(single)  # Still the value; the gradient is all in R_t.
  return m * (single - jax.lax.stop_gradient(advantage) * long_term)


def rollout_mixture(hparams: Mapping[str, Any], teacher_names: Sequence[str]
                    ) -> tuple[str, float]:
  """(teacher, α): the mixture α p + (1 - α) q_θ the term's samples must be drawn from (α = 0:
  the student alone); raises ValueError when the teacher is ambiguous. The language model's
  on-policy rollout asks every term that has this (`on_policy.rollout_mixture`)."""
  teacher = hparams.get("teacher")
  if teacher is None:
    if len(teacher_names) != 1:
      raise ValueError(f"minillm compares sequences with one teacher, and there are "
                       f"{len(teacher_names)} {sorted(teacher_names)}: set its teacher.")
    teacher = teacher_names[0]
  return teacher, float(hparams.get("teacher_mix", 0.0))


@register_loss("minillm", fused_logits=True, ranges={
  "teacher_mix": (FRACTION, "α of the sampling mixture α p + (1 - α) q"),
  "clip": (NON_NEGATIVE, "PPO's ε for the importance ratio (0: none)")})
def minillm(student: Outputs, teachers: Mapping[str, Outputs], batch: Mapping[str, jax.Array],
            *, teacher_mix: float = 0.2, importance: str = "token", clip: float = 0.2,
            length_norm: bool = True, single_step: bool = True, teacher: str | None = None,
            chunk_size: int = 0) -> jax.Array:
  """MiniLLM's policy-gradient estimate of the sequence-level reverse KL, on the student's
  samples (see the module docstring); the value is the reverse KL per generated token.

  Defaults are the paper's: teacher-mixed sampling with α = 0.2, per-step importance weights
  clipped at ε = 0.2, length normalisation, the single-step decomposition.
  """
  if importance not in IMPORTANCE:
    raise ValueError(f"minillm's importance is {importance!r}; choose 'token' (the paper's "
                     "per-step weights) or 'sequence' (exact products).")
  if importance == "sequence" and clip > 0:
    raise ValueError(f"minillm's clip={clip} clips the per-step ratio of importance='token'; "
                     "with importance='sequence' set clip=0.")
  check_teacher(teachers, teacher)
  check_vocab(student, teachers)
  name, _ = rollout_mixture({"teacher": teacher}, list(teachers))
  values = step_values(student, teachers[name], batch, chunk_size)
  mask = batch.get("mask")
  if mask is None:
    mask = jnp.ones(batch["targets"].shape, jnp.float32)
  per_token = surrogate(values["kl"], values["logq"], values["logp"], mask,
                        teacher_mix=teacher_mix, importance=importance, clip=clip,
                        length_norm=length_norm, single_step=single_step)
  return masked_mean(per_token, mask)


minillm.rollout_mixture = rollout_mixture

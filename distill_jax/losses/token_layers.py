"""Token-level KD between chosen layers of a language model: hidden states and attention.

Registered here: `token_hidden_mse` (hidden states, TinyBERT, through a learned connector when
the widths differ) and `token_attention_kl` (attention probabilities, MiniLM). Layers are
tapped by name (`hiddenN`, `blockN/attn/probs` of `transformer_lm`). Both take the mean over
the kept tokens (`base.masked_mean`) of inputs zeroed at the dropped positions
(`base.zero_dropped`), so NaN or inf at padding changes neither the value nor the gradient.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.common.outputs import Outputs
from distill_jax.losses.base import (
  feature_pairs,
  kl,
  layer_tuple,
  masked_mean,
  register_loss,
  shape_mismatch,
  zero_dropped,
)


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

"""Losses on the relations between the examples of a batch: how the student's examples relate
to each other should match how the teacher's do.

Registered here (weights are those of the CRD paper's code, RepDistiller, on CIFAR-100, used
beside `ce` of weight 1 and no `kd`):

- `sp`: Similarity-Preserving KD (Tung & Mori, ICCV 2019), weight 3000.
- `rkd`: Relational KD, distance + angle (Park et al., CVPR 2019), weight 1.
- `pkt`: Probabilistic Knowledge Transfer (Passalis & Tefas, ECCV 2018), weight 30000.
- `cc`: Correlation Congruence (Peng et al., ICCV 2019), weight 0.02 (its `repdistiller` form).

SP, RKD and PKT have no trainable parameters, so each is a pure function; CC first embeds
both sides with trainable linear maps, so it is a Flax module term (its parameters in
`params['objective'][term]`). Features are embeddings [B, D] or maps [B, ...] flattened per
example. The core math lives in small array functions (`similarity_matrix`, `rkd_losses`,
`pairwise_distances`, `angle_matrix`, `pkt_divergence`, `rbf_taylor_kernel`,
`correlation_congruence`, `cc_repdistiller`) that the tests check against NumPy. SP, RKD and
PKT compute in at least float32, every contraction at `Precision.HIGHEST` (no bf16/TF32
passes on accelerators).

The batch `mask` (1 real, 0 padding) is honoured by all four: padded examples are dropped from
every relation, so the value equals the unmasked loss on the real examples alone. Relations are
taken within the global batch, which the objective sees in every parallel mode (under pmap the
train step gathers it first).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.common.outputs import Outputs
from distill_jax.common.rules import NON_NEGATIVE, POSITIVE_INT
from distill_jax.losses.base import (
  EPS,
  NORM_EPS,
  at_least_float32,
  check_same_batch,
  example_weights,
  feature_pairs,
  l2_normalize,
  layer_tuple,
  precise_einsum,
  register_loss,
  shape_mismatch,
)
from distill_jax.losses.connectors import Connector

Weights = jax.Array | None


# ---------------------------------------------------------------------------- shared helpers


def _flat(x: jax.Array) -> jax.Array:
  """[B, ...] -> [B, D] in at least float32."""
  x = at_least_float32(x)
  return x.reshape(x.shape[0], -1)


def _sum_weights(w: Weights, size: int, dtype: jnp.dtype) -> jax.Array:
  return jnp.asarray(size, dtype) if w is None else jnp.sum(w)


# ---------------------------------------------------------------------------------------- SP


def similarity_matrix(f: jax.Array, w: Weights = None, eps: float = NORM_EPS) -> jax.Array:
  """SP's batch similarity [B, B]: `G = F F^T` (F = f flattened per example), rows L2-normalised.

  With weights `w` [B] (the mask), padded examples' rows of F are zeroed first, so their rows
  and columns of G are 0 and the other rows' norms ignore them.
  """
  x = _flat(f)
  if w is not None:
    x = x * w[:, None].astype(x.dtype)
  return l2_normalize(precise_einsum("id,jd->ij", x, x), axis=-1, eps=eps)


def sp_divergence(f_s: jax.Array, f_t: jax.Array, w: Weights = None) -> jax.Array:
  """`||G_s - G_t||_F^2 / n^2` (n = B, or the number of real examples under weights `w`)."""
  diff = similarity_matrix(f_s, w) - similarity_matrix(f_t, w)
  n = _sum_weights(w, f_s.shape[0], diff.dtype)
  return jnp.sum(jnp.square(diff)) / jnp.maximum(n * n, 1.0)


@register_loss("sp")
def similarity_preserving(student: Outputs, teachers: Mapping[str, Outputs],
                          batch: Mapping[str, jax.Array], *,
                          student_layers: str | Sequence[str] = ("stage3",),
                          teacher_layers: str | Sequence[str] = ("stage3",),
                          teacher: str | None = None) -> jax.Array:
  """Similarity-Preserving KD (Tung & Mori, ICCV 2019), summed over the layer pairs.

  For features [B, ...] flattened to F [B, D] (D may differ between student and teacher):
  `G = row_normalize(F F^T)` [B, B] and the loss `||G_s - G_t||_F^2 / B^2`. Default layer: the
  last stage's map before pooling (RepDistiller's `feat[-2]`); CRD-recipe weight 3000. The mask
  is honoured: padded examples are left out of G and B counts the real ones (a relational loss,
  so the value is that of the real examples alone).
  """
  s_names, t_names = layer_tuple(student_layers), layer_tuple(teacher_layers)
  pairs = feature_pairs(student, teachers, s_names, t_names, teacher)
  total = jnp.zeros((), jnp.float32)
  for (s, t), s_name, t_name in zip(pairs, s_names, t_names, strict=True):
    check_same_batch("sp", s_name, s, t_name, t)
    w = example_weights(batch, at_least_float32(s)) if batch.get("mask") is not None else None
    total = total + sp_divergence(s, t, w)
  return total


# --------------------------------------------------------------------------------------- RKD


def smooth_l1(x: jax.Array, beta: float = 1.0) -> jax.Array:
  """Elementwise smooth L1 (Huber) of a difference: `0.5 x^2 / beta` if |x| < beta, else
  `|x| - 0.5 beta` (PyTorch's `smooth_l1_loss`, beta 1 by default)."""
  ax = jnp.abs(x)
  return jnp.where(ax < beta, 0.5 * jnp.square(x) / beta, ax - 0.5 * beta)


def pairwise_distances(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Euclidean distances [B, B] between the rows of x [B, D]; 0 on the diagonal.

  Off the diagonal the squared distance is clamped at `eps` from below (distances >= sqrt(eps)),
  as RepDistiller's `pdist`. Computed from the differences (not |a|^2 + |b|^2 - 2ab, which
  cancels catastrophically for large features).
  """
  diff = x[:, None, :] - x[None, :, :]
  sq = jnp.sum(jnp.square(diff), axis=-1)
  eye = jnp.eye(x.shape[0], dtype=bool)
  return jnp.where(eye, 0.0, jnp.sqrt(jnp.maximum(sq, eps)))


def normalized_distances(x: jax.Array, w: Weights = None, eps: float = 1e-12) -> jax.Array:
  """Pairwise distances [B, B] divided by their mean over the (real) off-diagonal pairs."""
  d = pairwise_distances(x, eps)
  off = 1.0 - jnp.eye(x.shape[0], dtype=d.dtype)
  pw = off if w is None else off * w[:, None] * w[None, :]
  count = jnp.sum(pw)
  mean = jnp.sum(pw * d) / jnp.where(count > 0, count, 1.0)
  return d / jnp.where(mean > 0, mean, 1.0)


def angle_matrix(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """Cosines [B, B, B] of the angles of all triplets: `A[j, i, k] = <e_ji, e_jk>` with
  `e_ji = (x_i - x_j) / max(||x_i - x_j||, eps)`, i.e. the angle at anchor j between x_i and x_k.

  Degenerate triplets (i = j or k = j) have a zero difference vector and a cosine of 0.
  """
  e = l2_normalize(x[None, :, :] - x[:, None, :], axis=-1, eps=eps)  # e[j, i] = x_i - x_j.
  return precise_einsum("jid,jkd->jik", e, e)


def rkd_losses(s: jax.Array, t: jax.Array, w: Weights = None, eps: float = 1e-12,
               beta: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """RKD's `(distance loss, angle loss)` between embeddings s [B, D_s] and t [B, D_t].

  distance: `mean_{i,j} smooth_l1(d_s[i,j] / mu_s - d_t[i,j] / mu_t)` over all B^2 pairs, the
  diagonal included (it is 0), `mu` the mean distance over the off-diagonal pairs;
  angle: `mean_{j,i,k} smooth_l1(A_s - A_t)` over all B^3 triplets (see `angle_matrix`).
  Both means as RepDistiller's `smooth_l1_loss` (reduction 'mean'). With weights `w` [B] the
  pairs and triplets of padded examples are left out and n = sum(w) replaces B.
  """
  s, t = _flat(s), _flat(t)
  n = _sum_weights(w, s.shape[0], s.dtype)
  dist = smooth_l1(normalized_distances(s, w, eps) - normalized_distances(t, w, eps), beta)
  angle = smooth_l1(angle_matrix(s, eps) - angle_matrix(t, eps), beta)
  if w is None:
    return jnp.mean(dist), jnp.mean(angle)
  pair = w[:, None] * w[None, :]
  dist = jnp.sum(pair * dist) / jnp.maximum(n**2, 1.0)
  angle = jnp.sum(pair[:, :, None] * w[None, None, :] * angle) / jnp.maximum(n**3, 1.0)
  return dist, angle


@register_loss("rkd", ranges={
    "distance_weight": (NON_NEGATIVE, "the distance loss's weight"),
    "angle_weight": (NON_NEGATIVE, "the angle loss's weight"), "eps": EPS})
def relational_kd(student: Outputs, teachers: Mapping[str, Outputs],
                  batch: Mapping[str, jax.Array], *, student_layer: str = "pool",
                  teacher_layer: str = "pool", distance_weight: float = 25.0,
                  angle_weight: float = 50.0, eps: float = 1e-12, smooth_l1_beta: float = 1.0,
                  teacher: str | None = None) -> jax.Array:
  """Relational KD (Park et al., CVPR 2019): `distance_weight * L_dist + angle_weight * L_angle`.

  On embeddings [B, D_s] / [B, D_t] (default the pre-logit 'pool' vectors, RepDistiller's
  `feat[-1]`; other features are flattened per example; D may differ):
  L_dist = Huber between the pairwise-distance matrices, each divided by its mean over the
  off-diagonal pairs; L_angle = Huber between the [B, B, B] cosines of the angles of all
  triplets (anchor j: between x_i - x_j and x_k - x_j). Huber is smooth L1 with
  `smooth_l1_beta` = 1, mean over all B^2 pairs / B^3 triplets (see `rkd_losses`).
  `eps` = 1e-12 clamps squared distances from below and floors the norms of the difference
  vectors, as RepDistiller. Weights 25 / 50 inside, CRD-recipe term weight 1. The mask is
  honoured: padded examples are left out of every pair and triplet.
  """
  ((s, t),) = feature_pairs(student, teachers, student_layer, teacher_layer, teacher)
  check_same_batch("rkd", student_layer, s, teacher_layer, t)
  w = example_weights(batch, at_least_float32(s)) if batch.get("mask") is not None else None
  dist, angle = rkd_losses(s, t, w, eps, smooth_l1_beta)
  return distance_weight * dist + angle_weight * angle


# --------------------------------------------------------------------------------------- PKT


def pkt_probabilities(x: jax.Array, w: Weights = None, eps: float = 1e-7) -> jax.Array:
  """PKT's conditional probabilities [B, B] from embeddings x [B, D].

  `x_i / (||x_i|| + eps)`, cosine similarities clipped to [-1, 1] (rounding only), shifted to
  `(S + 1) / 2` in [0, 1] and divided by their row sums: `P[i, j] = p(j | i)`. With weights `w`,
  padded examples' columns are zeroed before the row normalisation.
  """
  x = _flat(x)
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  norm = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)  # Finite grad at 0.
  x = x / (norm + eps)
  sim = (jnp.clip(precise_einsum("id,jd->ij", x, x), -1.0, 1.0) + 1.0) / 2.0
  if w is not None:
    sim = sim * w[None, :]
  rows = jnp.sum(sim, axis=-1, keepdims=True)
  return sim / jnp.where(rows > 0, rows, 1.0)


def pkt_divergence(s: jax.Array, t: jax.Array, w: Weights = None,
                   eps: float = 1e-7) -> jax.Array:
  """`mean_{i,j} P_t[i,j] * log((P_t[i,j] + eps) / (P_s[i,j] + eps))` over all B^2 entries.

  This is RepDistiller's (and the PKT authors' code's) `torch.mean` over the whole matrix, i.e.
  the mean over rows of `KL(P_t[i] || P_s[i])` divided once more by B, with eps = 1e-7 inside
  the log. With weights `w` the padded rows and columns are left out and B = sum(w).
  """
  p_s, p_t = pkt_probabilities(s, w, eps), pkt_probabilities(t, w, eps)
  terms = p_t * (jnp.log(p_t + eps) - jnp.log(p_s + eps))
  if w is None:
    return jnp.mean(terms)
  n = jnp.sum(w)
  return jnp.sum(terms * w[:, None] * w[None, :]) / jnp.maximum(n * n, 1.0)


@register_loss("pkt", ranges={"eps": EPS})
def probabilistic_kt(student: Outputs, teachers: Mapping[str, Outputs],
                     batch: Mapping[str, jax.Array], *, student_layer: str = "pool",
                     teacher_layer: str = "pool", eps: float = 1e-7,
                     teacher: str | None = None) -> jax.Array:
  """Probabilistic Knowledge Transfer (Passalis & Tefas, ECCV 2018) with the cosine kernel.

  On embeddings [B, D_s] / [B, D_t] (default 'pool', RepDistiller's `feat[-1]`; D may
  differ): L2-normalise, cosine-similarity matrices shifted to [0, 1] by `(S + 1) / 2`,
  row-normalised into conditional probabilities P, and the loss
  `mean_{i,j} P_t log((P_t + eps) / (P_s + eps))` over all B^2 entries, eps = 1e-7, exactly as
  RepDistiller (`torch.mean`, so it is the row-mean of KL(P_t || P_s) divided by B); see
  `pkt_divergence`. CRD-recipe weight 30000. The mask is honoured: padded examples are left
  out of the kernels and the mean.
  """
  ((s, t),) = feature_pairs(student, teachers, student_layer, teacher_layer, teacher)
  check_same_batch("pkt", student_layer, s, teacher_layer, t)
  w = example_weights(batch, at_least_float32(s)) if batch.get("mask") is not None else None
  return pkt_divergence(s, t, w, eps)


# ------------------------------------------------------------------------------------------ CC


def rbf_taylor_kernel(e: jax.Array, gamma: float, order: int) -> jax.Array:
  """CC's correlation matrix [B, B] of L2-normalised embeddings e [B, D]:

    k(x, y) = exp(-2 gamma) * sum_{p=0..P} (2 gamma)^p / p! * (x . y)^p,

  the order-P Taylor expansion of the Gaussian RBF `exp(-gamma ||x - y||^2)`, which for unit
  vectors is `exp(-2 gamma) exp(2 gamma x.y)` (Peng et al. 2019, eq. 7).
  """
  gram = e @ e.T
  total = jnp.zeros_like(gram)
  for p in range(order + 1):
    total = total + (2.0 * gamma) ** p / math.factorial(p) * gram**p
  return math.exp(-2.0 * gamma) * total


def correlation_congruence(k_s: jax.Array, k_t: jax.Array, weights: jax.Array) -> jax.Array:
  """CC: `sum_ij w_i w_j (K_s - K_t)_ij^2 / (sum w)^2`, the mean over the (kept) pairs.

  With all weights 1 this is the paper's `||K_t - K_s||_F^2 / B^2`.
  """
  pair = weights[:, None] * weights[None, :]
  return jnp.sum(pair * jnp.square(k_s - k_t)) / jnp.maximum(jnp.sum(pair), 1.0)


def cc_repdistiller(e_s: jax.Array, e_t: jax.Array, weights: jax.Array) -> jax.Array:
  """The CRD code's `Correlation` loss on raw embeddings [B, D] (not the paper's kernel):

    delta = |e_s - e_t|;  loss = mean_i sum_d delta[i, d] * delta[i + 1, d],

  the mean over consecutive pairs (i, i + 1) of the batch, here over pairs with both examples
  kept (`weights` [B]).
  """
  delta = jnp.abs(e_s - e_t)
  per_pair = jnp.sum(delta[:-1] * delta[1:], axis=-1)
  pair_w = weights[:-1] * weights[1:]
  return jnp.sum(per_pair * pair_w) / jnp.maximum(jnp.sum(pair_w), 1.0)


@register_loss("cc", ranges={"embed_dim": (POSITIVE_INT, "the embedding size")})
class CorrelationCongruence(nn.Module):
  """Correlation Congruence (Peng et al., ICCV 2019).

  The student's and teacher's features (`pool`, [B, D_s] and [B, D_t]; others are flattened)
  go through their own trainable linear embeddings to `embed_dim` (the CRD code's
  `LinearEmbed` on both sides; the teacher's feature gets no gradient, its embedding does).

  form='paper' (default): the embeddings are L2-normalised and each batch's correlation matrix
  is the Gaussian-RBF kernel by its order-P Taylor expansion (P = `order`, `gamma`):

    k(x, y) = exp(-2 gamma) * sum_{p=0..P} (2 gamma)^p / p! * (x . y)^p,

  and loss = `||K_s - K_t||_F^2 / B^2`, the mean over example pairs (with `batch['mask']`,
  over pairs of kept examples).

  form='repdistiller': the CRD code's `Correlation` on the raw embeddings, `delta = |e_s -
  e_t|`, loss = mean_i sum_d delta[i, d] delta[i + 1, d] over consecutive examples (pairs of
  kept ones). The CRD recipe's weight 0.02 (beside CE 1) was tuned for this form.

  Defaults: embed_dim 128, gamma 0.4, order 2 (the paper's P = 2).
  """

  student_layer: str = "pool"
  teacher_layer: str = "pool"
  embed_dim: int = 128
  gamma: float = 0.4
  order: int = 2
  form: str = "paper"
  teacher: str | None = None

  @nn.compact
  def __call__(self, student: Outputs, teachers: Mapping[str, Outputs],
               batch: Mapping[str, jax.Array]) -> jax.Array:
    if self.form not in ("paper", "repdistiller"):
      raise ValueError(f"cc form must be 'paper' or 'repdistiller', got {self.form!r}.")
    s_names, t_names = layer_tuple(self.student_layer), layer_tuple(self.teacher_layer)
    ((s, t),) = feature_pairs(student, teachers, s_names, t_names, self.teacher)
    if s.shape[0] != t.shape[0]:
      raise shape_mismatch("cc", s_names[0], s.shape, t_names[0], t.shape,
                           "Compare features of the same batch.")
    s, t = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
    e_s = Connector("linear", self.embed_dim, name="embed_s")(s)
    e_t = Connector("linear", self.embed_dim, name="embed_t")(t.astype(s.dtype))
    weights = example_weights(batch, e_s)
    if self.form == "repdistiller":
      return cc_repdistiller(e_s, e_t, weights)
    k_s = rbf_taylor_kernel(l2_normalize(e_s), self.gamma, self.order)
    k_t = rbf_taylor_kernel(l2_normalize(e_t), self.gamma, self.order)
    return correlation_congruence(k_s, k_t, weights)

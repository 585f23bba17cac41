"""Parameter-free losses on intermediate features and on the relations between examples.

Registered here (weights are those of the CRD paper's code, RepDistiller, on CIFAR-100, used
beside `ce` of weight 1 and no `kd`):

- `at`: Attention Transfer (Zagoruyko & Komodakis, ICLR 2017), weight 1000.
- `sp`: Similarity-Preserving KD (Tung & Mori, ICCV 2019), weight 3000.
- `rkd`: Relational KD, distance + angle (Park et al., CVPR 2019), weight 1.
- `pkt`: Probabilistic Knowledge Transfer (Passalis & Tefas, ECCV 2018), weight 30000.
- `nst`: Neuron Selectivity Transfer (Huang & Wang, 2017), weight 50.
- `fsp`: Flow of Solution Procedure (Yim et al., CVPR 2017), weight 50 (in RepDistiller, only in
  a 30-epoch pre-training stage of the student's feature layers, see `fsp`).

None has trainable parameters, so each is a pure function. Feature maps are [B, H, W, C]
(channels last; any [B, *spatial, C] works); embeddings [B, D]. The core math lives in small
array functions (`attention_map`, `similarity_matrix`, `rkd_losses`, `pkt_divergence`,
`nst_mmd`, `fsp_matrix`) that the tests check against NumPy. Everything is computed in at least
float32, and every contraction at `Precision.HIGHEST` (no bf16/TF32 passes on accelerators).

The batch `mask` (1 real, 0 padding) is honoured by all six: the per-example ones (AT, NST,
FSP) take the masked batch mean; for the relational ones (SP, RKD, PKT) padded examples are
dropped from every relation, so the value equals the unmasked loss on the real examples alone.
Relations are taken within the batch the loss sees: under pmap, each device's shard; under
jit over a sharded batch, the global batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from distill_jax.losses.base import (
    EPS,
    NORM_EPS,
    avg_pool_to,
    example_weights,
    feature_pairs,
    l2_normalize,
    layer_tuple,
    register_loss,
    shape_mismatch,
    weighted_mean,
)
from distill_jax.outputs import Outputs
from distill_jax.rules import NON_NEGATIVE

HIGHEST = jax.lax.Precision.HIGHEST

Weights = jax.Array | None


# ---------------------------------------------------------------------------- shared helpers


def _float(x: jax.Array) -> jax.Array:
  """`x` in at least float32 (bf16/fp16 features are promoted, float64 stays)."""
  return jnp.asarray(x).astype(jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))


def _flat(x: jax.Array) -> jax.Array:
  """[B, ...] -> [B, D] in at least float32."""
  x = _float(x)
  return x.reshape(x.shape[0], -1)


def _einsum(spec: str, *operands: jax.Array) -> jax.Array:
  return jnp.einsum(spec, *operands, precision=HIGHEST)


def _weights(batch: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
  """Per-example weights [B] (the batch mask, or ones) in x's float dtype."""
  return example_weights(batch, _float(x))


def _sum_weights(w: Weights, size: int, dtype: jnp.dtype) -> jax.Array:
  return jnp.asarray(size, dtype) if w is None else jnp.sum(w)


def _check_batch(term: str, s_name: str, s: jax.Array, t_name: str, t: jax.Array) -> None:
  if s.shape[:1] != t.shape[:1]:
    raise shape_mismatch(term, s_name, s.shape, t_name, t.shape,
                         fix="Student and teacher features must come from the same batch "
                             "(equal leading batch axis).")


def _check_map(term: str, side: str, name: str, x: jax.Array) -> None:
  if x.ndim < 3:
    raise ValueError(f"Loss term {term!r} needs feature maps [B, H, W, C], but {side} layer "
                     f"{name!r} has shape {tuple(x.shape)}; choose a convolutional layer such "
                     "as 'stage1' (not the pooled 'pool' vector).")


def common_spatial(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...] | None:
  """The spatial size two maps of spatial sizes `a`, `b` are compared at, or None.

  Equal sizes compare as they are; otherwise the larger map is average-pooled to the smaller
  one, which needs an integer ratio on every axis (RepDistiller's `adaptive_avg_pool2d`
  between feature maps of different resolution, restricted to the exact, non-overlapping case).
  """
  a, b = tuple(a), tuple(b)
  if len(a) != len(b):
    return None
  if a == b:
    return a
  if all(x % y == 0 for x, y in zip(a, b, strict=True)):
    return b
  if all(y % x == 0 for x, y in zip(a, b, strict=True)):
    return a
  return None


# ---------------------------------------------------------------------------------------- AT


def attention_map(f: jax.Array, p: float = 2.0, eps: float = NORM_EPS) -> jax.Array:
  """The attention map of a feature [B, *spatial, C] -> [B, prod(spatial)].

  `a = mean_c |f_c|^p` at every position, flattened per example and L2-normalised
  (`a / max(||a||, eps)`). Zagoruyko & Komodakis use the sum over channels of `|f|^p`; the mean
  (as RepDistiller) only rescales `a` before the normalisation. An integer `p` is an exact
  integer power; a fractional `p < 1` has an infinite gradient at f = 0.
  """
  if p <= 0:
    raise ValueError(f"attention transfer needs p > 0, got p={p}.")
  a = jnp.abs(_float(f))
  a = a ** int(p) if float(p).is_integer() else a ** p
  a = jnp.mean(a, axis=-1).reshape(f.shape[0], -1)
  return l2_normalize(a, axis=-1, eps=eps)


def adaptive_avg_pool(x: jax.Array, spatial: Sequence[int]) -> jax.Array:
  """PyTorch's `adaptive_avg_pool2d` on [B, *S, C] -> [B, *spatial, C] (any number of axes).

  Output cell i of an axis of size S -> O averages inputs floor(i S / O) .. ceil((i + 1) S / O)
  - 1: non-overlapping windows of S / O when O divides S, overlapping ones otherwise. Done as one
  averaging matrix [O, S] per axis.
  """
  x = _float(x)
  for axis, (size, out) in enumerate(zip(x.shape[1:-1], spatial, strict=True), 1):
    if size == out:
      continue
    rows = []
    for i in range(out):
      start, end = (i * size) // out, -((-(i + 1) * size) // out)
      rows.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(size)])
    pool = jnp.asarray(rows, x.dtype)
    x = jnp.moveaxis(jnp.tensordot(x, pool, axes=((axis,), (1,)), precision=HIGHEST), -1, axis)
  return x


def at_divergence(f_s: jax.Array, f_t: jax.Array, p: float = 2.0) -> jax.Array:
  """Per-example `mean_positions (a_s - a_t)^2` [B] of the attention maps (equal positions)."""
  return jnp.mean(jnp.square(attention_map(f_s, p) - attention_map(f_t, p)), axis=-1)


@register_loss("at")
def attention_transfer(student: Outputs, teachers: Mapping[str, Outputs],
                       batch: Mapping[str, jax.Array], *,
                       student_layers: str | Sequence[str] = ("stage1", "stage2", "stage3"),
                       teacher_layers: str | Sequence[str] = ("stage1", "stage2", "stage3"),
                       p: float = 2.0, pool_to_smaller: bool = False,
                       teacher: str | None = None) -> jax.Array:
  """Attention Transfer (Zagoruyko & Komodakis, ICLR 2017), summed over the layer pairs.

  For each pair of feature maps [B, H, W, C_s] / [B, H, W, C_t] (channels may differ):
  `mean_{b, hw} (a_s - a_t)^2` with `a = normalize(mean_c |f|^p)` flattened per example (see
  `attention_map`); RepDistiller's `(at(f_s) - at(f_t)).pow(2).mean()`. The loss is the sum over
  the pairs. Defaults as RepDistiller: p = 2 on the three stage outputs (its `feat[1:-1]`);
  CRD-recipe weight 1000 (beside `ce` 1). The mask is honoured (masked batch mean).

  Maps of different spatial size are refused by default. With `pool_to_smaller`, the feature map
  with more positions is first adaptive-average-pooled (`adaptive_avg_pool`) to the other's
  spatial size, then both attention maps are taken: what RepDistiller does for every pair (and
  needs for cross-architecture pairs, e.g. a 32x32 ResNet-50 stage against a 16x16 MobileNetV2
  one). RepDistiller pools to a square of the smaller height; for square maps that is the same.
  """
  s_names, t_names = layer_tuple(student_layers), layer_tuple(teacher_layers)
  pairs = feature_pairs(student, teachers, s_names, t_names, teacher)
  total = jnp.zeros((), jnp.float32)
  for (s, t), s_name, t_name in zip(pairs, s_names, t_names, strict=True):
    _check_batch("at", s_name, s, t_name, t)
    _check_map("at", "student", s_name, s)
    _check_map("at", "teacher", t_name, t)
    s_size, t_size = tuple(s.shape[1:-1]), tuple(t.shape[1:-1])
    if s_size != t_size and pool_to_smaller and len(s_size) == len(t_size):
      if all(a >= b for a, b in zip(s_size, t_size, strict=True)):
        s = adaptive_avg_pool(s, t_size)
      elif all(a <= b for a, b in zip(s_size, t_size, strict=True)):
        t = adaptive_avg_pool(t, s_size)
    if s.shape[1:-1] != t.shape[1:-1]:
      raise shape_mismatch(
          "at", s_name, s.shape, t_name, t.shape,
          fix="Attention maps are compared position by position: choose student and teacher "
              "layers of equal spatial resolution (their channels may differ), or set "
              "pool_to_smaller=True to average-pool the larger map to the smaller one (it "
              "must then be at least as large on every axis).")
    total = total + weighted_mean(at_divergence(s, t, p), _weights(batch, s))
  return total


# ---------------------------------------------------------------------------------------- SP


def similarity_matrix(f: jax.Array, w: Weights = None, eps: float = NORM_EPS) -> jax.Array:
  """SP's batch similarity [B, B]: `G = F F^T` (F = f flattened per example), rows L2-normalised.

  With weights `w` [B] (the mask), padded examples' rows of F are zeroed first, so their rows
  and columns of G are 0 and the other rows' norms ignore them.
  """
  x = _flat(f)
  if w is not None:
    x = x * w[:, None].astype(x.dtype)
  return l2_normalize(_einsum("id,jd->ij", x, x), axis=-1, eps=eps)


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
    _check_batch("sp", s_name, s, t_name, t)
    w = _weights(batch, s) if batch.get("mask") is not None else None
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
  return _einsum("jid,jkd->jik", e, e)


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
  _check_batch("rkd", student_layer, s, teacher_layer, t)
  w = _weights(batch, s) if batch.get("mask") is not None else None
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
  sim = (jnp.clip(_einsum("id,jd->ij", x, x), -1.0, 1.0) + 1.0) / 2.0
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
  _check_batch("pkt", student_layer, s, teacher_layer, t)
  w = _weights(batch, s) if batch.get("mask") is not None else None
  return pkt_divergence(s, t, w, eps)


# --------------------------------------------------------------------------------------- NST


def nst_mmd(f_s: jax.Array, f_t: jax.Array, degree: int = 2, c: float = 0.0,
            eps: float = NORM_EPS) -> jax.Array:
  """Per-example squared MMD [B] between the channel distributions of two maps.

  Each map [B, *spatial, C] (equal spatial sizes) gives, per example, C vectors over the
  positions, each L2-normalised; with the polynomial kernel `k(x, y) = (x . y + c)^degree`:
  `MMD^2 = mean_{i,i'} k(t_i, t_i') + mean_{j,j'} k(s_j, s_j') - 2 mean_{i,j} k(s_j, t_i)`.
  """

  def channels(f: jax.Array) -> jax.Array:
    f = _float(f)
    return l2_normalize(f.reshape(f.shape[0], -1, f.shape[-1]), axis=1, eps=eps)  # [B, P, C]

  s, t = channels(f_s), channels(f_t)

  def kernel_mean(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean((_einsum("bpi,bpj->bij", a, b) + c) ** degree, axis=(1, 2))

  return kernel_mean(t, t) + kernel_mean(s, s) - 2.0 * kernel_mean(s, t)


@register_loss("nst")
def neuron_selectivity_transfer(student: Outputs, teachers: Mapping[str, Outputs],
                                batch: Mapping[str, jax.Array], *,
                                student_layers: str | Sequence[str] = ("stage1", "stage2",
                                                                       "stage3"),
                                teacher_layers: str | Sequence[str] = ("stage1", "stage2",
                                                                       "stage3"),
                                degree: int = 2, c: float = 0.0,
                                teacher: str | None = None) -> jax.Array:
  """Neuron Selectivity Transfer (Huang & Wang, 2017), summed over the layer pairs.

  Per pair of maps [B, H_s, W_s, C_s] / [B, H_t, W_t, C_t] (channels may differ): the larger
  map is average-pooled to the smaller when the ratio is an integer (RepDistiller pools with
  `adaptive_avg_pool2d`; other ratios are refused); each channel's map over the H*W positions
  is L2-normalised, and the loss is the batch mean of the squared MMD between the student's and
  the teacher's channel sets under the polynomial kernel `(x . y + c)^degree`, degree 2, c 0
  (see `nst_mmd`). Defaults as RepDistiller (`feat[1:-1]`); CRD-recipe weight 50. The mask is
  honoured (masked batch mean).
  """
  s_names, t_names = layer_tuple(student_layers), layer_tuple(teacher_layers)
  pairs = feature_pairs(student, teachers, s_names, t_names, teacher)
  total = jnp.zeros((), jnp.float32)
  for (s, t), s_name, t_name in zip(pairs, s_names, t_names, strict=True):
    _check_batch("nst", s_name, s, t_name, t)
    _check_map("nst", "student", s_name, s)
    _check_map("nst", "teacher", t_name, t)
    spatial = common_spatial(s.shape[1:-1], t.shape[1:-1])
    if spatial is None:
      raise shape_mismatch(
          "nst", s_name, s.shape, t_name, t.shape,
          fix="NST pools the larger map to the smaller, which needs an integer ratio of the "
              "spatial sizes: choose layers whose resolutions divide each other.")
    mmd = nst_mmd(avg_pool_to(s, spatial), avg_pool_to(t, spatial), degree, c)
    total = total + weighted_mean(mmd, _weights(batch, s))
  return total


# --------------------------------------------------------------------------------------- FSP


def fsp_matrix(f1: jax.Array, f2: jax.Array) -> jax.Array:
  """The FSP (Gram) matrix [B, C1, C2] of two maps [B, *S1, C1], [B, *S2, C2] of one network:
  `G = (1 / P) sum_positions f1^T f2` after pooling the larger map to the smaller (integer
  ratio; P = the number of positions)."""
  spatial = common_spatial(f1.shape[1:-1], f2.shape[1:-1])
  if spatial is None:
    raise ValueError(f"FSP cannot pair maps of spatial sizes {tuple(f1.shape[1:-1])} and "
                     f"{tuple(f2.shape[1:-1])}: the ratio must be an integer.")
  a, b = avg_pool_to(_float(f1), spatial), avg_pool_to(_float(f2), spatial)
  a = a.reshape(a.shape[0], -1, a.shape[-1])
  b = b.reshape(b.shape[0], -1, b.shape[-1])
  return _einsum("bpi,bpj->bij", a, b) / a.shape[1]


@register_loss("fsp")
def flow_of_solution_procedure(student: Outputs, teachers: Mapping[str, Outputs],
                               batch: Mapping[str, jax.Array], *,
                               student_layers: Sequence[str] = ("stem", "stage1", "stage2",
                                                                "stage3"),
                               teacher_layers: Sequence[str] = ("stem", "stage1", "stage2",
                                                                "stage3"),
                               teacher: str | None = None) -> jax.Array:
  """Flow of Solution Procedure (Yim et al., CVPR 2017), summed over consecutive layer pairs.

  The layers pair up consecutively within each network: (l_0, l_1), (l_1, l_2), ... For each,
  the FSP matrix `G = (1 / (H W)) sum_{h,w} f1^T f2` [B, C1, C2] (the larger map average-pooled
  to the smaller one, integer ratio; see `fsp_matrix`), and the loss per pair
  `mean_{b, i, j} (G_s - G_t)^2` (RepDistiller's `(fsp_s - fsp_t).pow(2).mean()`; the paper sums
  over i, j, which only rescales). The student's and teacher's channel counts must match layer by
  layer (as the paper requires). Defaults: RepDistiller's `feat[:-1]` (stem and the stages).
  CRD-recipe weight 50; note RepDistiller uses FSP only in a 30-epoch pre-training stage of the
  student's feature layers (then trains with CE alone), which here is a separate run with this
  term (and no `ce`) before the main one. The mask is honoured (masked batch mean).
  """
  s_names, t_names = layer_tuple(student_layers), layer_tuple(teacher_layers)
  if len(s_names) < 2 or len(s_names) != len(t_names):
    raise ValueError(f"fsp pairs consecutive layers: it needs two or more student layers and "
                     f"as many teacher layers, got {s_names} and {t_names}.")
  feats = feature_pairs(student, teachers, s_names, t_names, teacher)
  for (s, t), s_name, t_name in zip(feats, s_names, t_names, strict=True):
    _check_batch("fsp", s_name, s, t_name, t)
    _check_map("fsp", "student", s_name, s)
    _check_map("fsp", "teacher", t_name, t)
    if s.shape[-1] != t.shape[-1]:
      raise shape_mismatch(
          "fsp", s_name, s.shape, t_name, t.shape,
          fix="FSP matrices are compared entry by entry, so each student layer needs the "
              "channels of its teacher layer: pick a student/teacher pair of equal widths "
              "(e.g. resnet20 from resnet56/110), as the FSP paper does.")
  for names, side in ((s_names, 0), (t_names, 1)):
    for i in range(len(names) - 1):
      a, b = feats[i][side], feats[i + 1][side]
      if common_spatial(a.shape[1:-1], b.shape[1:-1]) is None:
        who = "student" if side == 0 else "teacher"
        raise ValueError(
            f"Loss term 'fsp' pairs {who} layers {names[i]!r} of shape {tuple(a.shape)} and "
            f"{names[i + 1]!r} of shape {tuple(b.shape)}, whose spatial sizes are not integer "
            "multiples of each other; choose layers whose resolutions divide each other.")
  w = _weights(batch, feats[0][0])
  total = jnp.zeros((), jnp.float32)
  for i in range(len(feats) - 1):
    g_s = fsp_matrix(feats[i][0], feats[i + 1][0])
    g_t = fsp_matrix(feats[i][1], feats[i + 1][1])
    total = total + weighted_mean(jnp.mean(jnp.square(g_s - g_t), axis=(1, 2)), w)
  return total


"""Parameter-free losses that compare feature maps through a summary of each map.

Registered here (weights are those of the CRD paper's code, RepDistiller, on CIFAR-100, used
beside `ce` of weight 1 and no `kd`):

- `at`: Attention Transfer (Zagoruyko & Komodakis, ICLR 2017), weight 1000.
- `nst`: Neuron Selectivity Transfer (Huang & Wang, 2017), weight 50.
- `fsp`: Flow of Solution Procedure (Yim et al., CVPR 2017), weight 50 (in RepDistiller, only in
  a 30-epoch pre-training stage of the student's feature layers, see `fsp`).

The losses on the relations between examples (SP, RKD, PKT, CC) are in relations.py.

None has trainable parameters, so each is a pure function. Feature maps are [B, H, W, C]
(channels last; any [B, *spatial, C] works). The core math lives in small array functions
(`attention_map`, `adaptive_avg_pool`, `nst_mmd`, `fsp_matrix`) that the tests check against
NumPy. Everything is computed in at least float32, and every contraction at
`Precision.HIGHEST` (no bf16/TF32 passes on accelerators).

The batch `mask` (1 real, 0 padding) is honoured by all three: each takes the masked batch
mean of its per-example values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from distill_jax.common.outputs import Outputs
from distill_jax.losses.base import (
  NORM_EPS,
  at_least_float32,
  avg_pool_to,
  check_same_batch,
  example_weights,
  feature_pairs,
  l2_normalize,
  layer_tuple,
  precise_einsum,
  register_loss,
  shape_mismatch,
  weighted_mean,
)

HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------- shared helpers


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
  a = jnp.abs(at_least_float32(f))
  a = a ** int(p) if float(p).is_integer() else a ** p
  a = jnp.mean(a, axis=-1).reshape(f.shape[0], -1)
  return l2_normalize(a, axis=-1, eps=eps)


def adaptive_avg_pool(x: jax.Array, spatial: Sequence[int]) -> jax.Array:
  """PyTorch's `adaptive_avg_pool2d` on [B, *S, C] -> [B, *spatial, C] (any number of axes).

  Output cell i of an axis of size S -> O averages inputs floor(i S / O) .. ceil((i + 1) S / O)
  - 1: non-overlapping windows of S / O when O divides S, overlapping ones otherwise. Done as one
  averaging matrix [O, S] per axis.
  """
  x = at_least_float32(x)
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
    check_same_batch("at", s_name, s, t_name, t)
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
    weights = example_weights(batch, at_least_float32(s))
    total = total + weighted_mean(at_divergence(s, t, p), weights)
  return total


# --------------------------------------------------------------------------------------- NST


def nst_mmd(f_s: jax.Array, f_t: jax.Array, degree: int = 2, c: float = 0.0,
            eps: float = NORM_EPS) -> jax.Array:
  """Per-example squared MMD [B] between the channel distributions of two maps.

  Each map [B, *spatial, C] (equal spatial sizes) gives, per example, C vectors over the
  positions, each L2-normalised; with the polynomial kernel `k(x, y) = (x . y + c)^degree`:
  `MMD^2 = mean_{i,i'} k(t_i, t_i') + mean_{j,j'} k(s_j, s_j') - 2 mean_{i,j} k(s_j, t_i)`.
  """

  def channels(f: jax.Array) -> jax.Array:
    f = at_least_float32(f)
    return l2_normalize(f.reshape(f.shape[0], -1, f.shape[-1]), axis=1, eps=eps)  # [B, P, C]

  s, t = channels(f_s), channels(f_t)

  def kernel_mean(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean((precise_einsum("bpi,bpj->bij", a, b) + c) ** degree, axis=(1, 2))

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
    check_same_batch("nst", s_name, s, t_name, t)
    _check_map("nst", "student", s_name, s)
    _check_map("nst", "teacher", t_name, t)
    spatial = common_spatial(s.shape[1:-1], t.shape[1:-1])
    if spatial is None:
      raise shape_mismatch(
          "nst", s_name, s.shape, t_name, t.shape,
          fix="NST pools the larger map to the smaller, which needs an integer ratio of the "
              "spatial sizes: choose layers whose resolutions divide each other.")
    mmd = nst_mmd(avg_pool_to(s, spatial), avg_pool_to(t, spatial), degree, c)
    total = total + weighted_mean(mmd, example_weights(batch, at_least_float32(s)))
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
  a, b = avg_pool_to(at_least_float32(f1), spatial), avg_pool_to(at_least_float32(f2), spatial)
  a = a.reshape(a.shape[0], -1, a.shape[-1])
  b = b.reshape(b.shape[0], -1, b.shape[-1])
  return precise_einsum("bpi,bpj->bij", a, b) / a.shape[1]


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
    check_same_batch("fsp", s_name, s, t_name, t)
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
  w = example_weights(batch, at_least_float32(feats[0][0]))
  total = jnp.zeros((), jnp.float32)
  for i in range(len(feats) - 1):
    g_s = fsp_matrix(feats[i][0], feats[i + 1][0])
    g_t = fsp_matrix(feats[i][1], feats[i + 1][1])
    total = total + weighted_mean(jnp.mean(jnp.square(g_s - g_t), axis=(1, 2)), w)
  return total

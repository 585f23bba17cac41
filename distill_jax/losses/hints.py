"""Feature losses with trainable parts: connectors, regressors, paraphrasers, embeddings.

Registered here (all Flax module terms; their parameters live in `params['objective'][term]`,
their BatchNorm statistics in `objective_state[term]`):

- `fitnet`: FitNets hints (Romero et al., ICLR 2015).
- `vid`: Variational Information Distillation (Ahn et al., CVPR 2019).
- `ab`: Activation Boundaries (Heo et al., AAAI 2019); meant for a connector pre-training stage.
- `ft`: Factor Transfer (Kim et al., NeurIPS 2018), with its paraphraser pre-training as
  `mode='reconstruct'`; `ft_paraphraser` is the same module in that mode.
- `cc`: Correlation Congruence (Peng et al., ICCV 2019).

Defaults follow the CRD paper's code (RepDistiller) where it fixes them, the papers otherwise;
each docstring says where the two differ. The core math is in small pure array functions
(`hint_mse`, `gaussian_nll`, `ab_criterion`, `avg_pool_to`, `ft_factor`, `ft_distance`,
`rbf_taylor_kernel`, `correlation_congruence`, `cc_repdistiller`), checked against NumPy in
tests/test_hint_losses.py; the registered modules only wire them to features and parameters.

Pre-training stages (see `config.stages`): a stage's term keeps its parameters for the main
stage when both use the same term name and loss. Recipes (RepDistiller, CIFAR-100):

    # AB: 30 epochs of connector + student-feature pre-training, then CE (+ KD) alone.
    config.stages = {'ab_init': {'num_epochs': 30, 'train': 'all', 'losses': {'ab': {}}}}
    config.losses = {'ce': {'weight': 1.0}}
    # FT: 30 epochs of paraphraser pre-training (lr 0.01 for CIFAR ResNets/WRNs), then FT.
    config.stages = {'ft_init': {'num_epochs': 30, 'train': 'objective', 'lr': 0.01,
                                 'losses': {'ft': {'mode': 'reconstruct'}}}}
    config.losses = {'ce': {'weight': 1.0}, 'ft': {'weight': 200.0, 'form': 'repdistiller'}}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.connectors import CONNECTORS, Connector
from distill_jax.initializers import dense_kernel_init
from distill_jax.losses.base import (
  EPS,
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
from distill_jax.rules import NON_NEGATIVE, POSITIVE_INT

Batch = Mapping[str, jax.Array]

# ---------------------------------------------------------------------------- pure array math


def per_example_mean(x: jax.Array) -> jax.Array:
  """Mean over every axis but the first: [B, ...] -> [B]."""
  return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def per_example_sum(x: jax.Array) -> jax.Array:
  """Sum over every axis but the first: [B, ...] -> [B]."""
  return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def hint_mse(regressed: jax.Array, target: jax.Array) -> jax.Array:
  """FitNet: per-example mean of `(r(s) - t)^2` over all elements, [B, ...] -> [B].

  The batch mean of this is the CRD code's `nn.MSELoss()` (the mean over all elements).
  """
  return per_example_mean(jnp.square(regressed - target))


def softplus_inverse(y: float) -> float:
  """`log(exp(y) - 1)`, the `alpha` with `softplus(alpha) = y`, stable for large y (y > 0)."""
  return y + math.log(-math.expm1(-y))


def gaussian_nll(mean: jax.Array, var: jax.Array, target: jax.Array) -> jax.Array:
  """VID: per-example mean of `0.5 * (log var + (t - mu)^2 / var)` [B, ..., C] -> [B].

  The negative log-likelihood of `t` under `N(mu, var)` without the constant `0.5 log(2 pi)`,
  exactly as the VID authors' code (and the CRD code) computes it; `var` [C] is per channel
  (the last axis) and broadcast over the rest.
  """
  return per_example_mean(0.5 * (jnp.log(var) + jnp.square(target - mean) / var))


def ab_criterion(source: jax.Array, target: jax.Array, margin: float) -> jax.Array:
  """AB's alternative L2 criterion, summed per example: [B, ...] x [B, ...] -> [B].

    (s + m)^2 * [s > -m and t <= 0] + (s - m)^2 * [s <= m and t > 0]

  `s` is the connector's output, `t` the teacher's feature: a neuron the teacher keeps off
  (t <= 0) is pushed below -m, one it turns on (t > 0) above +m. Only the sign of `t` enters,
  so the teacher's post-ReLU feature gives the same value as its pre-activation.
  """
  off = (source > -margin) & (target <= 0)
  on = (source <= margin) & (target > 0)
  value = jnp.where(off, jnp.square(source + margin), 0.0) + jnp.where(
      on, jnp.square(source - margin), 0.0)
  return per_example_sum(value)


def ft_factor(factor: jax.Array, form: str, p1: int = 2) -> jax.Array:
  """FT: a factor [B, H, W, K] as the unit vector the loss compares, [B, D].

  - 'paper' (Kim et al. 2018, eq. 5): the factor flattened per example, `D = H*W*K`,
    L2-normalised.
  - 'repdistiller' (the CRD code's `FactorTransfer.factor`): the channel mean of `factor^p1`,
    an attention-like map, `D = H*W`, L2-normalised.
  """
  if form == "paper":
    flat = factor.reshape(factor.shape[0], -1)
  elif form == "repdistiller":
    flat = jnp.mean(factor**p1, axis=-1).reshape(factor.shape[0], -1)
  else:
    raise ValueError(f"ft form must be 'paper' or 'repdistiller', got {form!r}.")
  return l2_normalize(flat)


def ft_distance(u_s: jax.Array, u_t: jax.Array, form: str, p: float = 1.0) -> jax.Array:
  """FT: the per-example distance [B] between normalised factors [B, D].

  - 'paper': the p-norm `||u_s - u_t||_p = (sum_i |d_i|^p)^(1/p)` (p = 1: the L1 distance).
  - 'repdistiller': the mean over the D entries of `|d_i|^p` (the CRD code's
    `(a - b).abs().mean()` for p = 1, `.pow(p).mean()` otherwise, up to the batch mean).
  The p-norm's gradient is 0 where the distance is 0 (no NaN).
  """
  powered = jnp.abs(u_s - u_t) ** p
  if form == "repdistiller":
    return jnp.mean(powered, axis=-1)
  if form != "paper":
    raise ValueError(f"ft form must be 'paper' or 'repdistiller', got {form!r}.")
  if p == 1:
    return jnp.sum(powered, axis=-1)
  total = jnp.sum(powered, axis=-1)
  positive = total > 0
  return jnp.where(positive, jnp.where(positive, total, 1.0) ** (1.0 / p), 0.0)


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


# ----------------------------------------------------------------------------------- helpers


def _named_pairs(term: str, student: Outputs, teachers: Mapping[str, Outputs],
                 student_layers: str | Sequence[str], teacher_layers: str | Sequence[str],
                 teacher: str | None) -> list[tuple[str, jax.Array, str, jax.Array]]:
  """[(s_name, s_feat, t_name, t_feat)], teacher under stop_gradient; equal batch sizes."""
  s_names, t_names = layer_tuple(student_layers), layer_tuple(teacher_layers)
  pairs = feature_pairs(student, teachers, s_names, t_names, teacher)
  out = []
  for (s, t), s_name, t_name in zip(pairs, s_names, t_names, strict=True):
    if s.shape[0] != t.shape[0] or s.ndim != t.ndim:
      raise shape_mismatch(term, s_name, s.shape, t_name, t.shape,
                           "Compare features of the same batch and rank ([B, H, W, C] with "
                           "[B, H, W, C], or [B, D] with [B, D]).")
    out.append((s_name, s, t_name, t))
  return out


def _require_same_spatial(term: str, s_name: str, s: jax.Array, t_name: str,
                          t: jax.Array) -> None:
  if s.shape[1:-1] != t.shape[1:-1]:
    raise shape_mismatch(
        term, s_name, s.shape, t_name, t.shape,
        "The connectors only change channels, not spatial size: pick student and teacher "
        "layers of equal resolution (e.g. the same stage of two CIFAR ResNets).")


def _match_spatial(term: str, s_name: str, s: jax.Array, t_name: str,
                   t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Pools the larger of two [B, H, W, C] maps to the smaller's size (the CRD code's VID/FT)."""
  if s.shape[1:-1] == t.shape[1:-1]:
    return s, t
  if s.ndim == 4:
    (sh, sw), (th, tw) = s.shape[1:3], t.shape[1:3]
    if sh >= th and sw >= tw and sh % th == 0 and sw % tw == 0:
      return avg_pool_to(s, (th, tw)), t
    if th >= sh and tw >= sw and th % sh == 0 and tw % sw == 0:
      return s, avg_pool_to(t, (sh, sw))
  raise shape_mismatch(
      term, s_name, s.shape, t_name, t.shape,
      "Spatial sizes must be equal, or one a whole multiple of the other (the larger map is "
      "then average-pooled): pick student and teacher layers of compatible resolution.")


def _bn(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _conv3x3(features: int, name: str) -> nn.Conv:
  """3x3 convolution, padding 1, with bias; PyTorch's default init (uniform +-1/sqrt(fan_in))
  for the kernel, a zero bias."""
  return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=True,
                 kernel_init=dense_kernel_init, name=name)


def _check_connector(term: str, kind: str, allowed: Sequence[str] = CONNECTORS) -> None:
  if kind not in allowed:
    raise ValueError(f"{term}: unknown connector {kind!r}; choose one of {list(allowed)}.")


# -------------------------------------------------------------------------------------- FitNet


@register_loss("fitnet")
class FitNet(nn.Module):
  """FitNets hints (Romero et al., ICLR 2015): `mean((relu(r(s)) - t)^2)`, batch mean.

  `s` is the student's hint feature `student_layer` [B, H, W, C_s], `t` the teacher's guided
  feature `teacher_layer` [B, H, W, C_t] (or [B, D] vectors with a 'linear'/'mlp' connector),
  `r` the regressor: `connector` ('conv1x1_bn' by default: 1x1 conv + BatchNorm, then the ReLU
  of the CRD code's `ConvReg` when `relu`; any kind of `distill_jax.connectors`; 'identity'
  compares `s` itself and needs equal shapes, no ReLU). The squared error is averaged over all
  elements of each example, then over the batch (honouring `batch['mask']`): the CRD code's
  `nn.MSELoss` (the paper's `1/2 ||.||^2` differs by a constant factor).

  Connectors change channels only: student and teacher layers must have the same spatial size
  (the CRD code's `ConvReg` also strides or pools to the teacher's size; not done here).

  Defaults: hint layer 2 of the CRD code (`stage2` of CIFAR ResNets/WRNs). CRD recipe: weight
  100 beside CE 1 (gamma 1, alpha 0), in one stage; the paper's two-stage training (hint
  pre-training, then KD) is a `config.stages` entry with `'train': 'all'`.
  """

  student_layer: str = "stage2"
  teacher_layer: str = "stage2"
  connector: str = "conv1x1_bn"
  relu: bool = True
  teacher: str | None = None

  @nn.compact
  def __call__(self, student: Outputs, teachers: Mapping[str, Outputs],
               batch: Batch) -> jax.Array:
    _check_connector("fitnet", self.connector)
    ((s_name, s, t_name, t),) = _named_pairs("fitnet", student, teachers, self.student_layer,
                                              self.teacher_layer, self.teacher)
    _require_same_spatial("fitnet", s_name, s, t_name, t)
    if self.connector == "identity":
      if s.shape != t.shape:
        raise shape_mismatch(
            "fitnet", s_name, s.shape, t_name, t.shape,
            "Set connector='conv1x1_bn' (or 'linear' for [B, D] features) to map the "
            "student's channels to the teacher's.")
      regressed = s
    else:
      regressed = Connector(self.connector, t.shape[-1], name="connector")(s)
      if self.relu:
        regressed = nn.relu(regressed)
    per_example = hint_mse(regressed, t.astype(regressed.dtype))
    return weighted_mean(per_example, example_weights(batch, per_example))


# ----------------------------------------------------------------------------------------- VID


class _VIDRegressor(nn.Module):
  """VID's mean regressor: 1x1 conv -> ReLU -> 1x1 conv -> ReLU -> 1x1 conv, no bias, no BN.

  A 1x1 convolution is a Dense layer on the channel (last) axis, so this also takes [B, D].
  """

  mid: int
  out: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda n, name: nn.Dense(n, use_bias=False, kernel_init=dense_kernel_init,
                                     name=name)
    x = nn.relu(dense(self.mid, "conv0")(x))
    x = nn.relu(dense(self.mid, "conv1")(x))
    return dense(self.out, "conv2")(x)


@register_loss("vid", ranges={"eps": EPS})
class VID(nn.Module):
  """Variational Information Distillation (Ahn et al., CVPR 2019); summed over layer pairs.

  For each pair (student feature s [B, H, W, C_s], teacher feature t [B, H, W, C_t]):
  `mu = r(s)` with r = 1x1 conv (C_s -> M) - ReLU - 1x1 conv (M -> M) - ReLU - 1x1 conv
  (M -> C_t), no bias (M = `mid_channels`, 0: C_t, the CRD code's `VIDLoss(C_s, C_t, C_t)`), a
  per-channel variance `var = softplus(alpha) + eps` with alpha [C_t] initialised so that
  `var = init_pred_var`, and

    loss = mean over (B, H, W, C) of 0.5 * (log var + (t - mu)^2 / var),

  the Gaussian negative log-likelihood without the constant `0.5 log(2 pi)`, as in the authors'
  and the CRD code (per example, then the batch mean with `batch['mask']`). If the spatial
  sizes differ by a whole factor, the larger map is average-pooled to the smaller first (as
  the CRD code does); otherwise a shape error.

  Defaults: the CRD code's VID on `feat[1:-1]` (the three stages of CIFAR ResNets/WRNs),
  `init_pred_var` 5, `eps` 1e-5. CRD recipe weight: 1 (beside CE 1).
  """

  student_layers: tuple[str, ...] = ("stage1", "stage2", "stage3")
  teacher_layers: tuple[str, ...] = ("stage1", "stage2", "stage3")
  mid_channels: int = 0
  init_pred_var: float = 5.0
  eps: float = 1e-5
  teacher: str | None = None

  @nn.compact
  def __call__(self, student: Outputs, teachers: Mapping[str, Outputs],
               batch: Batch) -> jax.Array:
    if self.init_pred_var <= self.eps:
      raise ValueError(f"vid needs init_pred_var > eps, got {self.init_pred_var} <= "
                       f"{self.eps}.")
    alpha0 = softplus_inverse(self.init_pred_var - self.eps)
    total = jnp.zeros((), jnp.float32)
    pairs = _named_pairs("vid", student, teachers, self.student_layers, self.teacher_layers,
                         self.teacher)
    for i, (s_name, s, t_name, t) in enumerate(pairs):
      s, t = _match_spatial("vid", s_name, s, t_name, t)
      channels = t.shape[-1]
      mean = _VIDRegressor(self.mid_channels or channels, channels, name=f"regressor{i}")(s)
      alpha = self.param(f"alpha{i}", nn.initializers.constant(alpha0), (channels,),
                         jnp.float32)
      var = jax.nn.softplus(alpha) + self.eps
      per_example = gaussian_nll(mean, var, t.astype(mean.dtype))
      total = total + weighted_mean(per_example, example_weights(batch, per_example))
    return total


# ------------------------------------------------------------------------------------------ AB


@register_loss("ab", ranges={"layer_weights": (NON_NEGATIVE, "each layer's weight")})
class ActivationBoundaries(nn.Module):
  """Activation Boundaries (Heo et al., AAAI 2019), as the CRD code's `ABLoss`:

    loss = sum_l w_l * scale * (1/B) * sum_{b, elements} ab_criterion(r_l(s_l), t_l),

  with `ab_criterion` = `(s + m)^2 [s > -m, t <= 0] + (s - m)^2 [s <= m, t > 0]` (m =
  `margin`), r_l the connector of pair l, `layer_weights` w_l = 2^(l - n + 1) for n layers
  ((1/4, 1/2, 1) for three; give n values for other layer counts) and `scale` = 3/1000 (the
  CRD code's `/ 1000 * 3`). The per-example sums are averaged over the batch with
  `batch['mask']`. `connector`: 'conv1x1_bn' (default: 1x1 conv + BN for every pair, the
  paper's connector), 'auto' (the CRD code: identity where the channel counts match, else
  1x1 conv + BN), or any kind of `distill_jax.connectors`. Spatial sizes must match.

  Features: the paper and the CRD code compare pre-ReLU features. Only the teacher's sign
  enters, so its post-ReLU stages (the default `stage1..3`) give the same loss. For the
  student, name the pre-ReLU block outputs (the module paths of each stage's last block, e.g.
  `('stage1_block2', 'stage2_block2', 'stage3_block2')` for resnet20) to follow the paper;
  with the default post-ReLU stages, keep a BN connector (an identity connector cannot push a
  non-negative feature below -margin, so 'auto' is only meant for pre-ReLU student features).

  Use: in the CRD code AB only pre-trains the connectors and the student's feature layers,
  for 30 epochs (student BN in eval mode, no CE), then trains with CE (+ KD) and no AB term:
  `config.stages = {'ab_init': {'num_epochs': 30, 'train': 'all', 'losses': {'ab': {}}}}`
  and `config.losses` without 'ab'. CRD recipe weight: 1 (in the pre-training stage).
  """

  student_layers: tuple[str, ...] = ("stage1", "stage2", "stage3")
  teacher_layers: tuple[str, ...] = ("stage1", "stage2", "stage3")
  margin: float = 1.0
  layer_weights: tuple[float, ...] = (0.25, 0.5, 1.0)
  scale: float = 3.0 / 1000.0
  connector: str = "conv1x1_bn"
  teacher: str | None = None

  @nn.compact
  def __call__(self, student: Outputs, teachers: Mapping[str, Outputs],
               batch: Batch) -> jax.Array:
    _check_connector("ab", self.connector, ("auto", *CONNECTORS))
    pairs = _named_pairs("ab", student, teachers, self.student_layers, self.teacher_layers,
                         self.teacher)
    if len(self.layer_weights) != len(pairs):
      n = len(pairs)
      suggested = tuple(2.0 ** (i - n + 1) for i in range(n))
      raise ValueError(f"ab compares {n} layer pair(s) but has {len(self.layer_weights)} "
                       f"layer_weights {tuple(self.layer_weights)}; set layer_weights to {n} "
                       f"values, e.g. the CRD code's 2^(i-n+1): {suggested}.")
    total = jnp.zeros((), jnp.float32)
    for i, ((s_name, s, t_name, t), w) in enumerate(zip(pairs, self.layer_weights,
                                                        strict=True)):
      _require_same_spatial("ab", s_name, s, t_name, t)
      kind = self.connector
      if kind == "auto":
        kind = "identity" if s.shape[-1] == t.shape[-1] else "conv1x1_bn"
      if kind == "identity" and s.shape != t.shape:
        raise shape_mismatch("ab", s_name, s.shape, t_name, t.shape,
                             "Set connector='auto' or 'conv1x1_bn' to map the student's "
                             "channels to the teacher's.")
      source = Connector(kind, t.shape[-1], name=f"connector{i}")(s)
      per_example = ab_criterion(source, t.astype(source.dtype), self.margin)
      total = total + w * self.scale * weighted_mean(per_example,
                                                     example_weights(batch, per_example))
    return total


# ------------------------------------------------------------------------------------------ FT


class _Paraphraser(nn.Module):
  """FT's paraphraser (the CRD code's `Paraphraser`), an autoencoder of [B, H, W, C_t]:

  encoder: 3x3 conv C_t -> C_t, [BN], LeakyReLU; 3x3 conv C_t -> K, [BN], LeakyReLU;
           3x3 conv K -> K, [BN], LeakyReLU   (K = factor channels; the output is the factor)
  decoder: 3x3 K -> K, [BN], LeakyReLU; 3x3 K -> C_t, [BN], LeakyReLU;
           3x3 C_t -> C_t, [BN], LeakyReLU.
  Convs have a bias and padding 1. The reference's decoder uses stride-1 transposed 3x3
  convolutions with padding 1, which are 3x3 'same' convolutions (the same function class),
  used here. [BN] only with `use_bn` (the CRD code's default: off).
  """

  channels: int
  factor_channels: int
  use_bn: bool = False
  slope: float = 0.1

  def _layer(self, x: jax.Array, features: int, name: str, train: bool) -> jax.Array:
    x = _conv3x3(features, name)(x)
    if self.use_bn:
      x = _bn(train, f"{name}_bn")(x)
    return nn.leaky_relu(x, self.slope)

  @nn.compact
  def __call__(self, x: jax.Array, *, decode: bool, train: bool
               ) -> tuple[jax.Array, jax.Array | None]:
    """(factor, reconstruction); the reconstruction is None unless `decode`."""
    c, k = self.channels, self.factor_channels
    for i, n in enumerate((c, k, k)):
      x = self._layer(x, n, f"enc{i}", train)
    factor = x
    if not decode:
      return factor, None
    for i, n in enumerate((k, c, c)):
      x = self._layer(x, n, f"dec{i}", train)
    return factor, x


class _Translator(nn.Module):
  """FT's translator (the CRD code's `Translator`) on the student's [B, H, W, C_s]:

  3x3 conv C_s -> C_s, [BN], LeakyReLU; 3x3 conv C_s -> K, [BN], LeakyReLU; 3x3 conv K -> K,
  [BN], LeakyReLU; convs with bias, padding 1; [BN] with `use_bn` (the CRD code's default: on).
  """

  channels: int
  factor_channels: int
  use_bn: bool = True
  slope: float = 0.1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for i, n in enumerate((self.channels, self.factor_channels, self.factor_channels)):
      x = _conv3x3(n, f"conv{i}")(x)
      if self.use_bn:
        x = _bn(train, f"conv{i}_bn")(x)
      x = nn.leaky_relu(x, self.slope)
    return x


@register_loss("ft")
class FactorTransfer(nn.Module):
  """Factor Transfer (Kim et al., NeurIPS 2018).

  The teacher's feature `teacher_layer` [B, H, W, C_t] goes through the paraphraser's encoder
  (`_Paraphraser`: K = int(rate * C_t) factor channels), the student's `student_layer`
  [B, H', W', C_s] through the translator (`_Translator`, to K channels); maps of different
  spatial size are average-pooled to the smaller when the sizes divide. Each factor becomes a
  unit vector (`ft_factor`) and

    mode='transfer':    loss = mean_b distance(u_s, u_t)  (`ft_distance`; batch['mask'] honoured)
    mode='reconstruct': loss = mean over (B, H, W, C) of (decoder(encoder(t)) - t)^2,

  the paraphraser's autoencoder pre-training (the CRD code's `nn.MSELoss`), which trains only
  the paraphraser. With form='paper' (default) the factor is flattened, `D = H*W*K`, and the
  distance is the p-norm (p = 1: L1) of the difference, the paper's eq. 5. With
  form='repdistiller' the factor is the channel mean of `factor^p1`, `D = H*W`, and the
  distance the mean of `|d|^p` over the D entries (the CRD code's `FactorTransfer`). The two
  differ in scale by orders of magnitude (for p = 1 the paper's L1 norm grows like
  `sqrt(H*W*K)`, the CRD code's mean shrinks like `1 / sqrt(H*W)`): the CRD recipe's weight
  200 was tuned with form='repdistiller'.

  In 'transfer' mode the paraphraser is fixed: its output is under stop_gradient and its BN
  (if any) uses running statistics; but the optimizer must also leave it out of weight decay,
  so the term lists the sub-trees not to update in `frozen_params` (the paraphraser in
  'transfer' mode, the translator in 'reconstruct' mode); each stage's optimizer leaves them
  untouched, weight decay included, as the CRD code does by not optimising them. Both modes
  create both sub-trees at init, so a pre-training stage and the main stage can share one term
  name (see the module docstring).

  Defaults: the CRD code's FT on the last stage (`feat[-2]`), rate 0.5, p 1, LeakyReLU 0.1,
  no BN in the paraphraser, BN in the translator. CRD recipe: 30 epochs of paraphraser
  pre-training (lr 0.01 for CIFAR ResNets/WRNs), then weight 200 with CE 1 (form
  'repdistiller').
  """

  student_layer: str = "stage3"
  teacher_layer: str = "stage3"
  mode: str = "transfer"
  rate: float = 0.5
  p: float = 1.0
  form: str = "paper"
  p1: int = 2
  leaky_slope: float = 0.1
  paraphraser_bn: bool = False
  translator_bn: bool = True
  teacher: str | None = None

  MODES: ClassVar[tuple[str, ...]] = ("transfer", "reconstruct")

  @property
  def frozen_params(self) -> tuple[str, ...]:
    """The parameter sub-trees (under the term) that the optimizer must not update."""
    return ("paraphraser",) if self.mode == "transfer" else ("translator",)

  @nn.compact
  def __call__(self, student: Outputs, teachers: Mapping[str, Outputs],
               batch: Batch) -> jax.Array:
    if self.mode not in self.MODES:
      raise ValueError(f"ft mode must be one of {list(self.MODES)}, got {self.mode!r}.")
    if self.form not in ("paper", "repdistiller"):
      raise ValueError(f"ft form must be 'paper' or 'repdistiller', got {self.form!r}.")
    ((s_name, s, t_name, t),) = _named_pairs("ft", student, teachers, self.student_layer,
                                              self.teacher_layer, self.teacher)
    if s.ndim != 4:
      raise shape_mismatch("ft", s_name, s.shape, t_name, t.shape,
                           "Factor transfer needs [B, H, W, C] feature maps: pick conv "
                           "stages (e.g. 'stage3'), not vectors.")
    _match_spatial("ft", s_name, s, t_name, t)  # Raises here, naming the features' shapes.
    train = self.is_mutable_collection("batch_stats")
    factor_channels = max(1, int(t.shape[-1] * self.rate))
    paraphraser = _Paraphraser(t.shape[-1], factor_channels, self.paraphraser_bn,
                               self.leaky_slope, name="paraphraser")
    translator = _Translator(s.shape[-1], factor_channels, self.translator_bn,
                             self.leaky_slope, name="translator")
    reconstruct = self.mode == "reconstruct"
    if reconstruct or self.is_initializing():
      _, rec = paraphraser(t, decode=True, train=train and reconstruct)
    if not reconstruct or self.is_initializing():
      factor_t, _ = paraphraser(t, decode=False, train=False)
      factor_s = translator(s, train=train and not reconstruct)
    if reconstruct:
      per_example = per_example_mean(jnp.square(rec - t.astype(rec.dtype)))
    else:
      factor_t = jax.lax.stop_gradient(factor_t)
      factor_s, factor_t = _match_spatial("ft", s_name, factor_s, t_name, factor_t)
      u_s = ft_factor(factor_s, self.form, self.p1)
      u_t = ft_factor(factor_t, self.form, self.p1)
      per_example = ft_distance(u_s, u_t, self.form, self.p)
    return weighted_mean(per_example, example_weights(batch, per_example))


@register_loss("ft_paraphraser")
class FactorTransferParaphraser(FactorTransfer):
  """FT's paraphraser pre-training: `ft` with mode='reconstruct' by default.

  loss = mean over (B, H, W, C) of (decoder(encoder(t)) - t)^2 for the teacher feature t
  `teacher_layer` (the CRD code's `nn.MSELoss` in its FT init stage). The same module as `ft`,
  so its parameter tree (`paraphraser`, `translator`) is the same; but a term name means one
  loss in every stage, so to carry the trained paraphraser into the main stage, pre-train with
  the `ft` term itself in `mode='reconstruct'` (see the module docstring). CRD recipe: 30
  epochs, weight 1, lr 0.01 for CIFAR ResNets/WRNs.
  """

  mode: str = "reconstruct"


# ------------------------------------------------------------------------------------------ CC


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
               batch: Batch) -> jax.Array:
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


"""Regression hints: the student's features, through a trainable map, predict the teacher's.

Registered here (all Flax module terms; their parameters live in `params['objective'][term]`,
their BatchNorm statistics in `objective_state[term]`):

- `fitnet`: FitNets hints (Romero et al., ICLR 2015).
- `vid`: Variational Information Distillation (Ahn et al., CVPR 2019).
- `ab`: Activation Boundaries (Heo et al., AAAI 2019); meant for a connector pre-training stage.

The other feature losses with trainable parts: `ft` in factor_transfer.py, `cc` in
relations.py, `crd` in contrastive.py.

Defaults follow the CRD paper's code (RepDistiller) where it fixes them, the papers otherwise;
each docstring says where the two differ. The core math is in small pure array functions
(`hint_mse`, `gaussian_nll`, `ab_criterion`), checked against NumPy in
tests/test_hint_losses.py; the registered modules only wire them to features and parameters.

Pre-training stages (see `config.stages`): a stage's term keeps its parameters for the main
stage when both use the same term name and loss. Recipe (RepDistiller, CIFAR-100):

    # AB: 30 epochs of connector + student-feature pre-training, then CE (+ KD) alone.
    config.stages = {'ab_init': {'num_epochs': 30, 'train': 'all', 'losses': {'ab': {}}}}
    config.losses = {'ce': {'weight': 1.0}}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.common.initializers import dense_kernel_init
from distill_jax.common.outputs import Outputs
from distill_jax.common.rules import NON_NEGATIVE
from distill_jax.losses.base import (
  EPS,
  example_weights,
  match_spatial,
  named_feature_pairs,
  per_example_mean,
  register_loss,
  shape_mismatch,
  weighted_mean,
)
from distill_jax.losses.connectors import CONNECTORS, Connector

Batch = Mapping[str, jax.Array]

# ---------------------------------------------------------------------------- pure array math


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


# ----------------------------------------------------------------------------------- helpers


def _require_same_spatial(term: str, s_name: str, s: jax.Array, t_name: str,
                          t: jax.Array) -> None:
  if s.shape[1:-1] != t.shape[1:-1]:
    raise shape_mismatch(
        term, s_name, s.shape, t_name, t.shape,
        "The connectors only change channels, not spatial size: pick student and teacher "
        "layers of equal resolution (e.g. the same stage of two CIFAR ResNets).")


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
  of the CRD code's `ConvReg` when `relu`; any kind of `distill_jax.losses.connectors`;
  'identity' compares `s` itself and needs equal shapes, no ReLU). The squared error is averaged
  over all elements of each example, then over the batch (honouring `batch['mask']`): the CRD
  code's `nn.MSELoss` (the paper's `1/2 ||.||^2` differs by a constant factor).

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
    ((s_name, s, t_name, t),) = named_feature_pairs(
        "fitnet", student, teachers, self.student_layer, self.teacher_layer, self.teacher)
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
    pairs = named_feature_pairs("vid", student, teachers, self.student_layers,
                                self.teacher_layers, self.teacher)
    for i, (s_name, s, t_name, t) in enumerate(pairs):
      s, t = match_spatial("vid", s_name, s, t_name, t)
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
  1x1 conv + BN), or any kind of `distill_jax.losses.connectors`. Spatial sizes must match.

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
    pairs = named_feature_pairs("ab", student, teachers, self.student_layers,
                                self.teacher_layers, self.teacher)
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

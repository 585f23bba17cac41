"""Factor Transfer (Kim et al., NeurIPS 2018): a paraphraser of the teacher's feature map, a
translator of the student's, and the distance between their factors.

Registered here (Flax module terms; their parameters live in `params['objective'][term]`,
their BatchNorm statistics in `objective_state[term]`):

- `ft`: Factor Transfer, with its paraphraser pre-training as `mode='reconstruct'`.
- `ft_paraphraser`: the same module in that mode.

Defaults follow the CRD paper's code (RepDistiller) where it fixes them, the paper otherwise;
`FactorTransfer`'s docstring says where the two differ. The core math is in small pure array
functions (`ft_factor`, `ft_distance`), checked against NumPy in tests/test_hint_losses.py.

Pre-training stage (see `config.stages`): a stage's term keeps its parameters for the main
stage when both use the same term name and loss. Recipe (RepDistiller, CIFAR-100):

    # FT: 30 epochs of paraphraser pre-training (lr 0.01 for CIFAR ResNets/WRNs), then FT.
    config.stages = {'ft_init': {'num_epochs': 30, 'train': 'objective', 'lr': 0.01,
                                 'losses': {'ft': {'mode': 'reconstruct'}}}}
    config.losses = {'ce': {'weight': 1.0}, 'ft': {'weight': 200.0, 'form': 'repdistiller'}}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.common.initializers import dense_kernel_init
from distill_jax.common.outputs import Outputs
from distill_jax.losses.base import (
  example_weights,
  l2_normalize,
  match_spatial,
  named_feature_pairs,
  per_example_mean,
  register_loss,
  shape_mismatch,
  weighted_mean,
)

Batch = Mapping[str, jax.Array]

# ---------------------------------------------------------------------------- pure array math


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


# ----------------------------------------------------------------------------------- layers


def _bn(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _conv3x3(features: int, name: str) -> nn.Conv:
  """3x3 convolution, padding 1, with bias; PyTorch's default init (uniform +-1/sqrt(fan_in))
  for the kernel, a zero bias."""
  return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=True,
                 kernel_init=dense_kernel_init, name=name)


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
    ((s_name, s, t_name, t),) = named_feature_pairs(
        "ft", student, teachers, self.student_layer, self.teacher_layer, self.teacher)
    if s.ndim != 4:
      raise shape_mismatch("ft", s_name, s.shape, t_name, t.shape,
                           "Factor transfer needs [B, H, W, C] feature maps: pick conv "
                           "stages (e.g. 'stage3'), not vectors.")
    match_spatial("ft", s_name, s, t_name, t)  # Raises here, naming the features' shapes.
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
      factor_s, factor_t = match_spatial("ft", s_name, factor_s, t_name, factor_t)
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

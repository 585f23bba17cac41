"""VGG with BatchNorm (Simonyan & Zisserman 2015) for 32x32 inputs, as in the CRD code.

The architecture follows the VGG definition of RepDistiller, the code of "Contrastive
Representation Distillation" (Tian et al. 2020), so parameter counts and features match that
paper's vgg8 and vgg13. Five groups of conv3x3-BN-ReLU layers, 2x2 max-pooling after the first
three groups (and after the fourth only for inputs of 64 pixels or more: the CRD code pools there
when the input height is 64), global average pooling, and a single Dense(512 -> num_classes).

Unlike the ResNets, the convolutions here keep their bias even though BN follows (as in the CRD
code, whose `nn.Conv2d` keeps PyTorch's default `bias=True`); the parameter counts in the CRD
table include those biases. The head is initialised N(0, 0.01) with a zero bias, as there.

Sown features (`intermediates` collection): `stem` (group 0 after its ReLU), `stage1`..`stage4`
(groups 1-4 after their ReLU, before pooling: the CRD code's `feat`), `pool` (`[B, 512]`). Each
group is a module, `block0`..`block4` as in the CRD code (inside: `conv0`, `bn0`, `conv1`, ...),
whose output is the last BN's output *before* the ReLU (the CRD code's `preact` features), so those
can be tapped by module path. The head is `head`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from distill_jax.models import batch_norm, conv, global_avg_pool, maybe_remat, register_model

VGG8_CFG = ((64,), (128,), (256,), (512,), (512,))
VGG13_CFG = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))


class VGGGroup(nn.Module):
  """conv3x3(+bias)-BN layers with ReLUs between them; returns the last BN's output pre-ReLU."""

  widths: Sequence[int]
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, width in enumerate(self.widths):
      if i:
        x = nn.relu(x)
      x = conv(width, 3, name=f"conv{i}", use_bias=True)(x)
      x = batch_norm(train, self.bn_axis_name, f"bn{i}")(x)
    return x


def _max_pool(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (2, 2), strides=(2, 2))


class VGG(nn.Module):
  """VGG-BN for small images; see the module docstring.

  Attributes:
    num_classes: size of the Dense head.
    cfg: the channel widths of the five conv groups.
    bn_axis_name: pmap axis name for cross-device BatchNorm statistics, or None.
    remat: recompute each conv group's activations in the backward pass (`nn.remat`).
  """

  num_classes: int
  cfg: Sequence[Sequence[int]] = VGG8_CFG
  bn_axis_name: str | None = None
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if len(self.cfg) != 5:
      raise ValueError(f"VGG cfg must have 5 groups, got {len(self.cfg)}.")
    height = x.shape[1]
    group = maybe_remat(VGGGroup, self.remat)
    x = nn.relu(group(self.cfg[0], self.bn_axis_name, name="block0")(x, train))
    self.sow("intermediates", "stem", x)
    for stage in range(1, 5):
      if stage < 4 or height >= 64:
        x = _max_pool(x)
      x = nn.relu(group(self.cfg[stage], self.bn_axis_name, name=f"block{stage}")(x, train))
      self.sow("intermediates", f"stage{stage}", x)
    x = global_avg_pool(x)
    self.sow("intermediates", "pool", x)
    return nn.Dense(
        self.num_classes, kernel_init=nn.initializers.normal(0.01),
        bias_init=nn.initializers.zeros, name="head")(x)


@register_model("vgg8")
def vgg8(num_classes: int, **kwargs: Any) -> VGG:
  """VGG-8 with BN (one conv per group); 3,965,028 params with 100 classes."""
  return VGG(num_classes=num_classes, cfg=VGG8_CFG, **kwargs)


@register_model("vgg13")
def vgg13(num_classes: int, **kwargs: Any) -> VGG:
  """VGG-13 with BN (two convs per group); 9,462,180 params with 100 classes."""
  return VGG(num_classes=num_classes, cfg=VGG13_CFG, **kwargs)

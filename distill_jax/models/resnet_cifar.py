"""CIFAR ResNets (He et al. 2016, "Deep Residual Learning", section 4.2) as in the CRD code.

The architecture follows the model definitions of RepDistiller, the code of "Contrastive
Representation Distillation" (Tian et al. 2020), so parameter counts and features match the
teachers and students of that paper: a 3x3 stem conv + BN + ReLU, three stages of (depth - 2) / 6
basic blocks with strides 1/2/2, a 1x1 conv + BN projection shortcut where the shape changes,
global average pooling and a Dense head (PyTorch's default Linear weight init, zero bias).

- resnet8 ... resnet110: stem width 16, stage widths 16/32/64.
- resnet8x4, resnet32x4: stem width 32, stage widths 64/128/256 (the first block of stage 1 then
  has a projection shortcut, as in the CRD code).

Sown features (`intermediates` collection): `stem` (after the stem's ReLU), `stage1`..`stage3` (the
post-ReLU output of each stage's last block, the CRD code's `feat`), `pool` (`[B, widths[-1]]`).
The pre-ReLU block outputs (the CRD code's `preact`) are the outputs of the block modules, e.g.
the module path `stage3_block2` in a resnet20; the stem is `stem_conv` + `stem_bn`, the head
`head`. Inside a block: `conv1`, `bn1`, `conv2`, `bn2` and, where present, `shortcut_conv`,
`shortcut_bn` (PyTorch's names).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from distill_jax.common.initializers import dense_kernel_init
from distill_jax.models import (
    batch_norm,
    conv,
    global_avg_pool,
    maybe_remat,
    register_model,
)


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN plus shortcut; returns the sum *before* the final ReLU."""

  features: int
  strides: int = 1
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = conv(self.features, 3, self.strides, name="conv1")(x)
    y = nn.relu(batch_norm(train, self.bn_axis_name, "bn1")(y))
    y = conv(self.features, 3, name="conv2")(y)
    y = batch_norm(train, self.bn_axis_name, "bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.strides, name="shortcut_conv")(x)
      x = batch_norm(train, self.bn_axis_name, "shortcut_bn")(x)
    return x + y


class CifarResNet(nn.Module):
  """A CIFAR-style ResNet of basic blocks; see the module docstring.

  Attributes:
    num_classes: size of the Dense head.
    depth: 6n + 2 layers, n blocks per stage.
    widths: (stem, stage1, stage2, stage3) channel counts.
    bn_axis_name: pmap axis name for cross-device BatchNorm statistics, or None.
    remat: recompute each block's activations in the backward pass (`nn.remat`).
  """

  num_classes: int
  depth: int = 20
  widths: Sequence[int] = (16, 16, 32, 64)
  bn_axis_name: str | None = None
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if (self.depth - 2) % 6 or self.depth < 8:
      raise ValueError(f"CifarResNet depth must be 6n + 2 with n >= 1, got {self.depth}.")
    if len(self.widths) != 4:
      raise ValueError(f"widths must be (stem, stage1, stage2, stage3), got {self.widths}.")
    blocks_per_stage = (self.depth - 2) // 6
    block_cls = maybe_remat(BasicBlock, self.remat)
    x = conv(self.widths[0], 3, name="stem_conv")(x)
    x = nn.relu(batch_norm(train, self.bn_axis_name, "stem_bn")(x))
    self.sow("intermediates", "stem", x)
    for stage, (width, strides) in enumerate(zip(self.widths[1:], (1, 2, 2), strict=True), 1):
      for block in range(blocks_per_stage):
        x = block_cls(
            width, strides if block == 0 else 1, self.bn_axis_name,
            name=f"stage{stage}_block{block}")(x, train)
        x = nn.relu(x)
      self.sow("intermediates", f"stage{stage}", x)
    x = global_avg_pool(x)
    self.sow("intermediates", "pool", x)
    return nn.Dense(self.num_classes, kernel_init=dense_kernel_init, name="head")(x)


def _resnet(num_classes: int, depth: int, widths: Sequence[int], **kwargs: Any) -> CifarResNet:
  return CifarResNet(num_classes=num_classes, depth=depth, widths=tuple(widths), **kwargs)


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


@register_model("resnet8")
def resnet8(num_classes: int, **kwargs: Any) -> CifarResNet:
  """ResNet-8 (1 block per stage, widths 16/32/64); 83,892 params with 100 classes."""
  return _resnet(num_classes, 8, _NARROW, **kwargs)


@register_model("resnet14")
def resnet14(num_classes: int, **kwargs: Any) -> CifarResNet:
  """ResNet-14 (2 blocks per stage, widths 16/32/64); 181,108 params with 100 classes."""
  return _resnet(num_classes, 14, _NARROW, **kwargs)


@register_model("resnet20")
def resnet20(num_classes: int, **kwargs: Any) -> CifarResNet:
  """ResNet-20 (3 blocks per stage, widths 16/32/64); 278,324 params with 100 classes."""
  return _resnet(num_classes, 20, _NARROW, **kwargs)


@register_model("resnet32")
def resnet32(num_classes: int, **kwargs: Any) -> CifarResNet:
  """ResNet-32 (5 blocks per stage, widths 16/32/64); 472,756 params with 100 classes."""
  return _resnet(num_classes, 32, _NARROW, **kwargs)


@register_model("resnet44")
def resnet44(num_classes: int, **kwargs: Any) -> CifarResNet:
  """ResNet-44 (7 blocks per stage, widths 16/32/64); 667,188 params with 100 classes."""
  return _resnet(num_classes, 44, _NARROW, **kwargs)


@register_model("resnet56")
def resnet56(num_classes: int, **kwargs: Any) -> CifarResNet:
  """ResNet-56 (9 blocks per stage, widths 16/32/64); 861,620 params with 100 classes."""
  return _resnet(num_classes, 56, _NARROW, **kwargs)


@register_model("resnet110")
def resnet110(num_classes: int, **kwargs: Any) -> CifarResNet:
  """ResNet-110 (18 blocks per stage, widths 16/32/64); 1,736,564 params with 100 classes."""
  return _resnet(num_classes, 110, _NARROW, **kwargs)


@register_model("resnet8x4")
def resnet8x4(num_classes: int, **kwargs: Any) -> CifarResNet:
  """ResNet-8x4 (stem 32, widths 64/128/256); 1,233,540 params with 100 classes."""
  return _resnet(num_classes, 8, _WIDE, **kwargs)


@register_model("resnet32x4")
def resnet32x4(num_classes: int, **kwargs: Any) -> CifarResNet:
  """ResNet-32x4 (stem 32, widths 64/128/256); 7,433,860 params with 100 classes."""
  return _resnet(num_classes, 32, _WIDE, **kwargs)

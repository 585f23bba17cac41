"""ResNet-50 for CIFAR (He et al. 2016, bottleneck blocks) as in the CRD code.

The architecture follows RepDistiller's `ResNet50` (its resnetv2 module, the CRD paper's
"ResNet50" teacher), so the parameter count (23,705,252 with 100 classes) and the features match
that paper's cross-architecture table. It is the ImageNet ResNet-50 adapted to 32x32 images: a
conv3x3 stride-1 stem to 64 channels + BN + ReLU and no max-pool, then four stages of 3/4/6/3
bottleneck blocks (conv1x1 + BN + ReLU, conv3x3 (the strided one) + BN + ReLU, conv1x1 to 4x
the width + BN, plus a shortcut: identity, or conv1x1 + BN where the shape changes) at widths
64/128/256/512 (outputs 256/512/1024/2048) with strides 1/2/2/2, global average pooling and a
Dense(2048 -> classes) head. Convolutions have no bias and Kaiming-normal fan-out init.

Sown features (`intermediates` collection): `stem` ([B, 32, 32, 64] on 32x32 inputs), `stage1`..
`stage4` (each stage's output after its last ReLU: [B, 32, 32, 256], [B, 16, 16, 512], [B, 8, 8,
1024], [B, 4, 4, 2048]; the reference's `feat`) and `pool` ([B, 2048]). A block module returns
the sum *before* its ReLU (the reference's `preact`), so the module path `stage4_block2` taps
that. Module names: `stem_conv`, `stem_bn`, `stage{s}_block{i}` (inside `conv1`..`conv3`,
`bn1`..`bn3`, and where present `shortcut_conv`, `shortcut_bn`), `head`.
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


class Bottleneck(nn.Module):
  """conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN plus shortcut; returns the sum before ReLU."""

  features: int  # The bottleneck width; the block outputs `expansion * features` channels.
  strides: int = 1
  expansion: int = 4
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    out = self.expansion * self.features
    y = conv(self.features, 1, name="conv1")(x)
    y = nn.relu(batch_norm(train, self.bn_axis_name, "bn1")(y))
    y = conv(self.features, 3, self.strides, name="conv2")(y)
    y = nn.relu(batch_norm(train, self.bn_axis_name, "bn2")(y))
    y = conv(out, 1, name="conv3")(y)
    y = batch_norm(train, self.bn_axis_name, "bn3")(y)
    if self.strides != 1 or x.shape[-1] != out:
      x = conv(out, 1, self.strides, name="shortcut_conv")(x)
      x = batch_norm(train, self.bn_axis_name, "shortcut_bn")(x)
    return x + y


class BottleneckResNet(nn.Module):
  """A CIFAR ResNet of bottleneck blocks with four stages; see the module docstring.

  Attributes:
    num_classes: size of the Dense head.
    num_blocks: blocks per stage ((3, 4, 6, 3): ResNet-50).
    widths: the stages' bottleneck widths (outputs are 4x these).
    bn_axis_name: pmap axis name for cross-device BatchNorm statistics, or None.
    remat: recompute each block's activations in the backward pass (`nn.remat`).
  """

  num_classes: int
  num_blocks: Sequence[int] = (3, 4, 6, 3)
  widths: Sequence[int] = (64, 128, 256, 512)
  bn_axis_name: str | None = None
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    block_cls = maybe_remat(Bottleneck, self.remat)
    x = conv(64, 3, name="stem_conv")(x)
    x = nn.relu(batch_norm(train, self.bn_axis_name, "stem_bn")(x))
    self.sow("intermediates", "stem", x)
    strides = (1, 2, 2, 2)
    for stage, (width, n, s) in enumerate(
        zip(self.widths, self.num_blocks, strides, strict=True), 1):
      for i in range(n):
        x = block_cls(width, s if i == 0 else 1, 4, self.bn_axis_name,
                      name=f"stage{stage}_block{i}")(x, train)
        x = nn.relu(x)
      self.sow("intermediates", f"stage{stage}", x)
    x = global_avg_pool(x)
    self.sow("intermediates", "pool", x)
    return nn.Dense(self.num_classes, kernel_init=dense_kernel_init, name="head")(x)


@register_model("resnet50")
def resnet50(num_classes: int, **kwargs: Any) -> BottleneckResNet:
  """ResNet-50 for CIFAR (3x3 stem, no max-pool, 3/4/6/3 bottlenecks); 23,705,252 params with
  100 classes."""
  return BottleneckResNet(num_classes=num_classes, **kwargs)

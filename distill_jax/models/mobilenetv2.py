"""MobileNetV2 (Sandler et al. 2018, "Inverted Residuals and Linear Bottlenecks") for CIFAR.

The architecture follows RepDistiller's `mobile_half` (the CRD paper's "MobileNetV2" student:
expansion 6, width multiplier 0.5), so its parameter count (812,836 with 100 classes) and its
features match that paper's cross-architecture table:

- stem: conv3x3 stride 2 to int(32 w) = 16 channels + BN + ReLU (32x32 -> 16x16);
- seven groups of inverted residual blocks, (expansion t, width c, blocks n, stride s) =
  (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
  (6, 320, 1, 1), widths int(c w) = 8, 12, 16, 32, 48, 80, 160; only a group's first block
  strides. A block is conv1x1 (C -> tC) + BN + ReLU, depthwise conv3x3 + BN + ReLU, conv1x1
  (tC -> C') + BN with no ReLU (the linear bottleneck), plus the input where the stride is 1 and
  C == C'. Unlike the paper's t = 1 block, the reference keeps the first 1x1 conv there too;
- conv1x1 to 1280 channels + BN + ReLU, global average pooling, Dense(1280 -> classes).

Convolutions have no bias and Kaiming-normal fan-out init; the head is N(0, 0.01) with a zero
bias (the reference's init).

Sown features (`intermediates` collection), the reference's `feat` list: `stem` (after the stem's
ReLU, [B, 16, 16, 16] on 32x32 inputs), `stage1` (after group 1: [B, 16, 16, 12]), `stage2`
(group 2: [B, 8, 8, 16]), `stage3` (group 4: [B, 4, 4, 48]), `stage4` (group 6: [B, 2, 2,
160]) and `pool` ([B, 1280]). The groups' block outputs have no ReLU, so `stage1`..`stage4` are
the reference's pre-activation features too. Module names: `stem_conv`, `stem_bn`,
`group{g}_block{i}` (g = 0..6; inside `expand_conv`, `expand_bn`, `dw_conv`, `dw_bn`,
`project_conv`, `project_bn`), `last_conv`, `last_bn`, `head`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from distill_jax.models import (
    batch_norm,
    conv,
    global_avg_pool,
    maybe_remat,
    register_model,
)

# (expansion, width, blocks, stride) of each group at width multiplier 1.
MOBILENETV2_CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                   (6, 160, 3, 2), (6, 320, 1, 1))
# Groups after which the reference takes its features stage1..stage4.
_FEATURE_GROUPS = {1: "stage1", 2: "stage2", 4: "stage3", 6: "stage4"}


class InvertedResidual(nn.Module):
  """conv1x1-BN-ReLU, depthwise conv3x3-BN-ReLU, conv1x1-BN (+ input when shapes allow)."""

  features: int
  strides: int = 1
  expansion: int = 6
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    hidden = x.shape[-1] * self.expansion
    y = conv(hidden, 1, name="expand_conv")(x)
    y = nn.relu(batch_norm(train, self.bn_axis_name, "expand_bn")(y))
    y = conv(hidden, 3, self.strides, groups=hidden, name="dw_conv")(y)
    y = nn.relu(batch_norm(train, self.bn_axis_name, "dw_bn")(y))
    y = conv(self.features, 1, name="project_conv")(y)
    y = batch_norm(train, self.bn_axis_name, "project_bn")(y)
    if self.strides == 1 and x.shape[-1] == self.features:
      return x + y
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 for 32x32 inputs; see the module docstring.

  Attributes:
    num_classes: size of the Dense head.
    expansion: the expansion t of every group but the first (which has t = 1).
    width_mult: the width multiplier w (0.5 for the CRD paper's student).
    cfg: (expansion, width, blocks, stride) per group; an expansion of 6 means `expansion`.
    bn_axis_name: pmap axis name for cross-device BatchNorm statistics, or None.
    remat: recompute each block's activations in the backward pass (`nn.remat`).
  """

  num_classes: int
  expansion: int = 6
  width_mult: float = 0.5
  cfg: Sequence[Sequence[int]] = MOBILENETV2_CFG
  bn_axis_name: str | None = None
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    block_cls = maybe_remat(InvertedResidual, self.remat)
    x = conv(int(32 * self.width_mult), 3, 2, name="stem_conv")(x)
    x = nn.relu(batch_norm(train, self.bn_axis_name, "stem_bn")(x))
    self.sow("intermediates", "stem", x)
    for g, (t, c, n, s) in enumerate(self.cfg):
      for i in range(n):
        x = block_cls(int(c * self.width_mult), s if i == 0 else 1,
                      self.expansion if t != 1 else 1, self.bn_axis_name,
                      name=f"group{g}_block{i}")(x, train)
      if g in _FEATURE_GROUPS:
        self.sow("intermediates", _FEATURE_GROUPS[g], x)
    last = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
    x = conv(last, 1, name="last_conv")(x)
    x = nn.relu(batch_norm(train, self.bn_axis_name, "last_bn")(x))
    x = global_avg_pool(x)
    self.sow("intermediates", "pool", x)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                    bias_init=nn.initializers.zeros, name="head")(x)


@register_model("mobilenetv2")
def mobilenetv2(num_classes: int, **kwargs: Any) -> MobileNetV2:
  """MobileNetV2 at width 0.5, expansion 6 (the CRD code's `mobile_half`); 812,836 params
  with 100 classes."""
  return MobileNetV2(num_classes=num_classes, **kwargs)

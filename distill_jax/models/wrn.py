"""Wide ResNets (Zagoruyko & Komodakis 2016, "Wide Residual Networks") as in the CRD code.

The architecture follows the WRN definition of RepDistiller, the code of "Contrastive
Representation Distillation" (Tian et al. 2020), so parameter counts and features match that
paper's teachers and students. WRN-d-k has a 3x3 16-channel stem conv (no BN: the blocks are
pre-activation), three stages of (d - 4) / 6 blocks at widths 16k/32k/64k with strides 1/2/2, a
final BN + ReLU, global average pooling and a Dense head.

A block is BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus a shortcut. Where the block changes the
width (or the stride), the shortcut is a 1x1 conv applied to the *activated* input
(ReLU(BN(x))), otherwise it is the identity on the raw input, as in the original code.

Sown features (`intermediates` collection): `stem` (the stem conv's output), `stage1`..`stage3`
(each stage's raw residual output, which is what the CRD code returns as `feat`; being
pre-activation blocks these are not post-ReLU like the CIFAR ResNets' features: the CRD
`preact=True` variant passes them through the next BN instead), `pool` (`[B, 64k]`, after the
final BN + ReLU). Module names: `stem_conv`, `stage1_block0`.. (each with `bn1`, `conv1`, `bn2`,
`conv2` and, where present, `shortcut_conv`), `final_bn`, `head`.
"""

from __future__ import annotations

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


class WideBasicBlock(nn.Module):
  """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus shortcut."""

  features: int
  strides: int = 1
  dropout_rate: float = 0.0
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    activated = nn.relu(batch_norm(train, self.bn_axis_name, "bn1")(x))
    y = conv(self.features, 3, self.strides, name="conv1")(activated)
    y = nn.relu(batch_norm(train, self.bn_axis_name, "bn2")(y))
    if self.dropout_rate > 0:
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = conv(self.features, 3, name="conv2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.strides, name="shortcut_conv")(activated)
    return x + y


class WideResNet(nn.Module):
  """WRN-depth-widen_factor for 32x32 inputs; see the module docstring.

  Attributes:
    num_classes: size of the Dense head.
    depth: 6n + 4 layers, n blocks per stage.
    widen_factor: k, the stage widths are 16k, 32k, 64k.
    dropout_rate: dropout between a block's two convs (0 in the CRD code); needs a 'dropout' RNG
      when positive and train=True.
    bn_axis_name: pmap axis name for cross-device BatchNorm statistics, or None.
    remat: recompute each block's activations in the backward pass (`nn.remat`).
  """

  num_classes: int
  depth: int = 16
  widen_factor: int = 1
  dropout_rate: float = 0.0
  bn_axis_name: str | None = None
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if (self.depth - 4) % 6 or self.depth < 10:
      raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {self.depth}.")
    blocks_per_stage = (self.depth - 4) // 6
    block_cls = maybe_remat(WideBasicBlock, self.remat)
    k = self.widen_factor
    x = conv(16, 3, name="stem_conv")(x)
    self.sow("intermediates", "stem", x)
    widths = (16 * k, 32 * k, 64 * k)
    for stage, (width, strides) in enumerate(zip(widths, (1, 2, 2), strict=True), 1):
      for block in range(blocks_per_stage):
        x = block_cls(
            width, strides if block == 0 else 1, self.dropout_rate, self.bn_axis_name,
            name=f"stage{stage}_block{block}")(x, train)
      self.sow("intermediates", f"stage{stage}", x)
    x = nn.relu(batch_norm(train, self.bn_axis_name, "final_bn")(x))
    x = global_avg_pool(x)
    self.sow("intermediates", "pool", x)
    return nn.Dense(
        self.num_classes, kernel_init=dense_kernel_init, bias_init=nn.initializers.zeros,
        name="head")(x)


@register_model("wrn_16_1")
def wrn_16_1(num_classes: int, **kwargs: Any) -> WideResNet:
  """WRN-16-1 (2 blocks per stage, widths 16/32/64); 180,916 params with 100 classes."""
  return WideResNet(num_classes=num_classes, depth=16, widen_factor=1, **kwargs)


@register_model("wrn_16_2")
def wrn_16_2(num_classes: int, **kwargs: Any) -> WideResNet:
  """WRN-16-2 (2 blocks per stage, widths 32/64/128); 703,284 params with 100 classes."""
  return WideResNet(num_classes=num_classes, depth=16, widen_factor=2, **kwargs)


@register_model("wrn_40_1")
def wrn_40_1(num_classes: int, **kwargs: Any) -> WideResNet:
  """WRN-40-1 (6 blocks per stage, widths 16/32/64); 569,780 params with 100 classes."""
  return WideResNet(num_classes=num_classes, depth=40, widen_factor=1, **kwargs)


@register_model("wrn_40_2")
def wrn_40_2(num_classes: int, **kwargs: Any) -> WideResNet:
  """WRN-40-2 (6 blocks per stage, widths 32/64/128); 2,255,156 params with 100 classes."""
  return WideResNet(num_classes=num_classes, depth=40, widen_factor=2, **kwargs)

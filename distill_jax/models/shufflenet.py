"""ShuffleNet V1 (Zhang et al. 2018) and V2 (Ma et al. 2018) for CIFAR, as in the CRD code.

The architectures follow RepDistiller's `ShuffleV1` and `ShuffleV2` (the CRD paper's students),
so their parameter counts (949,258 and 1,355,528 with 100 classes) and features match that
paper's cross-architecture table. Both start with a conv1x1 (3 -> 24) + BN + ReLU stem at full
resolution (no stride, no max-pool: CIFAR images are small) and have three stages that each halve
the resolution (32 -> 16 -> 8 -> 4), global average pooling and a Dense head.

- `shufflev1` (groups 3, stage widths 240/480/960, 4/8/4 units): a unit is grouped conv1x1
  (C -> C'/4; one group when its input is the 24-channel stem) + BN + ReLU, channel shuffle,
  depthwise conv3x3 + BN + ReLU, grouped conv1x1 (-> C') + BN, then ReLU(sum with the input),
  or, in a stage's first (stride-2) unit, ReLU(concat with a 3x3 stride-2 average pool of the
  input, zero padding counted), whose branch therefore outputs C' = width - C.
- `shufflev2` (widths 116/232/464, 3/7/3 units after each stage's down-sampling unit, a
  conv1x1 to 1024 + BN + ReLU before pooling): a down-sampling unit concatenates two branches
  (depthwise conv3x3 s2 + BN, conv1x1 + BN + ReLU | conv1x1 + BN + ReLU, depthwise conv3x3 s2 +
  BN, conv1x1 + BN + ReLU), each of width/2 channels, then shuffles (2 groups); a basic unit
  splits the channels in halves, keeps the first and passes the second through conv1x1 + BN +
  ReLU, depthwise conv3x3 + BN, conv1x1 + BN + ReLU, concatenates and shuffles.

Convolutions have no bias and, as the reference leaves them at PyTorch's default init,
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) weights (as the head's weight; its bias starts at zero).

Sown features (`intermediates` collection), the reference's `feat` list: `stem` ([B, 32, 32,
24]), `stage1`..`stage3` (each stage's output: [B, 16, 16, 240], [B, 8, 8, 480], [B, 4, 4, 960]
for V1; 116, 232, 464 channels for V2) and `pool` ([B, 960] for V1, [B, 1024] for V2). Module
names: `stem_conv`, `stem_bn`, `stage{s}_block{i}` (V2: block 0 is the down-sampling unit),
V2's `last_conv`, `last_bn`, and `head`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.common.initializers import dense_kernel_init
from distill_jax.models import (
    batch_norm,
    conv,
    global_avg_pool,
    maybe_remat,
    register_model,
)

# PyTorch's default Conv2d init (kaiming_uniform with a = sqrt(5)) is U(+-1/sqrt(fan_in)), the
# same rule as its Linear's; Flax counts a grouped kernel's fan-in per group, as PyTorch does.
torch_default_init = dense_kernel_init


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """ShuffleNet's channel shuffle on NHWC: channel `g * (C/groups) + j` moves to `j * groups + g`
  (PyTorch's `view(N, g, C/g, H, W).transpose(1, 2)` on NCHW)."""
  *lead, channels = x.shape
  x = x.reshape(*lead, groups, channels // groups)
  return jnp.swapaxes(x, -1, -2).reshape(*lead, channels)


def _conv(features: int, kernel_size: int, strides: int = 1, *, name: str,
          groups: int = 1) -> nn.Conv:
  return conv(features, kernel_size, strides, groups=groups, kernel_init=torch_default_init,
              name=name)


def _stem(model: nn.Module, x: jax.Array, train: bool) -> jax.Array:
  x = _conv(24, 1, name="stem_conv")(x)
  x = nn.relu(batch_norm(train, model.bn_axis_name, "stem_bn")(x))
  model.sow("intermediates", "stem", x)
  return x


# ------------------------------------------------------------------------------ ShuffleNet V1


class ShuffleV1Unit(nn.Module):
  """A ShuffleNet V1 unit; see the module docstring. Returns the post-ReLU output."""

  features: int  # The branch's output channels (width - input channels when strided).
  strides: int = 1
  groups: int = 3
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    mid = self.features // 4
    first_groups = 1 if x.shape[-1] == 24 else self.groups
    y = _conv(mid, 1, groups=first_groups, name="conv1")(x)
    y = nn.relu(batch_norm(train, self.bn_axis_name, "bn1")(y))
    y = channel_shuffle(y, first_groups)
    y = _conv(mid, 3, self.strides, groups=mid, name="conv2")(y)
    y = nn.relu(batch_norm(train, self.bn_axis_name, "bn2")(y))
    y = _conv(self.features, 1, groups=self.groups, name="conv3")(y)
    y = batch_norm(train, self.bn_axis_name, "bn3")(y)
    if self.strides == 2:
      shortcut = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                             count_include_pad=True)
      return nn.relu(jnp.concatenate([y, shortcut], axis=-1))
    return nn.relu(y + x)


class ShuffleNetV1(nn.Module):
  """ShuffleNet V1 for 32x32 inputs; see the module docstring.

  Attributes:
    num_classes: size of the Dense head.
    widths: output channels of the three stages.
    num_blocks: units per stage.
    groups: groups of the 1x1 convolutions.
    bn_axis_name: pmap axis name for cross-device BatchNorm statistics, or None.
    remat: recompute each unit's activations in the backward pass (`nn.remat`).
  """

  num_classes: int
  widths: Sequence[int] = (240, 480, 960)
  num_blocks: Sequence[int] = (4, 8, 4)
  groups: int = 3
  bn_axis_name: str | None = None
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    unit = maybe_remat(ShuffleV1Unit, self.remat)
    x = _stem(self, x, train)
    for stage, (width, n) in enumerate(zip(self.widths, self.num_blocks, strict=True), 1):
      for i in range(n):
        x = unit(width - x.shape[-1] if i == 0 else width, 2 if i == 0 else 1, self.groups,
                 self.bn_axis_name, name=f"stage{stage}_block{i}")(x, train)
      self.sow("intermediates", f"stage{stage}", x)
    x = global_avg_pool(x)
    self.sow("intermediates", "pool", x)
    return nn.Dense(self.num_classes, kernel_init=dense_kernel_init, name="head")(x)


# ------------------------------------------------------------------------------ ShuffleNet V2


class ShuffleV2DownUnit(nn.Module):
  """ShuffleNet V2's stride-2 unit: two branches of `features // 2` channels, then a shuffle."""

  features: int
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    mid, channels = self.features // 2, x.shape[-1]
    bn = lambda name: batch_norm(train, self.bn_axis_name, name)  # noqa: E731
    left = bn("bn1")(_conv(channels, 3, 2, groups=channels, name="conv1")(x))
    left = nn.relu(bn("bn2")(_conv(mid, 1, name="conv2")(left)))
    right = nn.relu(bn("bn3")(_conv(mid, 1, name="conv3")(x)))
    right = bn("bn4")(_conv(mid, 3, 2, groups=mid, name="conv4")(right))
    right = nn.relu(bn("bn5")(_conv(mid, 1, name="conv5")(right)))
    return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleV2Unit(nn.Module):
  """ShuffleNet V2's basic unit: split the channels, transform the second half, concat, shuffle."""

  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    half = x.shape[-1] // 2
    kept, y = x[..., :half], x[..., half:]
    bn = lambda name: batch_norm(train, self.bn_axis_name, name)  # noqa: E731
    y = nn.relu(bn("bn1")(_conv(half, 1, name="conv1")(y)))
    y = bn("bn2")(_conv(half, 3, groups=half, name="conv2")(y))
    y = nn.relu(bn("bn3")(_conv(half, 1, name="conv3")(y)))
    return channel_shuffle(jnp.concatenate([kept, y], axis=-1), 2)


class ShuffleNetV2(nn.Module):
  """ShuffleNet V2 for 32x32 inputs; see the module docstring.

  Attributes:
    num_classes: size of the Dense head.
    widths: output channels of the three stages and of the last conv1x1.
    num_blocks: basic units per stage (after its down-sampling unit).
    bn_axis_name: pmap axis name for cross-device BatchNorm statistics, or None.
    remat: recompute each unit's activations in the backward pass (`nn.remat`).
  """

  num_classes: int
  widths: Sequence[int] = (116, 232, 464, 1024)
  num_blocks: Sequence[int] = (3, 7, 3)
  bn_axis_name: str | None = None
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    down, unit = (maybe_remat(ShuffleV2DownUnit, self.remat),
                  maybe_remat(ShuffleV2Unit, self.remat))
    x = _stem(self, x, train)
    for stage, (width, n) in enumerate(zip(self.widths[:3], self.num_blocks, strict=True), 1):
      x = down(width, self.bn_axis_name, name=f"stage{stage}_block0")(x, train)
      for i in range(1, n + 1):
        x = unit(self.bn_axis_name, name=f"stage{stage}_block{i}")(x, train)
      self.sow("intermediates", f"stage{stage}", x)
    x = _conv(self.widths[3], 1, name="last_conv")(x)
    x = nn.relu(batch_norm(train, self.bn_axis_name, "last_bn")(x))
    x = global_avg_pool(x)
    self.sow("intermediates", "pool", x)
    return nn.Dense(self.num_classes, kernel_init=dense_kernel_init, name="head")(x)


@register_model("shufflev1")
def shufflev1(num_classes: int, **kwargs: Any) -> ShuffleNetV1:
  """ShuffleNet V1 (groups 3, widths 240/480/960); 949,258 params with 100 classes."""
  return ShuffleNetV1(num_classes=num_classes, **kwargs)


@register_model("shufflev2")
def shufflev2(num_classes: int, **kwargs: Any) -> ShuffleNetV2:
  """ShuffleNet V2 1x (widths 116/232/464, 1024); 1,355,528 params with 100 classes."""
  return ShuffleNetV2(num_classes=num_classes, **kwargs)

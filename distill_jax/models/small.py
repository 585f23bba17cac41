"""Small models for the embedded 8x8 grayscale digits data set and for tests.

Not from a paper: they exist so that a default run and the test suite compile and train in
seconds on a CPU while exercising the same contract as the CIFAR models (NHWC in, logits out,
BatchNorm with `bn_axis_name`, sown `stem`/`stage*`/`pool` features).

- `cnn`: a conv3x3-BN-ReLU stem, then one stride-2 conv3x3-BN-ReLU per entry of `widths`,
  global average pooling and a Dense head. Sows `stem`, `stage1`.. (post-ReLU), `pool`. Modules:
  `stem_conv`, `stem_bn`, `stage1_conv`, `stage1_bn`, ..., `head`.
- `mlp`: flattens the image, Dense-ReLU per entry of `hidden`, Dense head; no BatchNorm (it has a
  `bn_axis_name` field only to follow the contract). Sows `hidden1`.. (post-ReLU) and `pool` (the
  last hidden layer's output, or the flattened image if `hidden` is empty). Modules: `dense1`..,
  `head`.
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
    register_model,
)


class SmallCNN(nn.Module):
  """A few conv-BN-ReLU layers with 2x2 downsampling; see the module docstring.

  Attributes:
    num_classes: size of the Dense head.
    widths: channels of the stride-2 stages; the stem has `widths[0]` channels.
    bn_axis_name: pmap axis name for cross-device BatchNorm statistics, or None.
    remat: recompute each convolution's output in the backward pass (`nn.remat`).
  """

  num_classes: int
  widths: Sequence[int] = (32, 64)
  bn_axis_name: str | None = None
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if not self.widths:
      raise ValueError("SmallCNN needs at least one width.")
    x = conv(self.widths[0], 3, name="stem_conv", remat=self.remat)(x)
    x = nn.relu(batch_norm(train, self.bn_axis_name, "stem_bn")(x))
    self.sow("intermediates", "stem", x)
    for stage, width in enumerate(self.widths, 1):
      x = conv(width, 3, 2, name=f"stage{stage}_conv", remat=self.remat)(x)
      x = nn.relu(batch_norm(train, self.bn_axis_name, f"stage{stage}_bn")(x))
      self.sow("intermediates", f"stage{stage}", x)
    x = global_avg_pool(x)
    self.sow("intermediates", "pool", x)
    return nn.Dense(self.num_classes, kernel_init=dense_kernel_init, name="head")(x)


class MLP(nn.Module):
  """Flatten, Dense-ReLU layers, Dense head; see the module docstring.

  Attributes:
    num_classes: size of the Dense head.
    hidden: widths of the hidden layers.
    bn_axis_name: unused (no BatchNorm); present so every model accepts it.
    remat: recompute each hidden layer's output in the backward pass (`nn.remat`).
  """

  num_classes: int
  hidden: Sequence[int] = (64,)
  bn_axis_name: str | None = None
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # No dropout or BatchNorm: train and eval are the same function.
    x = x.reshape(x.shape[0], -1)
    dense = nn.remat(nn.Dense) if self.remat else nn.Dense
    for i, width in enumerate(self.hidden, 1):
      x = nn.relu(dense(width, kernel_init=dense_kernel_init, name=f"dense{i}")(x))
      self.sow("intermediates", f"hidden{i}", x)
    self.sow("intermediates", "pool", x)
    return nn.Dense(self.num_classes, kernel_init=dense_kernel_init, name="head")(x)


@register_model("cnn")
def cnn(num_classes: int, **kwargs: Any) -> SmallCNN:
  """Small CNN (default widths 32, 64) for 8x8 digits and tests."""
  return SmallCNN(num_classes=num_classes, **kwargs)


@register_model("mlp")
def mlp(num_classes: int, **kwargs: Any) -> MLP:
  """MLP (default one hidden layer of 64) for 8x8 digits and tests."""
  return MLP(num_classes=num_classes, **kwargs)

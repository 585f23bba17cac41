"""Model registry and the shared building blocks of the built-in Flax Linen models.

Every registered model is a factory `(num_classes, **kwargs) -> nn.Module`. The module it returns
follows one contract that the rest of the framework relies on:

- `module.apply(variables, x, train=...)` takes NHWC float32 images `[B, H, W, C]` and returns
  logits `[B, num_classes]`;
- it has the fields `num_classes: int` and `bn_axis_name: str | None = None`; under `jax.pmap`
  the framework sets `bn_axis_name` to the pmap axis so that BatchNorm statistics are computed over
  the global batch;
- it has the field `remat: bool = False`; when True its repeated block (or, in models without
  blocks, each layer) is wrapped in `nn.remat`: its activations are recomputed in the backward
  pass instead of kept, the same numbers and parameter paths for less memory;
- it sows a few stable feature names into the `intermediates` collection: `stem`, `stage1`,
  `stage2`, ... and `pool` (the pre-logit vector `[B, D]`), so a loss can name what it compares
  without knowing the architecture. Everything else can be tapped by module path. (Flax forbids
  a sown name that equals a submodule's name in the same scope, so submodules are named
  `stem_conv`, `stage1_block0`, `head`, ... never plain `stem` or `stage1`.)

BatchNorm follows PyTorch's defaults (momentum 0.1 in PyTorch's convention is 0.9 here, epsilon
1e-5) and convolutions use PyTorch's Kaiming-normal fan-out init, so models trained here behave
like the PyTorch code whose numbers we compare against.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from distill_jax.common.initializers import conv_kernel_init
from distill_jax.common.registry import Registry

MODELS = Registry("model")
register_model = MODELS.register


def batch_norm(train: bool, axis_name: str | None, name: str) -> nn.BatchNorm:
  """A BatchNorm with the framework's settings (PyTorch defaults, optional cross-device stats).

  Args:
    train: use batch statistics (and update the running ones) when True, running ones otherwise.
    axis_name: the pmap axis to average statistics over, or None for per-device statistics.
    name: the submodule name (explicit, so parameter paths stay stable).
  """
  return nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=axis_name, name=name)


def conv(features: int, kernel_size: int, strides: int = 1, *, name: str,
         use_bias: bool = False, groups: int = 1,
         kernel_init: nn.initializers.Initializer = conv_kernel_init,
         remat: bool = False) -> nn.Conv:
  """A square convolution with PyTorch's padding ((k - 1) / 2 on each side) and Kaiming init.

  Explicit symmetric padding (not 'SAME') keeps stride-2 convolutions sampling the same pixels as
  PyTorch's, so features line up with the reference code. No bias by default: BN follows.
  `groups` splits the channels as PyTorch's `groups` does (`groups == features ==` the input
  channels: a depthwise convolution).
  `remat` recomputes its output in the backward pass (`nn.remat`).
  """
  pad = (kernel_size - 1) // 2
  return (nn.remat(nn.Conv) if remat else nn.Conv)(
      features, (kernel_size, kernel_size), strides=(strides, strides),
      padding=((pad, pad), (pad, pad)), use_bias=use_bias, feature_group_count=groups,
      kernel_init=kernel_init, name=name)


def maybe_remat(block: type[nn.Module], remat: bool) -> type[nn.Module]:
  """`block` wrapped in `nn.remat` when `remat` (its activations are recomputed in the backward
  pass instead of stored: less memory, one more forward); `block` itself otherwise.

  The block's call must be `__call__(self, x, train)`: `train` is static (a Python bool).
  """
  return nn.remat(block, static_argnums=(2,)) if remat else block


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Mean over the spatial axes: `[B, H, W, C] -> [B, C]`."""
  return x.mean(axis=(1, 2))


def build_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds the registered model `name` with a `num_classes`-way head.

  Extra keyword arguments go to the model's factory (e.g. `bn_axis_name`, `widths`). An unknown
  name raises `distill_jax.common.registry.UnknownNameError`, whose message lists the known models.
  """
  return MODELS.get(name)(num_classes, **kwargs)


# Fields every built-in model has that the framework sets, never a config's `kwargs`: the head
# size (from the data), the pmap axis, and `remat` (config.student.remat).
FRAMEWORK_FIELDS = ("num_classes", "bn_axis_name", "remat", "parent", "name")


def model_kwargs(name: str) -> dict[str, Any] | None:
  """The keyword arguments model `name` takes (a config's `student.kwargs` or
  `teachers.NAME.kwargs`), with the defaults it is built with when they are not given.

  Read from the module its factory returns (a dataclass): its fields, less the framework's
  (`FRAMEWORK_FIELDS`) and those the factory fixes itself (e.g. resnet20's `depth`, which it
  passes already). None when that cannot be told: a factory that needs arguments or returns
  something other than a dataclass module.
  """
  factory = MODELS.get(name)
  try:
    module = factory(1)
  except TypeError:
    return None
  if not dataclasses.is_dataclass(module):
    return None
  kwargs = {}
  for field in dataclasses.fields(module):
    if field.name in FRAMEWORK_FIELDS:
      continue
    value = getattr(module, field.name)
    try:
      factory(1, **{field.name: value})
    except TypeError:  # "got multiple values for keyword argument": the factory sets it.
      continue
    kwargs[field.name] = value
  return kwargs


def num_params(params: Any) -> int:
  """Number of scalars in a params pytree (pass `variables['params']`, not the batch stats).

  Works on concrete arrays and on `jax.ShapeDtypeStruct` leaves (from `jax.eval_shape`), so a
  model can be sized without running its init.
  """
  return sum(math.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params))


# The submodules register their models with `register_model`, so they are imported last, after
# the names they use exist.
from distill_jax.models import resnet_cifar, small, vgg, wrn  # noqa: E402, F401, I001
from distill_jax.models import mobilenetv2, resnet_bottleneck, shufflenet  # noqa: E402, F401, I001
from distill_jax.models import transformer  # noqa: E402, F401, I001

"""Connectors: small trainable maps from a student feature to the shape a loss compares.

They live inside module loss terms (their parameters in `params['objective'][term]`, their
batch stats in `objective_state[term]`), are trained with the student, and are never part of
the exported student. Kinds:

- 'identity': no parameters; the shapes must already match.
- 'conv1x1_bn': 1x1 convolution (no bias) + BatchNorm, for [B, H, W, C] features (FitNet's
  regressor, AB's and the CRD code's channel adapters).
- 'linear': a Dense layer on the last axis (for [B, D] embeddings).
- 'mlp': Dense-ReLU-Dense projection head with `hidden` units (the CRD/SimCLR-style head).

BatchNorm runs in training mode when the term's 'batch_stats' are mutable (the train step) and
uses running averages otherwise. Its statistics are global in every parallel mode: the objective
always sees the global batch (under pmap the train step gathers it first).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from distill_jax.common.initializers import conv_kernel_init, dense_kernel_init

CONNECTORS = ("identity", "conv1x1_bn", "linear", "mlp")


class Connector(nn.Module):
  """Maps a feature to `features` channels (last axis) with the chosen `kind`."""

  kind: str
  features: int
  hidden: int = 0  # 'mlp' only; 0: same as `features`.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind == "identity":
      return x
    if self.kind == "conv1x1_bn":
      if x.ndim != 4:
        raise ValueError(f"connector 'conv1x1_bn' needs a [B, H, W, C] feature, got shape "
                         f"{x.shape}; use 'linear' or 'mlp' for vectors.")
      x = nn.Conv(self.features, (1, 1), use_bias=False, kernel_init=conv_kernel_init,
                  name="conv")(x)
      return nn.BatchNorm(use_running_average=not self.is_mutable_collection("batch_stats"),
                          momentum=0.9, epsilon=1e-5, name="bn")(x)
    if self.kind == "linear":
      return nn.Dense(self.features, kernel_init=dense_kernel_init, name="dense")(x)
    if self.kind == "mlp":
      x = nn.relu(nn.Dense(self.hidden or self.features, kernel_init=dense_kernel_init,
                           name="dense1")(x))
      return nn.Dense(self.features, kernel_init=dense_kernel_init, name="dense2")(x)
    raise ValueError(f"Unknown connector {self.kind!r}; choose one of {list(CONNECTORS)}.")
